"""Dice lost to a coarser in-plane spacing alone: the ceiling of a 2d plans override such as `acdc_cpu`.

A network trained at a coarser spacing predicts on the coarse grid; nnU-Net resamples its probabilities back to
each image's own grid (linear, `resampling_fn_probabilities`) and takes the argmax. This module does exactly that
with a PERFECT coarse prediction: each ground-truth label map is resampled to the target in-plane spacing as
nnU-Net's preprocessing resamples segmentations (`resample_data_or_seg_to_shape`, is_seg=True, order 1, slices
kept), then its one-hot map is resampled back to the original grid (is_seg=False, order 1) and argmax'ed, and the
result is scored against the original with Dice per label. No network at that spacing can score above it (on
average over volumes, up to interpolation ties), so `1 - ceiling` is what the spacing alone costs.

Run: ``python -m nnunet_contrastive.bench.resolution --labels <raw>/labelsTs --plans <pre>/nnUNetPlans_acdc_cpu.json``
(spacing and axis order from the plans' 2d configuration) or ``--spacing 2.5 2.5``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

__all__ = ["resample_round_trip", "dice_per_label", "resolution_ceiling", "main"]


def resample_round_trip(seg: np.ndarray, spacing, inplane) -> np.ndarray:
    """`seg` (z, y, x; integer labels, spacing (z, y, x) in mm) -> coarse grid at (z, *inplane) -> back to seg's
    grid, as nnU-Net's 2d preprocessing and prediction resample (see the module docstring)."""
    from nnunetv2.preprocessing.resampling.default_resampling import compute_new_shape, \
        resample_data_or_seg_to_shape

    spacing = [float(s) for s in spacing]
    target = [spacing[0]] + [float(s) for s in inplane]
    coarse_shape = compute_new_shape(seg.shape, spacing, target)
    coarse = resample_data_or_seg_to_shape(seg[None].astype(np.int16), coarse_shape, spacing, target, is_seg=True,
                                           order=1, order_z=0, force_separate_z=None)[0]
    labels = np.arange(int(max(seg.max(), coarse.max())) + 1)
    one_hot = (coarse[None] == labels[:, None, None, None]).astype(np.float32)
    probs = resample_data_or_seg_to_shape(one_hot, seg.shape, target, spacing, is_seg=False, order=1, order_z=0,
                                          force_separate_z=None)
    return labels[np.argmax(probs, axis=0)]


def dice_per_label(ref: np.ndarray, pred: np.ndarray, labels) -> dict:
    """Dice of each label (NaN where both are empty)."""
    out = {}
    for lab in labels:
        a, b = ref == lab, pred == lab
        denom = a.sum() + b.sum()
        out[int(lab)] = float(2 * np.logical_and(a, b).sum() / denom) if denom else float("nan")
    return out


def resolution_ceiling(label_files: list[str], inplane, transpose=(0, 1, 2), labels=None) -> dict:
    """Mean over volumes of the round-trip Dice per label, and per volume. `transpose`: the plans'
    transpose_forward (nnU-Net's 2d configuration slices along the first axis after it)."""
    import SimpleITK as sitk
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    sitk.ProcessObject_SetGlobalWarningDisplay(False)  # ACDC headers: "unexpected scales in sform", harmless
    io = SimpleITKIO()
    per_case = {}
    for path in label_files:
        seg, props = io.read_seg(path)
        seg = seg[0].transpose(transpose)
        spacing = [props["spacing"][i] for i in transpose]
        labs = labels if labels is not None else [v for v in np.unique(seg) if v != 0]
        per_case[os.path.basename(path)] = dice_per_label(seg, resample_round_trip(seg, spacing, inplane), labs)
    all_labels = sorted({lab for d in per_case.values() for lab in d})
    mean = {lab: float(np.nanmean([d.get(lab, np.nan) for d in per_case.values()])) for lab in all_labels}
    mean["mean"] = float(np.mean([mean[lab] for lab in all_labels])) if all_labels else float("nan")
    return {"inplane_spacing": [float(s) for s in inplane], "mean": mean, "per_case": per_case}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m nnunet_contrastive.bench.resolution", description=__doc__.split("\n")[0])
    p.add_argument("--labels", required=True, help="folder of label maps (nnU-Net raw labelsTr/labelsTs)")
    p.add_argument("--plans", help="plans JSON whose 2d configuration gives the spacing and transpose_forward")
    p.add_argument("--spacing", nargs=2, type=float, help="in-plane spacing in mm (instead of --plans)")
    p.add_argument("--out", help="write the result as JSON here")
    args = p.parse_args(argv)
    if (args.plans is None) == (args.spacing is None):
        p.error("give exactly one of --plans and --spacing")
    transpose = (0, 1, 2)
    if args.plans:
        with open(args.plans, encoding="utf-8") as f:
            plans = json.load(f)
        inplane = plans["configurations"]["2d"]["spacing"]
        transpose = tuple(plans.get("transpose_forward", transpose))
    else:
        inplane = args.spacing
    files = sorted(os.path.join(args.labels, f) for f in os.listdir(args.labels) if f.endswith((".nii.gz", ".nrrd",
                                                                                             ".mha", ".nii")))
    if not files:
        p.error(f"no label files in {args.labels}")
    res = resolution_ceiling(files, inplane, transpose)
    print(f"{len(files)} label maps, in-plane {inplane} mm: round-trip Dice "
          + ", ".join(f"{k} {v:.4f}" for k, v in res["mean"].items()))
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
