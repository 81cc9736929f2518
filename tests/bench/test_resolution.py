"""The resolution ceiling of a coarser 2d spacing: Dice per label on hand-made arrays, the round trip on discs and
rings whose loss is known in shape (identity at the same spacing, thin structures lose more), and files read with
their real spacing."""
from __future__ import annotations

import numpy as np
import pytest

from nnunet_contrastive.bench.resolution import dice_per_label, resample_round_trip, resolution_ceiling


def _shapes(n=120, z=3):
    yy, xx = np.mgrid[:n, :n] - (n - 1) / 2
    r = np.hypot(yy, xx)
    disc = np.repeat((r <= 30)[None], z, 0).astype(np.uint8)
    ring = np.repeat(((r >= 20) & (r <= 24))[None], z, 0).astype(np.uint8)
    return disc, ring


def test_dice_per_label_hand_computed():
    ref = np.array([0, 1, 1, 2, 2, 2])
    pred = np.array([1, 1, 0, 2, 2, 0])
    d = dice_per_label(ref, pred, [1, 2, 3])
    assert d[1] == pytest.approx(2 * 1 / (2 + 2)) and d[2] == pytest.approx(2 * 2 / (3 + 2))
    assert np.isnan(d[3])


def test_round_trip_is_identity_at_the_same_spacing_and_costs_thin_structures_more():
    disc, ring = _shapes()
    spacing = (8.0, 1.0, 1.0)
    assert np.array_equal(resample_round_trip(disc, spacing, (1.0, 1.0)), disc)
    dice = {}
    for name, seg in (("disc", disc), ("ring", ring)):
        back = resample_round_trip(seg, spacing, (2.5, 2.5))
        assert back.shape == seg.shape
        dice[name] = dice_per_label(seg, back, [1])[1]
    # a 30 mm disc keeps most of itself at 2.5 mm; a 5 mm thick ring (a myocardium) loses clearly more
    assert 0.93 < dice["disc"] < 1.0
    assert dice["ring"] < dice["disc"] - 0.02
    coarser = dice_per_label(ring, resample_round_trip(ring, spacing, (4.0, 4.0)), [1])[1]
    assert coarser < dice["ring"]


def test_files_are_read_with_their_spacing(tmp_path):
    import SimpleITK as sitk

    disc, ring = _shapes()
    seg = disc + ring  # ring inside the disc: label 2 on the ring, 1 elsewhere in the disc
    files = []
    for i, sp in enumerate(((1.0, 1.0, 8.0), (2.5, 2.5, 8.0))):  # SimpleITK order x, y, z
        img = sitk.GetImageFromArray(seg.astype(np.uint8))
        img.SetSpacing(sp)
        files.append(str(tmp_path / f"case{i}.nii.gz"))
        sitk.WriteImage(img, files[-1])
    res = resolution_ceiling(files, (2.5, 2.5))
    per = res["per_case"]
    assert per["case1.nii.gz"] == {1: 1.0, 2: 1.0}  # already at 2.5 mm: nothing lost
    assert per["case0.nii.gz"][2] < per["case0.nii.gz"][1] < 1.0
    assert res["mean"][2] == pytest.approx((per["case0.nii.gz"][2] + 1.0) / 2)
    assert res["mean"]["mean"] == pytest.approx((res["mean"][1] + res["mean"][2]) / 2)
