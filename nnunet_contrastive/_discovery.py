"""How nnU-Net finds our trainers: the `nnUNet_extTrainer` folder (nnU-Net >= 2.8.0, its only plugin mechanism).

nnU-Net first walks its own trainer folder; only when the name is not found there does it import the modules of
each folder listed in `nnUNet_extTrainer` (os.pathsep-separated, read lazily). We point it at
`nnunet_contrastive/_nnunet_ext/`, which holds a single module re-exporting our trainer classes.

`register_ext_trainer_path()` is run at interpreter start by `nnunet_contrastive.pth` (site-packages root), so the
variable is set in every new shell of the environment. It must stay import-light (no torch) and never raise.
"""
from __future__ import annotations

import os

ENV_VAR = "nnUNet_extTrainer"


def ext_trainer_folder() -> str:
    """Absolute path of the folder nnU-Net should search for our trainers."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "_nnunet_ext")


def register_ext_trainer_path(environ=None) -> bool:
    """Append our folder to `nnUNet_extTrainer` unless it is already listed. Returns True if it changed."""
    environ = os.environ if environ is None else environ
    folder = ext_trainer_folder()
    current = [p for p in environ.get(ENV_VAR, "").split(os.pathsep) if p.strip()]
    if any(os.path.abspath(p) == folder for p in current):
        return False
    environ[ENV_VAR] = os.pathsep.join(current + [folder])
    return True


def export_line() -> str:
    """Shell line a user can put in ~/.bashrc instead of relying on the .pth hook."""
    return f'export {ENV_VAR}="${{{ENV_VAR}:+${{{ENV_VAR}}}{os.pathsep}}}{ext_trainer_folder()}"'
