"""Bad input to every data command: exit code 1, one message naming the item, earlier outputs byte-identical.

One table per command; every bad input is made inside the test from a small synthetic dataset (phantoms, a tiny
MSD and ACDC layout, hand-written plans), so nothing depends on shared data. Each case starts from a state in
which the command already succeeded once (its earlier output), damages one input, runs the command again and
compares every file of the outputs before and after.
"""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from bad_input import (assert_user_error, crop_one_slice, edit_bytes, edit_text, gzip_garbage, gzip_of_zeros, make_4d,
                       prepend_bom, run_main, set_voxel, snapshot, truncate, write_bytes, write_image)
from nnunet_contrastive.prep.phantom import generate_phantom_dataset

DATASET = "Dataset990_Tiny"
LABELED = ["patient001_ED", "patient001_ES", "patient002_ED", "patient002_ES"]


@pytest.fixture(scope="module")
def phantom_template(tmp_path_factory):
    """2 labeled patients (ED, ES) and 1 unlabeled patient, 32x32 slices; copied for every test."""
    return generate_phantom_dataset(str(tmp_path_factory.mktemp("template")), 990, "Tiny", num_train_patients=2,
                                    num_test_patients=0, num_unlabeled_patients=1, size=32)


@pytest.fixture
def dataset(nnunet_env, phantom_template):
    raw = os.path.join(nnunet_env["nnUNet_raw"], DATASET)
    shutil.copytree(phantom_template, raw)
    pre = os.path.join(nnunet_env["nnUNet_preprocessed"], DATASET)
    os.makedirs(pre)
    return raw, pre


def _p(folder, *parts):
    return os.path.join(folder, *parts)


# ---------------------------------------------------------------------------------------------------- check
CHECK_CASES = {
    "truncated image": (lambda raw: truncate(_p(raw, "imagesTr", "patient001_ED_0000.nii.gz")),
                        ["patient001_ED_0000.nii.gz", "truncated"]),
    "truncated label": (lambda raw: truncate(_p(raw, "labelsTr", "patient002_ES.nii.gz"), 0.7),
                        ["labelsTr/patient002_ES.nii.gz", "truncated"]),
    "not gzip": (lambda raw: gzip_garbage(_p(raw, "imagesUnlabeled", "patient003_ED_0000.nii.gz")),
                 ["patient003_ED_0000.nii.gz", "gzip"]),
    "gzip without NIfTI": (lambda raw: gzip_of_zeros(_p(raw, "imagesUnlabeled", "patient003_ES_0000.nii.gz")),
                           ["patient003_ES_0000.nii.gz", "NIfTI"]),
    "4D image": (lambda raw: make_4d(_p(raw, "imagesTr", "patient001_ES_0000.nii.gz")),
                 ["patient001_ES_0000.nii.gz", "2 channels"]),
    "wrong label value": (lambda raw: set_voxel(_p(raw, "labelsTr", "patient001_ED.nii.gz"), 7),
                          ["labelsTr/patient001_ED.nii.gz", "[7]"]),
    "non-integer label": (lambda raw: set_voxel(_p(raw, "labelsTr", "patient001_ED.nii.gz"), 1.5),
                          ["labelsTr/patient001_ED.nii.gz", "integers"]),
    "label grid": (lambda raw: crop_one_slice(_p(raw, "labelsTr", "patient002_ED.nii.gz")),
                   ["labelsTr/patient002_ED.nii.gz", "shape"]),
    "wrong column case": (lambda raw: edit_text(_p(raw, "metadata.csv"), "case,patient,", "case,Patient,"),
                          ["metadata.csv", "'Patient'", "'patient'"]),
    "near-miss column": (lambda raw: edit_text(_p(raw, "metadata.csv"), "case,patient,", "case,patient_id,"),
                         ["metadata.csv", "'patient_id'"]),
    "near-miss phase": (lambda raw: edit_text(_p(raw, "metadata.csv"), ",phase\n", ",Phases\n"),
                        ["metadata.csv", "'Phases'", "'phase'"]),
    "latin-1 metadata": (lambda raw: edit_bytes(_p(raw, "metadata.csv"), b"patient002,ED", b"patient\xe9002,ED"),
                         ["metadata.csv, line 4", "0xe9", "UTF-8"]),
    "latin-1 dataset.json": (lambda raw: edit_bytes(_p(raw, "dataset.json"), b'"Tiny"', b'"T\xefny"'),
                             ["dataset.json, line", "UTF-8"]),
    "truncated dataset.json": (lambda raw: truncate(_p(raw, "dataset.json")), ["dataset.json", "not valid JSON"]),
    "label not an integer": (lambda raw: edit_text(_p(raw, "dataset.json"), '"LV": 3', '"LV": "3"'),
                             ["dataset.json", "'LV'"]),
    "duplicate ids across folders": (
        lambda raw: shutil.copy(_p(raw, "imagesTr", "patient001_ED_0000.nii.gz"), _p(raw, "imagesUnlabeled")),
        ["'patient001_ED'", "imagesUnlabeled"]),
}


