"""`nnunet-contrastive env`: how nnU-Net finds our trainers, and the export line for users who set it themselves."""
from __future__ import annotations

import os

from nnunet_contrastive._discovery import ENV_VAR, export_line, ext_trainer_folder


def register(sub) -> None:
    p = sub.add_parser(
        "env", help="print the nnUNet_extTrainer export line and the state of nnU-Net's environment",
        description="Print the shell line that makes nnU-Net find our trainers (normally set automatically at "
                    "interpreter start by the installed nnunet_contrastive.pth), then the nnU-Net folders.")
    p.add_argument("--export-only", action="store_true", help="print only the export line (for eval or ~/.bashrc)")
    p.set_defaults(func=run)


def run(args) -> int:
    print(export_line())
    if args.export_only:
        return 0
    listed = [q for q in os.environ.get(ENV_VAR, "").split(os.pathsep) if q]
    ok = any(os.path.abspath(q) == ext_trainer_folder() for q in listed)
    print(f"# {ENV_VAR} in this process: {'includes' if ok else 'DOES NOT include'} {ext_trainer_folder()}")
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        print(f"# {var}={os.environ.get(var, '(not set)')}")
    return 0
