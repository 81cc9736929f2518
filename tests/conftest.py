"""Shared fixtures. Tests run against the *installed* package (CI: `pip install .[test]` then `pytest`)."""
from __future__ import annotations

import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.path.join(os.path.dirname(REPO), "shared", "data")
HIPPOCAMPUS = os.path.join(SHARED_DATA, "Task04_Hippocampus")


def pytest_configure(config):
    try:
        import nnunet_contrastive.trainers  # noqa: F401
    except ImportError as e:  # e.g. `python -m pytest` from the repo root shadows the installed package
        raise pytest.UsageError(
            f"nnunet_contrastive.trainers cannot be imported ({e}). Install the package (pip install '.[test]') "
            f"and run the console script `pytest`, not `python -m pytest` from the repository root.")


@pytest.fixture
def nnunet_env(tmp_path, monkeypatch):
    """Fresh nnUNet_raw / nnUNet_preprocessed / nnUNet_results folders for one test (also in os.environ)."""
    from nnunet_contrastive.pipeline import nnunet_folders

    folders = nnunet_folders(str(tmp_path / "nnunet"))
    for k, v in folders.items():
        monkeypatch.setenv(k, v)
    return folders


@pytest.fixture(scope="session")
def hippocampus_dir():
    if not os.path.isdir(os.path.join(HIPPOCAMPUS, "imagesTr")):
        pytest.skip(f"shared hippocampus data not found at {HIPPOCAMPUS}")
    return HIPPOCAMPUS


def python_exe() -> str:
    return sys.executable
