"""The random generators a training run draws from: seeding them, and saving them in a checkpoint so that ``--c``
continues the same streams.

With ``nnUNet_n_proc_DA=0`` nnU-Net samples cases, slices and crops and draws its augmentation from the main
process's global generators (Python's ``random``, NumPy's legacy ``np.random`` and torch's); torch's also draws
dropout and our samplers' anchors. A checkpoint that carries their states lets a resumed run draw exactly what the
uninterrupted run would have drawn after that epoch, so a seeded run interrupted and resumed ends bit-identical
(tests/framework/test_staged_trainer.py). With worker processes (``nnUNet_n_proc_DA`` > 0) the workers draw from
their own generators, which are not part of the checkpoint: there a resumed run continues with a different stream.

States are stored as torch tensors, ints and tuples only (no NumPy objects), so a checkpoint stays loadable with
``torch.load(..., weights_only=True)``.
"""
from __future__ import annotations

import random

import numpy as np
import torch

__all__ = ["seed_everything", "reseed_for_rank", "capture_rng_state", "restore_rng_state"]


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's (CPU and every CUDA device's) global generators."""
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def reseed_for_rank(seed: int, rank: int, epoch: int | None = None) -> None:
    """Seed the global generators of DDP rank ``rank`` > 0 apart from rank 0's, from ``seed`` (and ``epoch`` when a
    run resumes), so each rank samples and augments its own batches; rank 0 keeps the run's own stream."""
    if rank <= 0:
        raise ValueError(f"reseed_for_rank is for ranks > 0 (got {rank}): rank 0 keeps the run's own seed.")
    entropy = [int(seed), int(rank)] + ([] if epoch is None else [int(epoch)])
    seed_everything(int(np.random.SeedSequence(entropy).generate_state(1)[0]))


def capture_rng_state() -> dict:
    """The states of Python's, NumPy's and torch's global generators (CUDA's when CUDA is initialised)."""
    kind, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = {"python": (int(version), tuple(int(x) for x in internal), gauss_next),
             "numpy": {"kind": str(kind), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def restore_rng_state(state: dict) -> None:
    """Set the global generators to ``state`` (from :func:`capture_rng_state`; tensors may come back on a GPU when
    the checkpoint was loaded with ``map_location``). CUDA states are restored when this process has as many
    devices as the saving one; otherwise they are left as they are."""
    missing = {"python", "numpy", "torch"} - set(state)
    if missing:
        raise ValueError(f"RNG state lacks {sorted(missing)}: not written by capture_rng_state.")
    version, internal, gauss_next = state["python"]
    random.setstate((int(version), tuple(int(x) for x in internal), gauss_next))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].cpu().numpy().astype(np.uint32), int(n["pos"]), int(n["has_gauss"]),
                         float(n["cached_gaussian"])))
    torch.set_rng_state(state["torch"].cpu().to(torch.uint8))
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available() and torch.cuda.device_count() == len(cuda):
        torch.cuda.set_rng_state_all([s.cpu().to(torch.uint8) for s in cuda])
