"""Image checks: files read completely (also uncompressed and NIfTI-2), channels, grids, label values."""
from __future__ import annotations

import gzip

import numpy as np
import pytest

from bad_input import truncate, write_bytes, write_image
from nnunet_contrastive.prep.image_check import case_problems, declared_label_values, read_image


@pytest.fixture
def case(tmp_path):
    img, lab = str(tmp_path / "x_0000.nii.gz"), str(tmp_path / "x.nii.gz")
    write_image(img, np.random.default_rng(0).normal(size=(4, 6, 5)).astype(np.float32))
    write_image(lab, np.arange(4 * 6 * 5).reshape(4, 6, 5) % 3)
    return img, lab


def test_good_case_has_no_problems(case):
    img, lab = case
    assert case_problems([img], lab, {0, 1, 2}) == []
    info, values = read_image(lab, want_values=True)
    assert info.shape == (5, 6, 4) and info.channels == 1 and values.tolist() == [0, 1, 2]


def test_uncompressed_nifti_cut_short(case, tmp_path):
    img, _ = case
    raw = str(tmp_path / "y_0000.nii")
    write_bytes(raw, gzip.open(img).read())
    assert case_problems([raw]) == []
    truncate(raw, 0.9)
    problems = case_problems([raw])
    assert len(problems) == 1 and raw in problems[0] and "truncated" in problems[0]


def test_nifti2_is_read(tmp_path):
    import nibabel as nib

    path = str(tmp_path / "z_0000.nii.gz")
    nib.save(nib.Nifti2Image(np.zeros((5, 6, 4), np.float32), np.eye(4)), path)
    assert case_problems([path]) == []
    truncate(path, 0.6)
    assert "truncated" in case_problems([path])[0]


def test_other_formats_go_through_simpleitk(tmp_path):
    path = str(tmp_path / "n_0000.nrrd")
    write_image(path, np.zeros((4, 6, 5), np.float32))
    assert case_problems([path]) == []
    write_bytes(path, b"NRRD0004\nbroken")
    assert "cannot be read as an image" in case_problems([path])[0]


def test_channels_must_share_a_grid(case, tmp_path):
    img, lab = case
    other = str(tmp_path / "x_0001.nii.gz")
    write_image(other, np.zeros((4, 6, 5), np.float32), spacing=(2.0, 1.0, 1.0))
    problems = case_problems([img, other], lab, {0, 1, 2})
    assert len(problems) == 1 and other in problems[0] and "spacing" in problems[0]


def test_region_labels_declare_their_integers():
    assert declared_label_values({"background": 0, "whole": [1, 2, 3], "core": [2, 3], "ignore": 4}) == {0, 1, 2, 3, 4}