@pytest.mark.parametrize("case", sorted(CHECK_CASES))
def test_check_bad_input(dataset, capsys, case):
    raw, pre = dataset
    rc, _, err = run_main(capsys, ["check", "-d", DATASET])
    assert rc == 0, err  # earlier output: the metadata copy in the preprocessed folder
    before = snapshot(pre)
    damage, names = CHECK_CASES[case]
    damage(raw)
    rc, _, err = run_main(capsys, ["check", "-d", DATASET])
    assert_user_error(rc, err, *names)
    assert snapshot(pre) == before


@pytest.mark.parametrize("file", ["metadata.csv", "dataset.json"])
def test_check_accepts_a_byte_order_mark(dataset, capsys, file):
    raw, pre = dataset
    prepend_bom(_p(raw, file))
    rc, _, err = run_main(capsys, ["check", "-d", DATASET])
    assert rc == 0, err


# ------------------------------------------------------------------------------------------- select-labeled
def _fake_preprocessed(raw, pre):
    """What select-labeled reads of a preprocessed dataset: dataset.json, gt_segmentations/, metadata.csv."""
    shutil.copy(_p(raw, "dataset.json"), pre)
    os.makedirs(_p(pre, "gt_segmentations"))
    for case in LABELED:
        write_bytes(_p(pre, "gt_segmentations", case + ".nii.gz"), b"")
    shutil.copy(_p(raw, "metadata.csv"), pre)
    splits = [{"train": ["patient001_ED", "patient001_ES"], "val": ["patient002_ED", "patient002_ES"]},
              {"train": ["patient002_ED", "patient002_ES"], "val": ["patient001_ED", "patient001_ES"]}]
    with open(_p(pre, "splits_final.json"), "w") as f:
        json.dump(splits, f)


def _set_splits(pre, splits):
    with open(_p(pre, "splits_final.json"), "w") as f:
        json.dump(splits, f)


SELECT_CASES = {
    "negative seed": (lambda raw, pre: None, ["--seed", "-1"], ["--seed", "-1"]),
    "split from another dataset": (
        lambda raw, pre: _set_splits(pre, [{"train": ["hippocampus_001", "hippocampus_002"], "val": ["x"]}]), [],
        ["splits_final.json", "fold 0", "hippocampus_001", "another dataset"]),
    "truncated split file": (lambda raw, pre: truncate(_p(pre, "splits_final.json")), [],
                             ["splits_final.json, line", "not valid JSON"]),
    "wrongly keyed split": (lambda raw, pre: edit_text(_p(pre, "splits_final.json"), '"train"', '"Train"'), [],
                            ["splits_final.json", "fold 0", "'train'"]),
    "split not a list": (lambda raw, pre: _set_splits(pre, {"train": LABELED, "val": []}), [],
                         ["splits_final.json", "list of folds"]),
    "case in train and val": (
        lambda raw, pre: _set_splits(pre, [{"train": LABELED[:3], "val": LABELED[2:]}]), [],
        ["splits_final.json", "fold 0", "patient002_ED", "both 'train' and 'val'"]),
    "labeled case outside train": (
        lambda raw, pre: _set_splits(pre, [{"train": LABELED[:2], "val": LABELED[2:], "labeled": ["patient002_ED"]}]),
        [], ["splits_final.json", "fold 0", "patient002_ED"]),
    "non-UTF-8 split file": (lambda raw, pre: edit_bytes(_p(pre, "splits_final.json"), b"patient001_ES",
                                                         b"patient\xff001_ES"),
                             [], ["splits_final.json, line", "0xff"]),
    "stale metadata copy": (
        lambda raw, pre: edit_text(_p(raw, "metadata.csv"), "patient002_ED,patient002", "patient002_ED,patient001"),
        ["--by", "patient"], [_p("nnUNet_preprocessed", DATASET, "metadata.csv"), "stale", f"check -d {DATASET}"]),
    "wrong column case": (
        lambda raw, pre: [edit_text(_p(f, "metadata.csv"), "case,patient,", "case,Patient,") for f in (raw, pre)],
        ["--by", "patient"], ["metadata.csv", "'Patient'"]),
    "latin-1 metadata": (
        lambda raw, pre: [edit_bytes(_p(f, "metadata.csv"), b"patient002,ED", b"patient\xe9002,ED") for f in (raw, pre)],
        ["--by", "patient"], ["metadata.csv, line 4", "0xe9"]),
}


