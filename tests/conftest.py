"""Shared fixtures. Tests run against the *installed* package (CI: `pip install .[test]` then `pytest`)."""
from __future__ import annotations

import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.path.join(os.path.dirname(REPO), "shared", "data")
HIPPOCAMPUS = os.path.join(SHARED_DATA, "Task04_Hippocampus")
ACDC = os.path.join(SHARED_DATA, "ACDC")


def tiny_unet(seed: int = 0):
    """A seeded two-stage 2D PlainConvUNet (1 input channel, 3 classes, deep supervision) for loss-term tests."""
    import torch
    from dynamic_network_architectures.architectures.unet import PlainConvUNet
    torch.manual_seed(seed)
    return PlainConvUNet(1, 2, (8, 16), torch.nn.Conv2d, 3, (1, 2), 2, 3, (2,), True, torch.nn.InstanceNorm2d,
                         {"eps": 1e-5, "affine": True}, None, None, torch.nn.LeakyReLU, {"inplace": True},
                         deep_supervision=True)


def np_softmax(a, axis=1):
    """NumPy reference softmax (max-shifted) over ``axis``."""
    import numpy as np
    e = np.exp(a - a.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


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
    from nnunet_contrastive.prep.pipeline import nnunet_folders

    folders = nnunet_folders(str(tmp_path / "nnunet"))
    for k, v in folders.items():
        monkeypatch.setenv(k, v)
    return folders


@pytest.fixture(scope="session")
def hippocampus_dir():
    if not os.path.isdir(os.path.join(HIPPOCAMPUS, "imagesTr")):
        pytest.skip(f"shared hippocampus data not found at {HIPPOCAMPUS}")
    return HIPPOCAMPUS


@pytest.fixture(scope="session")
def acdc_dir():
    if not os.path.isfile(os.path.join(ACDC, "ssl4mis_split.json")):
        pytest.skip(f"shared ACDC data not found at {ACDC}")
    return ACDC


def python_exe() -> str:
    return sys.executable


# ------------------------------------------------------------------ nnU-Net's CLI on a tiny phantom dataset
PHANTOM_ID = 991


def cli_env(folders: dict, **extra) -> dict:
    """Environment of a new shell: small-machine settings, the given nnU-Net folders, NO nnUNet_extTrainer
    (finding our trainers must rely on the installed .pth hook), and our trainers seeded (seed 0 unless given):
    the short CLI runs' Dice bars then hold run after run instead of depending on the draw of the weights."""
    from nnunet_contrastive.prep.pipeline import small_machine_env

    extra.setdefault("nnUNet_contrastive_seed", 0)
    return small_machine_env({k: v for k, v in os.environ.items() if k != "nnUNet_extTrainer"}, **folders, **extra)


def run_cli(args, env, timeout=900) -> str:
    """Run an installed console script; fail the test with its output tail if it fails."""
    import subprocess

    from nnunet_contrastive.prep.pipeline import console_script

    exe = console_script(args[0])
    out = subprocess.run([exe] + [str(a) for a in args[1:]], env=env, capture_output=True, text=True,
                         timeout=timeout)
    assert out.returncode == 0, f"{args[0]} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out.stdout


def train_phantom_cli(prepared: dict, trainer: str, plans: str = "nnUNetPlans_cpu_small", **schedule) -> tuple:
    """``nnUNetv2_train`` of ``trainer`` on the phantoms (fold 0, CPU) with the short-run variables ``schedule``
    (10 iterations and 1 validation iteration per epoch unless given); returns (stdout, env, fold folder)."""
    schedule.setdefault("nnUNet_contrastive_iterations", 10)
    schedule.setdefault("nnUNet_contrastive_val_iterations", 1)
    env = cli_env(prepared["folders"], **schedule)
    out = run_cli(["nnUNetv2_train", PHANTOM_ID, "2d", "0", "-tr", trainer, "-p", plans, "-device", "cpu"], env)
    fold = os.path.join(prepared["folders"]["nnUNet_results"], f"Dataset{PHANTOM_ID}_E2E", f"{trainer}__{plans}__2d",
                        "fold_0")
    return out, env, fold


@pytest.fixture(scope="session")
def phantom_prepared(tmp_path_factory):
    """Phantoms (6 training + 2 test patients, 48x48) planned and preprocessed by nnU-Net (2d), metadata checked
    and copied, the cpu_small plans and 3 labeled patients in fold 0 (patient-level split)."""
    from nnunet_contrastive.prep.phantom import generate_phantom_dataset

    root = tmp_path_factory.mktemp("phantom")
    folders = {k: str(root / k) for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
    for f in folders.values():
        os.makedirs(f)
    raw = generate_phantom_dataset(folders["nnUNet_raw"], PHANTOM_ID, "E2E", num_train_patients=6,
                                   num_test_patients=2, size=48, seed=3)
    env = cli_env(folders)
    plan_env = {k: v for k, v in env.items() if k != "nnUNet_n_proc_DA"}  # 2.8.1 planner: set_num_threads(0)
    run_cli(["nnUNetv2_plan_and_preprocess", "-d", PHANTOM_ID, "-c", "2d", "-np", "2", "-npfp", "2",
             "--verify_dataset_integrity"], plan_env)
    run_cli(["nnunet-contrastive", "check", "-d", PHANTOM_ID], env)
    run_cli(["nnunet-contrastive", "plans", "-d", PHANTOM_ID, "-o", "cpu_small"], env)
    run_cli(["nnunet-contrastive", "select-labeled", "-d", PHANTOM_ID, "--num-labeled", "3", "--by", "patient",
             "-f", "0"], env)
    pre = os.path.join(folders["nnUNet_preprocessed"], f"Dataset{PHANTOM_ID}_E2E")
    return dict(folders=folders, env=env, raw=raw, pre=pre)


def predict_and_dice(prepared: dict, trainer: str, env: dict, checkpoint: str = "checkpoint_final.pth",
                     out_name: str | None = None, plans: str = "nnUNetPlans_cpu_small") -> float:
    """nnUNetv2_predict on the phantoms' imagesTs, nnUNetv2_evaluate_folder against labelsTs: foreground mean Dice."""
    import json

    pred = os.path.join(prepared["folders"]["nnUNet_results"], out_name or f"pred_{trainer}")
    run_cli(["nnUNetv2_predict", "-i", os.path.join(prepared["raw"], "imagesTs"), "-o", pred, "-d", PHANTOM_ID,
             "-c", "2d", "-tr", trainer, "-p", plans, "-f", "0", "-chk", checkpoint, "-npp", "0", "-nps", "0",
             "-device", "cpu", "--disable_progress_bar"], env)
    run_cli(["nnUNetv2_evaluate_folder", os.path.join(prepared["raw"], "labelsTs"), pred, "-djfile",
             os.path.join(prepared["raw"], "dataset.json"), "-pfile", os.path.join(prepared["pre"], f"{plans}.json"),
             "-np", "2"], env)
    with open(os.path.join(pred, "summary.json")) as f:
        return json.load(f)["foreground_mean"]["Dice"]


# ------------------------------------------------------------------ in-process trainers on the phantoms
PHANTOM_PLANS = "nnUNetPlans_cpu_small"


def phantom_in_process(prepared: dict, monkeypatch, results: str, **schedule) -> dict:
    """Point this process's nnU-Net variables at the phantoms (results in `results`) and set the short-run
    variables given as keyword arguments (e.g. nnUNet_contrastive_epochs=4)."""
    for k, v in prepared["env"].items():
        if k.startswith("nnUNet"):
            monkeypatch.setenv(k, v)
    monkeypatch.setenv("nnUNet_results", results)
    for k, v in schedule.items():
        monkeypatch.setenv(k, str(v))
    return prepared


def build_trainer(prepared: dict, cls, fold: int = 0):
    """An instance of trainer class `cls` (or its name in nnunet_contrastive.trainers) on the phantoms, on CPU."""
    import json

    import torch

    if isinstance(cls, str):
        import nnunet_contrastive.trainers as T

        cls = getattr(T, cls)
    with open(os.path.join(prepared["pre"], f"{PHANTOM_PLANS}.json"), encoding="utf-8") as f:
        plans = json.load(f)
    plans["continue_training"] = False
    with open(os.path.join(prepared["pre"], "dataset.json"), encoding="utf-8") as f:
        dj = json.load(f)
    return cls(plans, "2d", fold, dj, device=torch.device("cpu"))


def hide_label_files(trainer, cases, where: str):
    """Context manager: move the preprocessed label files of `cases` into folder `where` (a reader of them would
    fail) and put them back afterwards."""
    import contextlib
    import shutil

    @contextlib.contextmanager
    def _hidden():
        moved = []
        try:
            for case in cases:
                src = os.path.join(trainer.preprocessed_dataset_folder, f"{case}_seg.b2nd")
                dst = os.path.join(where, os.path.basename(src))
                shutil.move(src, dst)
                moved.append((src, dst))
            yield moved
        finally:
            for src, dst in moved:
                if os.path.exists(dst):
                    shutil.move(dst, src)

    return _hidden()
