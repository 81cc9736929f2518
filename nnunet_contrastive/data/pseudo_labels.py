"""Pseudo-labels of unlabeled cases: estimated with nnU-Net's own predictor, stored per case and per round on disk.

Estimation (:func:`estimate_round`): nnU-Net's ``nnUNetPredictor`` is initialised manually with the trainer's
network, plans and configuration (as nnU-Net's own final validation does) and
``predict_sliding_window_return_logits`` runs on the PREPROCESSED image of every unlabeled case (sliding window with
the configuration's patch size, Gaussian weighting, step 0.5, mirroring optional). The pseudo-label is the argmax
of the logits, its confidence the largest softmax probability; both live on the preprocessed grid, i.e. exactly
the grid of the loader's images, so the loader crops them with the same bounding box as the image. Images are read
without their segmentation file (``load_image_only``): unlabeled cases' label files are never opened.

Store (:class:`PseudoLabelStore`), file-backed so nnU-Net's multiprocess loaders memory-map it::

    <output_folder>/pseudo_labels/round_<r>/<case>_pl.npy     int16 (1, z, y, x) label
                                           <case>_conf.npy   float16 (1, z, y, x) max softmax probability
                                           manifest.json     round, network state (epoch, sha1 of the weights),
                                                             complete, cases, timing, round statistics

Each case file is written atomically (temporary file, then rename). ``manifest.json`` is written first with
``complete: false`` and the network state, and rewritten with ``complete: true`` at the end. A run resumed
(``--c``) during an estimation finds an incomplete round: case files written by the same network state are kept
and the rest is estimated; files from another state (the run went back to an older checkpoint) are deleted and the
round starts over. A complete round is never recomputed.

Round statistics: ``changed_fraction`` (fraction of the unlabeled pixels whose label differs from the previous
round) and ``val_dice`` (per foreground class and mean: the same estimation on the fold's validation cases against
their ground truth, to see whether the rounds help). It is Dice pooled over all validation voxels of a class, on the
preprocessed grid, then averaged over the classes: comparable between rounds and runs, but not with nnU-Net's
per-case mean Dice of the benchmark's "validation mean Dice" (pooling weighs large structures and cases more).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from typing import Callable, Optional, Sequence

import numpy as np
import torch

__all__ = ["PseudoLabelStore", "PseudoLabelSource", "network_fingerprint", "make_predictor", "predict_case",
           "estimate_round", "dice_per_class", "CONFIDENCE_LEVELS"]

#: confidence levels carried through augmentation (the confidence travels as a second, quantised label channel)
CONFIDENCE_LEVELS = 20


def network_fingerprint(network: torch.nn.Module) -> str:
    """sha1 of the network's state_dict (names and bytes): identifies the weights a round was estimated with."""
    h = hashlib.sha1()
    for k, v in network.state_dict().items():
        h.update(k.encode())
        if torch.is_tensor(v):
            h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _atomic_save(path: str, array: np.ndarray) -> None:
    tmp = path + ".tmp.npy"
    np.save(tmp, array)
    os.replace(tmp, path)