@pytest.mark.parametrize("case", sorted(SELECT_CASES))
def test_select_labeled_bad_input(dataset, capsys, case):
    raw, pre = dataset
    _fake_preprocessed(raw, pre)
    rc, _, err = run_main(capsys, ["select-labeled", "-d", DATASET, "--num-labeled", "1", "--by", "patient"])
    assert rc == 0, err  # earlier output: the labeled lists in splits_final.json
    damage, args, names = SELECT_CASES[case]
    damage(raw, pre)
    before = snapshot(pre)
    rc, _, err = run_main(capsys, ["select-labeled", "-d", DATASET, "--num-labeled", "1"] + args)
    assert_user_error(rc, err, *names)
    assert snapshot(pre) == before


def test_select_labeled_reads_a_fresh_copy_and_a_bom(dataset, capsys):
    raw, pre = dataset
    _fake_preprocessed(raw, pre)
    prepend_bom(_p(raw, "metadata.csv"))
    shutil.copy(_p(raw, "metadata.csv"), pre)
    rc, _, err = run_main(capsys, ["select-labeled", "-d", DATASET, "--num-labeled", "1", "--by", "patient"])
    assert rc == 0, err


# ----------------------------------------------------------------------------------------------------- plans
def _conf(dim: int, identifier: str, patch: list, strides: list, batch: int) -> dict:
    return {"data_identifier": identifier, "preprocessor_name": "DefaultPreprocessor", "batch_size": batch,
            "patch_size": patch, "median_image_size_in_voxels": [float(p) for p in patch],
            "spacing": [1.0] * dim, "normalization_schemes": ["ZScoreNormalization"], "use_mask_for_norm": [False],
            "resampling_fn_data": "resample_data_or_seg_to_shape",
            "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
            "architecture": {"network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
                             "arch_kwargs": {"n_stages": len(strides), "strides": strides,
                                             "kernel_sizes": [[3] * dim] * len(strides)}},
            "batch_dice": True}


def tiny_plans() -> dict:
    """nnU-Net plans of the phantom (2d, 3d_fullres and a configuration that inherits from it)."""
    return {"dataset_name": DATASET, "plans_name": "nnUNetPlans", "image_reader_writer": "SimpleITKIO",
            "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2],
            "original_median_spacing_after_transp": [1.0, 1.0, 1.0], "label_manager": "LabelManager",
            "configurations": {
                "2d": _conf(2, "nnUNetPlans_2d", [32, 32], [[1, 1], [2, 2], [2, 2]], 12),
                "3d_fullres": _conf(3, "nnUNetPlans_3d_fullres", [8, 32, 32], [[1, 1, 1], [1, 2, 2], [2, 2, 2]], 2),
                "3d_fullres_bs4": {"inherits_from": "3d_fullres", "batch_size": 4}},
            "experiment_planner_used": "ExperimentPlanner",
            "foreground_intensity_properties_per_channel": {"0": {"mean": 100.0, "std": 20.0, "max": 200.0,
                                                                  "min": 0.0, "percentile_00_5": 1.0,
                                                                  "percentile_99_5": 190.0, "median": 100.0}}}


