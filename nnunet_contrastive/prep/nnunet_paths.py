"""nnU-Net's dataset folders for a dataset id or name, with errors that say which variable to set."""
from __future__ import annotations

import os

from nnunet_contrastive.errors import UserInputError

_VARS = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")


class NnUNetPathError(UserInputError):
    """nnU-Net's folder variables are not set, or the dataset id or name is unknown or ambiguous."""


def _root(var: str) -> str:
    value = os.environ.get(var)
    if not value:
        raise NnUNetPathError(f"The environment variable {var} is not set. nnU-Net needs nnUNet_raw, "
                              f"nnUNet_preprocessed and nnUNet_results (see nnU-Net's setting_up_paths.md).")
    return value


def dataset_name(dataset: str | int) -> str:
    """'DatasetXXX_Name' from an id (990, '990') or a name, looked up in nnUNet_preprocessed then nnUNet_raw."""
    s = str(dataset)
    if s.startswith("Dataset"):
        return s
    try:
        ident = int(s)
    except ValueError:
        raise NnUNetPathError(f"'{dataset}' is neither a dataset id nor a name of the form DatasetXXX_Name.")
    prefix = f"Dataset{ident:03d}_"
    found = set()
    for var in ("nnUNet_preprocessed", "nnUNet_raw", "nnUNet_results"):
        root = os.environ.get(var)
        if root and os.path.isdir(root):
            found |= {d for d in os.listdir(root) if d.startswith(prefix)}
    if not found:
        raise NnUNetPathError(f"No dataset with id {ident} in nnUNet_raw / nnUNet_preprocessed "
                              f"({[os.environ.get(v) for v in _VARS]}).")
    if len(found) > 1:
        raise NnUNetPathError(f"Several datasets have id {ident}: {sorted(found)}. Remove or rename one.")
    return found.pop()


def raw_folder(dataset: str | int) -> str:
    return os.path.join(_root("nnUNet_raw"), dataset_name(dataset))


def preprocessed_folder(dataset: str | int) -> str:
    return os.path.join(_root("nnUNet_preprocessed"), dataset_name(dataset))