def _atomic_json(path: str, obj: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


class PseudoLabelSource:
    """What the loader reads: the files of one complete round (picklable, memory-mapped per case)."""

    def __init__(self, folder: str, confidence: bool = False):
        self.folder, self.confidence = folder, bool(confidence)

    def has(self, case: str) -> bool:
        return os.path.isfile(os.path.join(self.folder, f"{case}_pl.npy"))

    def load(self, case: str):
        """(labels int16 (1, z, y, x), confidence float16 (1, z, y, x) or None), memory-mapped."""
        pl = np.load(os.path.join(self.folder, f"{case}_pl.npy"), mmap_mode="r")
        conf = np.load(os.path.join(self.folder, f"{case}_conf.npy"), mmap_mode="r") if self.confidence else None
        return pl, conf

    def __repr__(self):
        return f"PseudoLabelSource({self.folder!r}, confidence={self.confidence})"


class PseudoLabelStore:
    """Rounds of pseudo-labels under ``folder`` (``<output_folder>/pseudo_labels``)."""

    def __init__(self, folder: str):
        self.folder = folder

    def round_dir(self, r: int) -> str:
        return os.path.join(self.folder, f"round_{r}")

    def manifest(self, r: int) -> Optional[dict]:
        path = os.path.join(self.round_dir(r), "manifest.json")
        if not os.path.isfile(path):
            return None
        with open(path, encoding="utf-8") as f:
            return json.load(f)

    def is_complete(self, r: int) -> bool:
        m = self.manifest(r)
        return bool(m and m.get("complete"))

    def write_manifest(self, r: int, manifest: dict) -> None:
        os.makedirs(self.round_dir(r), exist_ok=True)
        _atomic_json(os.path.join(self.round_dir(r), "manifest.json"), manifest)

    def begin(self, r: int, state: dict) -> list[str]:
        """Start (or resume) round r with network ``state``; returns the cases already done with that state."""
        m = self.manifest(r)
        if m is not None and m.get("complete"):
            raise RuntimeError(f"round {r} is complete: it is never recomputed")
        if m is None or m.get("state") != state:
            shutil.rmtree(self.round_dir(r), ignore_errors=True)
            self.write_manifest(r, {"round": r, "state": state, "complete": False})
            return []
        return sorted(f[: -len("_pl.npy")] for f in os.listdir(self.round_dir(r))
                      if f.endswith("_pl.npy") and not f.endswith(".tmp.npy")
                      and os.path.isfile(os.path.join(self.round_dir(r), f[: -len("_pl.npy")] + "_conf.npy")))

    def write_case(self, r: int, case: str, labels: np.ndarray, confidence: np.ndarray) -> None:
        d = self.round_dir(r)
        _atomic_save(os.path.join(d, f"{case}_conf.npy"), confidence.astype(np.float16)[None])
        _atomic_save(os.path.join(d, f"{case}_pl.npy"), labels.astype(np.int16)[None])  # written last: "done"

    def source(self, r: int, confidence: bool = False) -> PseudoLabelSource:
        if not self.is_complete(r):
            raise RuntimeError(f"pseudo-labels of round {r} are not complete in {self.round_dir(r)}")
        return PseudoLabelSource(self.round_dir(r), confidence)

    def changed_fraction(self, r: int, cases: Sequence[str]) -> Optional[float]:
        """Fraction of the pixels of ``cases`` whose label differs between round r-1 and round r (None for the
        first round)."""
        prev = self.round_dir(r - 1)
        if r <= 1 or not os.path.isdir(prev):
            return None
        changed = total = 0
        for c in cases:
            a = np.load(os.path.join(prev, f"{c}_pl.npy"), mmap_mode="r")
            b = np.load(os.path.join(self.round_dir(r), f"{c}_pl.npy"), mmap_mode="r")
            changed += int(np.count_nonzero(np.asarray(a) != np.asarray(b)))
            total += a.size
        return changed / max(total, 1)


# ------------------------------------------------------------------------------------------------ estimation
def make_predictor(trainer, mirroring: bool = False, tile_step_size: float = 0.5, network=None):
    """nnU-Net's predictor around ``network`` (default: the trainer's network; unwrapped), as
    nnUNetTrainer.perform_actual_validation."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    from nnunet_contrastive.components.heads import unwrap_network

    predictor = nnUNetPredictor(tile_step_size=tile_step_size, use_gaussian=True, use_mirroring=mirroring,
                                perform_everything_on_device=True, device=trainer.device, verbose=False,
                                verbose_preprocessing=False, allow_tqdm=False)
    predictor.manual_initialization(unwrap_network(trainer.network if network is None else network),
                                    trainer.plans_manager,
                                    trainer.configuration_manager, None, trainer.dataset_json, type(trainer).__name__,
                                    trainer.inference_allowed_mirroring_axes)
    return predictor


def predict_case(predictor, data) -> tuple[np.ndarray, np.ndarray]:
    """Preprocessed image (c, z, y, x) -> (labels (z, y, x) int16, confidence (z, y, x) float16)."""
    x = torch.from_numpy(np.ascontiguousarray(np.asarray(data[:]), dtype=np.float32))
    with torch.no_grad():
        logits = predictor.predict_sliding_window_return_logits(x)
        probs = torch.softmax(torch.as_tensor(logits).float(), 0)
        conf, lab = probs.max(0)
    return lab.cpu().numpy().astype(np.int16), conf.cpu().numpy().astype(np.float16)


def dice_per_class(pred: np.ndarray, gt: np.ndarray, classes: Sequence[int]) -> dict:
    """Accumulable counts {c: (2|P∩G|, |P|+|G|)}; pixels where gt < 0 (outside the image) are ignored."""
    keep = gt >= 0
    out = {}
    for c in classes:
        p, g = (pred == c) & keep, (gt == c) & keep
        out[c] = (2 * int(np.count_nonzero(p & g)), int(np.count_nonzero(p)) + int(np.count_nonzero(g)))
    return out


def estimate_round(trainer, store: PseudoLabelStore, r: int, cases: Sequence[tuple], val_cases: Sequence[str] = (),
                   mirroring: bool = False, log: Callable[[str], None] = print, network=None,
                   source: str = "network") -> dict:
    """Estimate (or finish estimating) round r for ``cases`` = [(dataset, case id), ...] (nnU-Net datasets whose
    images are read image-only) with ``network`` (default: the trainer's current network; ``source`` names it in
    the log and manifest, e.g. "EMA teacher"); then the validation Dice on ``val_cases`` (the trainer's labeled
    preprocessed folder). Returns the completed manifest."""
    from nnunet_contrastive.data.dataloading import load_image_only

    net = trainer.network if network is None else network
    state = {"epoch": int(trainer.current_epoch), "network_sha1": network_fingerprint(net)}
    if source != "network":
        state["source"] = source
    done = set(store.begin(r, state))
    todo = [(ds, c) for ds, c in cases if c not in done]
    classes = [int(c) for c in trainer.label_manager.foreground_labels]
    was_training = net.training
    trainer.set_deep_supervision_enabled(False)
    net.eval()
    t0 = time.perf_counter()
    try:
        predictor = make_predictor(trainer, mirroring, network=net)
        log(f"Pseudo-labels round {r}: {len(todo)} of {len(cases)} unlabeled cases to estimate"
            + (f" ({len(done)} kept from an interrupted estimation with the same network)" if done else "")
            + f", {source} of epoch {state['epoch']}, mirroring {'on' if mirroring else 'off'}")
        every = max(1, len(todo) // 10)
        for i, (ds, c) in enumerate(todo):
            data, _ = load_image_only(ds, c)
            lab, conf = predict_case(predictor, data)
            store.write_case(r, c, lab, conf)
            if (i + 1) % every == 0 or i + 1 == len(todo):
                dt = time.perf_counter() - t0
                log(f"  pseudo-labels round {r}: {i + 1}/{len(todo)} cases, {dt / (i + 1):.2f} s/case, "
                    f"ETA {dt / (i + 1) * (len(todo) - i - 1):.0f} s")
        seconds = time.perf_counter() - t0
        counts = {c: [0, 0] for c in classes}
        if val_cases:
            ds_val = trainer.dataset_class(trainer.preprocessed_dataset_folder, list(val_cases))
            for c in val_cases:
                data, seg, _, _ = ds_val.load_case(c)
                lab, _ = predict_case(predictor, data)
                for k, (a, b) in dice_per_class(lab, np.asarray(seg[:])[0], classes).items():
                    counts[k][0] += a
                    counts[k][1] += b
    finally:
        trainer.set_deep_supervision_enabled(getattr(trainer, "enable_deep_supervision", True))
        net.train(was_training)
    val_dice = {str(k): (a / b if b else float("nan")) for k, (a, b) in counts.items()} if val_cases else {}
    finite = [v for v in val_dice.values() if np.isfinite(v)]
    manifest = {"round": r, "state": state, "complete": True, "cases": sorted(c for _, c in cases),
                "num_estimated": len(todo), "seconds": seconds,
                "seconds_per_case": seconds / len(todo) if todo else None, "mirroring": bool(mirroring),
                "changed_fraction": store.changed_fraction(r, [c for _, c in cases]),
                "val_cases": list(val_cases), "val_dice": val_dice,
                "val_dice_mean": float(np.mean(finite)) if finite else None}
    store.write_manifest(r, manifest)
    log(f"Pseudo-labels round {r} complete: {len(todo)} cases in {seconds:.1f} s"
        + (f" ({manifest['seconds_per_case']:.2f} s/case)" if todo else "")
        + (f"; changed since round {r - 1}: {100 * manifest['changed_fraction']:.2f}% of the pixels"
           if manifest["changed_fraction"] is not None else "")
        + (f"; Dice vs ground truth pooled over {len(val_cases)} validation cases: {manifest['val_dice_mean']:.4f} "
           f"{val_dice}" if manifest["val_dice_mean"] is not None else ""))
    return manifest