def _write_plans(pre):
    with open(_p(pre, "nnUNetPlans.json"), "w") as f:
        json.dump(tiny_plans(), f, indent=1)


def _conf_override(conf, **values):
    return {"configurations": {conf: values}}


PLANS_CASES = {
    "negative batch size": (_conf_override("2d", batch_size=-3), [], ["'2d'", "'batch_size'", "-3"]),
    "batch size as text": (_conf_override("2d", batch_size="8"), [], ["'batch_size'", "'8'"]),
    "2d patch size with 3 axes": (_conf_override("2d", patch_size=[32, 32, 32]), [],
                                  ["'2d'", "'patch_size'", "list of 2"]),
    "zero spacing": (_conf_override("3d_fullres", spacing=[0, 1.0, 1.0], data_identifier="new_3d"), [],
                     ["'3d_fullres'", "'spacing'"]),
    "one mask flag for two channels": (_conf_override("2d", use_mask_for_norm=[False, True], data_identifier="x2"),
                                       [], ["'use_mask_for_norm'", "1 true/false"]),
    "top-level transpose without new data_identifier": (
        {"transpose_forward": [2, 1, 0], "transpose_backward": [2, 1, 0]}, [],
        ["transpose_forward", "data_identifier", "'nnUNetPlans_2d'"]),
    "transpose that is no permutation": ({"transpose_forward": [0, 0, 1]}, [], ["transpose_forward", "permutation"]),
    "intensity properties without new data_identifier": (
        {"foreground_intensity_properties_per_channel": {"0": {"mean": 1.0}}}, [],
        ["foreground_intensity_properties_per_channel", "data_identifier"]),
    "inherited spacing change": (
        {"configurations": {"3d_fullres": {"spacing": [2.0, 1.0, 1.0], "data_identifier": "new_3d"},
                            "3d_fullres_bs4": {"data_identifier": "nnUNetPlans_3d_fullres"}}}, [],
        ["'3d_fullres_bs4'", "spacing", "data_identifier"]),
    "dataset name": ({"dataset_name": "Dataset991_Other"}, [], ["dataset_name"]),
    "data_identifier with a path": (_conf_override("2d", spacing=[2.0, 2.0], data_identifier="../elsewhere"), [],
                                    ["data_identifier", "'../elsewhere'"]),
    "data_identifier of another configuration": (
        _conf_override("2d", spacing=[2.0, 2.0], data_identifier="nnUNetPlans_3d_fullres"), [],
        ["'2d'", "nnUNetPlans_3d_fullres", "another configuration"]),
    "configurations not an object": ({"configurations": ["2d"]}, [], ["'configurations'"]),
    "configuration not an object": ({"configurations": {"2d": 8}}, [], ["'2d'"]),
    "unknown parent configuration": (_conf_override("2d", inherits_from="2d_big"), [], ["inherits_from", "'2d_big'"]),
    "stage lists of the wrong length": (
        _conf_override("2d", architecture={"arch_kwargs": {"n_stages": 4}}), [], ["'2d'", "strides", "n_stages"]),
    "name outside the dataset folder": (_conf_override("2d", batch_size=2), ["--name", "../../x"], ["'../../x'"]),
    "name with a folder": (_conf_override("2d", batch_size=2), ["--name", "sub/plans"], ["'sub/plans'"]),
    "source plans outside the folder": (_conf_override("2d", batch_size=2), ["-p", "../nnUNetPlans"],
                                        ["'../nnUNetPlans'"]),
    "latin-1 override": (b'{"_doc": "caf\xe9", "configurations": {"2d": {"batch_size": 2}}}', [],
                         ["cpu_small.json, line 1", "0xe9", "UTF-8"]),
    "truncated override": (b'{"configurations": {"2d": {"batch_size": 2', [],
                           ["cpu_small.json, line 1", "not valid JSON"]),
}


