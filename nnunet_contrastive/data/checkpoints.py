"""Reading a training checkpoint to resume from (`nnUNetv2_train ... --c`), with an error that says what to do.

nnU-Net's `--c` resumes from `checkpoint_final.pth`, else `checkpoint_latest.pth`, else `checkpoint_best.pth` of
the fold folder. A file cut off while it was written or copied (zero bytes, a truncated zip archive) makes
`torch.load` fail with an error that names no file (`EOFError: Ran out of input`). `read_checkpoint` names the file,
lists the other checkpoints of the folder and says how to resume from one of them or start afresh. Our trainers
write checkpoints through a temporary file (an interrupted save never replaces a good checkpoint); a stopped
start-up never writes one.
"""
from __future__ import annotations

import os

from nnunet_contrastive.errors import UserInputError

RESUME_ORDER = ("checkpoint_final.pth", "checkpoint_latest.pth", "checkpoint_best.pth")  # nnU-Net's --c
REQUIRED_KEYS = ("network_weights", "optimizer_state", "current_epoch")


class CheckpointError(UserInputError):
    """A checkpoint that cannot be resumed from; the message names the file and the alternatives."""


def other_checkpoints(path: str) -> list[str]:
    """The other non-empty checkpoints of `path`'s folder that `--c` could use, in nnU-Net's order."""
    folder, name = os.path.split(os.path.abspath(path))
    out = []
    for candidate in RESUME_ORDER:
        full = os.path.join(folder, candidate)
        if candidate != name and os.path.isfile(full) and os.path.getsize(full) > 0:
            out.append(candidate)
    return out


def resume_advice(path: str) -> str:
    """What to do when `path` cannot be resumed from."""
    others = other_checkpoints(path)
    fresh = "or start a fresh run without --c (it trains this fold from the beginning)."
    if not others:
        return f"No other checkpoint is in {os.path.dirname(os.path.abspath(path))}: restore the file from a backup, {fresh}"
    later = [c for c in others if RESUME_ORDER.index(c) > RESUME_ORDER.index(os.path.basename(path))]
    if later:
        return (f"{later[0]} is in the same folder: move the broken file away (mv {path} {path}.broken) and run "
                f"again with --c to resume from {later[0]}, {fresh}")
    return (f"The folder also holds {', '.join(others)}; --c prefers {os.path.basename(path)}. Move the broken file "
            f"away (mv {path} {path}.broken) to resume from {others[0]}, {fresh}")


def read_checkpoint(path: str, map_location="cpu") -> dict:
    """The checkpoint dict of `path`; CheckpointError naming the file and the alternatives when it is missing,
    empty, unreadable or not an nnU-Net checkpoint."""
    import torch

    if not os.path.isfile(path):
        raise CheckpointError("does not exist.", where=path, fix=resume_advice(path))
    size = os.path.getsize(path)
    if size == 0:
        raise CheckpointError("is empty (0 bytes): it was cut off while being written or copied.", where=path,
                              fix=resume_advice(path))
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # torch raises EOFError, RuntimeError, UnpicklingError, ... for a damaged file
        reason = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise CheckpointError(f"cannot be read ({size} bytes; {e.__class__.__name__}: {reason}). It was probably "
                              f"cut off while being written or copied.", where=path, fix=resume_advice(path)) from None
    missing = [k for k in REQUIRED_KEYS if not isinstance(checkpoint, dict) or k not in checkpoint]
    if missing:
        raise CheckpointError(f"is not an nnU-Net training checkpoint (no {', '.join(missing)}).", where=path,
                              fix=resume_advice(path))
    return checkpoint