@pytest.mark.parametrize("case", sorted(PLANS_CASES))
def test_plans_bad_override(dataset, nnunet_env, capsys, tmp_path, case):
    _, pre = dataset
    _write_plans(pre)
    rc, _, err = run_main(capsys, ["plans", "-d", DATASET, "-o", "cpu_small"])
    assert rc == 0, err  # earlier output: nnUNetPlans_cpu_small.json, which a failed run must not replace
    override, args, names = PLANS_CASES[case]
    path = tmp_path / "overrides" / "cpu_small.json"  # same target name as the earlier output
    path.parent.mkdir()
    path.write_bytes(override if isinstance(override, bytes) else json.dumps(override).encode())
    root = os.path.dirname(nnunet_env["nnUNet_preprocessed"])
    before = snapshot(root)
    rc, _, err = run_main(capsys, ["plans", "-d", DATASET, "-o", str(path)] + args)
    assert_user_error(rc, err, *names)
    assert snapshot(root) == before  # nothing replaced, nothing written anywhere else


def test_plans_good_overrides_still_pass(dataset, capsys, tmp_path):
    _, pre = dataset
    _write_plans(pre)
    good = {"transpose_forward": [2, 1, 0], "transpose_backward": [2, 1, 0],
            "configurations": {c: {"data_identifier": f"transposed_{c}"} for c in ("2d", "3d_fullres")}}
    path = tmp_path / "transposed.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(good).encode())  # with a byte-order mark
    rc, _, err = run_main(capsys, ["plans", "-d", DATASET, "-o", str(path)])
    assert rc == 0, err
    with open(_p(pre, "nnUNetPlans_transposed.json")) as f:
        merged = json.load(f)
    assert merged["configurations"]["3d_fullres_bs4"] == {"inherits_from": "3d_fullres", "batch_size": 4}


# -------------------------------------------------------------------------------------- preprocess-unlabeled
def _earlier_unlabeled_output(pre):
    """A previous preprocess-unlabeled result, and a labeled folder as nnU-Net leaves it."""
    _write_plans(pre)
    out = _p(pre, "nnUNetPlans_2d_unlabeled")
    os.makedirs(out)
    for case in ("patient003_ED", "patient003_ES"):
        for ending, data in ((".b2nd", b"data"), ("_seg.b2nd", b"seg"), (".pkl", b"props")):
            write_bytes(_p(out, case + ending), data + case.encode())
    os.makedirs(_p(pre, "nnUNetPlans_2d"))
    for case in LABELED:
        write_bytes(_p(pre, "nnUNetPlans_2d", case + ".pkl"), b"props")


UNLABELED_CASES = {
    "truncated image": (lambda raw, pre: truncate(_p(raw, "imagesUnlabeled", "patient003_ED_0000.nii.gz"), 0.3),
                        [], ["patient003_ED_0000.nii.gz", "truncated", "nothing was written"]),
    "a 3 kB stub": (lambda raw, pre: truncate(_p(raw, "imagesUnlabeled", "patient003_ES_0000.nii.gz"), 0.05),
                    [], ["patient003_ES_0000.nii.gz", "truncated"]),
    "not gzip": (lambda raw, pre: gzip_garbage(_p(raw, "imagesUnlabeled", "patient003_ES_0000.nii.gz")), [],
                 ["patient003_ES_0000.nii.gz", "gzip"]),
    "4D image": (lambda raw, pre: make_4d(_p(raw, "imagesUnlabeled", "patient003_ED_0000.nii.gz"), 3), [],
                 ["patient003_ED_0000.nii.gz", "3 channels"]),
    "id also in imagesTr": (
        lambda raw, pre: shutil.copy(_p(raw, "imagesTr", "patient001_ED_0000.nii.gz"), _p(raw, "imagesUnlabeled")),
        [], ["'patient001_ED'", "labeled case"]),
    "id also in the preprocessed labeled folder": (
        lambda raw, pre: write_bytes(_p(pre, "nnUNetPlans_2d", "patient003_ED.pkl"), b"props"), [],
        ["'patient003_ED'", "labeled case"]),
    "badly named file": (lambda raw, pre: shutil.copy(_p(raw, "imagesUnlabeled", "patient003_ED_0000.nii.gz"),
                                                      _p(raw, "imagesUnlabeled", "scan.nii.gz")),
                         [], ["scan.nii.gz", "<case>_XXXX"]),
    "latin-1 plans": (lambda raw, pre: edit_bytes(_p(pre, "nnUNetPlans.json"), b"SimpleITKIO", b"Simple\xefTKIO"), [],
                      ["nnUNetPlans.json, line", "UTF-8"]),
    "truncated plans": (lambda raw, pre: truncate(_p(pre, "nnUNetPlans.json")), [],
                        ["nnUNetPlans.json", "not valid JSON"]),
    "zero processes": (lambda raw, pre: None, ["-np", "0"], ["-np", "0"]),
}


@pytest.mark.parametrize("case", sorted(UNLABELED_CASES))
def test_preprocess_unlabeled_bad_input(dataset, capsys, case):
    raw, pre = dataset
    _earlier_unlabeled_output(pre)
    damage, args, names = UNLABELED_CASES[case]
    damage(raw, pre)
    before = snapshot(pre)
    rc, _, err = run_main(capsys, ["preprocess-unlabeled", "-d", DATASET] + args)
    assert_user_error(rc, err, *names)
    assert snapshot(pre) == before
    assert not [n for n in os.listdir(pre) if n.startswith(".")]  # no temporary folder left behind


# ------------------------------------------------------------------------------------ convert-msd, convert-acdc
def _tiny_msd(root):
    """An MSD task folder: 3 one-channel cases, 4 slices of 6x5, labels 0..2 on the same grid."""
    src = os.path.join(root, "Task05_Tiny")
    rng = np.random.default_rng(0)
    for i in range(3):
        write_image(_p(src, "imagesTr", f"tiny_{i:02d}.nii.gz"), rng.normal(size=(4, 6, 5)).astype(np.float32))
        write_image(_p(src, "labelsTr", f"tiny_{i:02d}.nii.gz"), rng.integers(0, 3, (4, 6, 5)).astype(np.uint8))
    with open(_p(src, "dataset.json"), "w") as f:
        json.dump({"name": "Tiny", "modality": {"0": "MRI"}, "labels": {"0": "background", "1": "a", "2": "b"}}, f)
    return src


MSD_CASES = {
    "truncated image": (lambda src: truncate(_p(src, "imagesTr", "tiny_01.nii.gz")),
                        ["imagesTr/tiny_01.nii.gz", "truncated"]),
    "truncated label": (lambda src: truncate(_p(src, "labelsTr", "tiny_02.nii.gz")),
                        ["labelsTr/tiny_02.nii.gz", "truncated"]),
    "not gzip": (lambda src: gzip_garbage(_p(src, "imagesTr", "tiny_00.nii.gz")), ["tiny_00.nii.gz", "gzip"]),
    "4D image in a one-channel dataset": (lambda src: make_4d(_p(src, "imagesTr", "tiny_00.nii.gz")),
                                          ["imagesTr/tiny_00.nii.gz", "2 channels", "'modality'"]),
    "wrong label value": (lambda src: set_voxel(_p(src, "labelsTr", "tiny_01.nii.gz"), 9),
                          ["labelsTr/tiny_01.nii.gz", "[9]"]),
    "label on another grid": (lambda src: crop_one_slice(_p(src, "labelsTr", "tiny_02.nii.gz")),
                              ["labelsTr/tiny_02.nii.gz", "shape"]),
    "latin-1 dataset.json": (lambda src: edit_bytes(_p(src, "dataset.json"), b'"Tiny"', b'"T\xefny"'),
                             ["dataset.json, line 1", "UTF-8"]),
}


def _tiny_acdc(root):
    """ACDC layout: 2 patients with 3 frames of 3x8x8, ED = 1 and ES = 3 with ground truth."""
    src = os.path.join(root, "ACDC", "training")
    rng = np.random.default_rng(1)
    for p in (1, 2):
        d = _p(src, f"patient{p:03d}")
        os.makedirs(d)
        with open(_p(d, "Info.cfg"), "w") as f:
            f.write("ED: 1\nES: 3\nGroup: NOR\n")
        for fr in (1, 2, 3):
            write_image(_p(d, f"patient{p:03d}_frame{fr:02d}.nii.gz"), rng.normal(size=(3, 8, 8)).astype(np.float32))
        for fr in (1, 3):
            write_image(_p(d, f"patient{p:03d}_frame{fr:02d}_gt.nii.gz"),
                        rng.integers(0, 4, (3, 8, 8)).astype(np.uint8))
    return os.path.dirname(src)


ACDC_CASES = {
    "latin-1 Info.cfg": (lambda src: write_bytes(_p(src, "training", "patient002", "Info.cfg"),
                                                 b"ED: 1\nES: 3\nGroup: caf\xe9\n"),
                         ["patient002/Info.cfg, line 3", "0xe9", "UTF-8"]),
    "truncated frame": (lambda src: truncate(_p(src, "training", "patient001", "patient001_frame03.nii.gz")),
                        ["patient001_frame03.nii.gz", "truncated"]),
    "wrong label value": (lambda src: set_voxel(_p(src, "training", "patient002", "patient002_frame01_gt.nii.gz"), 5),
                          ["patient002_frame01_gt.nii.gz", "[5]"]),
    "label on another grid": (
        lambda src: crop_one_slice(_p(src, "training", "patient001", "patient001_frame01_gt.nii.gz")),
        ["patient001_frame01_gt.nii.gz", "shape"]),
    "4D frame": (lambda src: make_4d(_p(src, "training", "patient002", "patient002_frame03.nii.gz")),
                 ["patient002_frame03.nii.gz", "2 channels"]),
}


CONVERT_CASES = {("convert-msd", case): (_tiny_msd, "5", *v) for case, v in MSD_CASES.items()}
CONVERT_CASES.update({("convert-acdc", case): (_tiny_acdc, "27", *v) for case, v in ACDC_CASES.items()})


@pytest.mark.parametrize("command, case", sorted(CONVERT_CASES))
def test_convert_bad_input(nnunet_env, tmp_path, capsys, command, case):
    make_source, dataset_id, damage, names = CONVERT_CASES[command, case]
    src = make_source(str(tmp_path))
    rc, _, err = run_main(capsys, [command, src, "-d", dataset_id])
    assert rc == 0, err  # earlier output: the converted dataset, which a failed --overwrite must not touch
    before = snapshot(nnunet_env["nnUNet_raw"])
    damage(src)
    rc, _, err = run_main(capsys, [command, src, "-d", dataset_id, "--overwrite"])
    assert_user_error(rc, err, *names)
    assert snapshot(nnunet_env["nnUNet_raw"]) == before
    assert len(os.listdir(nnunet_env["nnUNet_raw"])) == 1  # no temporary folder left behind


def test_convert_acdc_accepts_info_cfg_with_byte_order_mark(nnunet_env, tmp_path, capsys):
    src = _tiny_acdc(str(tmp_path))
    prepend_bom(_p(src, "training", "patient001", "Info.cfg"))
    rc, _, err = run_main(capsys, ["convert-acdc", src, "-d", "27"])
    assert rc == 0, err


def test_preprocess_unlabeled_failing_case_keeps_the_previous_output(dataset, monkeypatch):
    """An unexpected failure on one case (here: made up) names the case, keeps its traceback as the cause and leaves
    the previous output as it was."""
    from nnunet_contrastive.prep import preprocess_unlabeled as pu

    raw, pre = dataset
    _earlier_unlabeled_output(pre)
    before = snapshot(pre)
    done = []

    def fake_case(files, out, *args):
        if done:
            raise IndexError("list index out of range")
        done.append(out)
        write_bytes(out + ".pkl", b"new")
        return (1, 2, 3)

    monkeypatch.setattr(pu, "preprocess_case", fake_case)
    with pytest.raises(RuntimeError, match=r"unlabeled case 'patient003_ES'.*patient003_ES_0000\.nii\.gz") as e:
        pu.preprocess_unlabeled(raw, pre, log=lambda *a: None)
    assert isinstance(e.value.__cause__, IndexError)
    assert snapshot(pre) == before
    assert not [n for n in os.listdir(pre) if n.startswith(".")]
