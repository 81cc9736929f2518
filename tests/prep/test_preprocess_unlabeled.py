"""preprocess-unlabeled: imagesUnlabeled/ preprocessed exactly like nnU-Net's labeled cases, loadable by nnU-Net."""
from __future__ import annotations

import os
import pickle
import shutil
import time

import numpy as np
import pytest

from nnunet_contrastive.cli import main
from nnunet_contrastive.prep.phantom import generate_phantom_dataset

DATASET = 990
NAME = f"Dataset{DATASET:03d}_Tiny"


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """Phantom (2 labeled + 1 unlabeled patient, 32x32) planned and preprocessed (2d) by nnU-Net's own CLI."""
    from nnunet_contrastive.prep import pipeline

    work = tmp_path_factory.mktemp("preprocess_unlabeled")
    folders = pipeline.nnunet_folders(str(work))
    with pytest.MonkeyPatch.context() as mp:
        for k, v in folders.items():
            mp.setenv(k, v)
        raw = generate_phantom_dataset(folders["nnUNet_raw"], DATASET, "Tiny", num_train_patients=2,
                                       num_test_patients=0, num_unlabeled_patients=1, size=32)
        t0 = time.time()
        # with --verify_dataset_integrity: nnU-Net ignores imagesUnlabeled/ and accepts the dataset
        pipeline.plan_and_preprocess(DATASET, pipeline.small_machine_env(), log=lambda *a: None)
        print(f"\nplan_and_preprocess: {time.time() - t0:.1f} s")
        yield {"raw": raw, "pre": os.path.join(folders["nnUNet_preprocessed"], NAME)}


def _load(folder, case):
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2

    data, seg, _, props = nnUNetDatasetBlosc2(folder, [case]).load_case(case)
    return np.asarray(data[:]), np.asarray(seg[:]), props


def _managers(pre):
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    pm = PlansManager(os.path.join(pre, "nnUNetPlans.json"))
    return pm, pm.get_configuration("2d")


@pytest.mark.slow
def test_preprocess_unlabeled_writes_loadable_cases(prepared, capsys):
    from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class, nnUNetDatasetBlosc2

    pre = prepared["pre"]
    t0 = time.time()
    rc = main(["preprocess-unlabeled", "-d", str(DATASET)])
    out, err = capsys.readouterr()
    print(f"preprocess-unlabeled (2 cases): {time.time() - t0:.1f} s")
    assert rc == 0, err
    folder = os.path.join(pre, "nnUNetPlans_2d_unlabeled")
    assert f"wrote 2 unlabeled case(s) to {folder}" in out
    assert sorted(os.listdir(folder)) == sorted(f"patient003_{p}{s}" for p in ("ED", "ES")
                                                for s in (".b2nd", "_seg.b2nd", ".pkl"))
    assert infer_dataset_class(folder) is nnUNetDatasetBlosc2
    _, _, ref_props = _load(os.path.join(pre, "nnUNetPlans_2d"), "patient001_ED")
    pm, cm = _managers(pre)
    for case in ("patient003_ED", "patient003_ES"):
        data, seg, props = _load(folder, case)
        assert data.dtype == np.float32 and seg.dtype == np.int16
        assert data.shape[0] == 1 and seg.shape == data.shape
        assert props["unlabeled"] is True
        assert props["spacing"] == ref_props["spacing"]  # same spacing as the labeled cases
        assert set(np.unique(seg).tolist()) <= {-1, 0}  # nonzero mask only, never a label
        assert props["class_locations"] == {1: [], 2: [], 3: []}
        # normalised like the labeled cases (ZScore per case: mean 0, std 1 over the image)
        assert abs(float(data.mean())) < 1e-3 and abs(float(data.std()) - 1) < 1e-2
    # nnU-Net's own 2d loader samples from them unchanged (random and forced-foreground patches)
    ds = nnUNetDatasetBlosc2(folder)
    assert sorted(ds.identifiers) == ["patient003_ED", "patient003_ES"]
    loader = nnUNetDataLoader(ds, 4, cm.patch_size, cm.patch_size, pm.get_label_manager(_dataset_json(pre)),
                              oversample_foreground_percent=0.5)
    batch = next(loader)
    assert tuple(batch["data"].shape) == (4, 1, *cm.patch_size)
    assert set(batch["keys"]) <= {"patient003_ED", "patient003_ES"}


def _dataset_json(pre):
    import json

    with open(os.path.join(pre, "dataset.json")) as f:
        return json.load(f)


@pytest.mark.slow
def test_same_image_preprocessed_both_ways_is_identical(prepared, tmp_path):
    """A labeled image run through our path equals what nnU-Net wrote for it (data, mask, geometry)."""
    from nnunet_contrastive.prep.preprocess_unlabeled import preprocess_case

    pre, raw = prepared["pre"], prepared["raw"]
    pm, cm = _managers(pre)
    for case in ("patient001_ED", "patient002_ES"):
        out = str(tmp_path / case)
        preprocess_case([os.path.join(raw, "imagesTr", f"{case}_0000.nii.gz")], out, pm, cm, _dataset_json(pre))
        data, seg, props = _load(str(tmp_path), case)
        ref_data, ref_seg, ref_props = _load(os.path.join(pre, "nnUNetPlans_2d"), case)
        np.testing.assert_array_equal(data, ref_data)
        np.testing.assert_array_equal(seg < 0, ref_seg < 0)  # same nonzero mask
        assert (seg >= 0).any() and (ref_seg > 0).any()  # the labeled one has labels, ours has none
        assert set(np.unique(seg).tolist()) <= {-1, 0}
        for key in ("spacing", "shape_before_cropping", "shape_after_cropping_and_before_resampling"):
            assert tuple(props[key]) == tuple(ref_props[key]), key
        assert np.array_equal(np.asarray(props["bbox_used_for_cropping"]),
                              np.asarray(ref_props["bbox_used_for_cropping"]))
        assert props["sitk_stuff"] == ref_props["sitk_stuff"]


@pytest.mark.slow
def test_preprocess_unlabeled_parallel_matches_and_replaces_stale(prepared):
    from nnunet_contrastive.prep.preprocess_unlabeled import preprocess_unlabeled

    pre, raw = prepared["pre"], prepared["raw"]
    folder = os.path.join(pre, "nnUNetPlans_2d_unlabeled")
    first = preprocess_unlabeled(raw, pre, num_processes=1, log=lambda *a: None)
    ref = {c: _load(folder, c)[:2] for c in first.cases}
    shutil.copy(os.path.join(folder, "patient003_ED.pkl"), os.path.join(folder, "stale_case.pkl"))
    t0 = time.time()
    res = preprocess_unlabeled(raw, pre, num_processes=2, log=lambda *a: None)
    print(f"\npreprocess_unlabeled -np 2: {time.time() - t0:.1f} s")
    assert res.cases == first.cases and not os.path.exists(os.path.join(folder, "stale_case.pkl"))
    for c, (data, seg) in ref.items():
        d2, s2, _ = _load(folder, c)
        np.testing.assert_array_equal(d2, data)
        np.testing.assert_array_equal(s2, seg)


@pytest.mark.slow
def test_preprocess_unlabeled_bad_image_keeps_the_previous_output(prepared, capsys):
    from bad_input import snapshot, truncate

    assert main(["preprocess-unlabeled", "-d", str(DATASET)]) == 0
    before = snapshot(prepared["pre"])
    image = os.path.join(prepared["raw"], "imagesUnlabeled", "patient003_ES_0000.nii.gz")
    with open(image, "rb") as f:
        intact = f.read()
    try:
        truncate(image)
        capsys.readouterr()
        assert main(["preprocess-unlabeled", "-d", str(DATASET)]) == 1
        err = capsys.readouterr().err
        assert "patient003_ES_0000.nii.gz" in err and "truncated" in err
        assert snapshot(prepared["pre"]) == before
    finally:
        with open(image, "wb") as f:
            f.write(intact)


@pytest.mark.slow
def test_preprocess_unlabeled_errors(prepared, capsys):
    rc = main(["preprocess-unlabeled", "-d", str(DATASET), "-p", "nnUNetPlansMissing"])
    err = capsys.readouterr().err
    assert rc == 1 and "nnUNetPlansMissing.json not found" in err and "nnUNetv2_plan_and_preprocess" in err
    rc = main(["preprocess-unlabeled", "-d", str(DATASET), "-c", "3d_lowres"])
    err = capsys.readouterr().err
    assert rc == 1 and "no configuration '3d_lowres'" in err and "2d" in err
    unl = os.path.join(prepared["raw"], "imagesUnlabeled")
    moved = unl + "_away"
    os.rename(unl, moved)
    try:
        rc = main(["preprocess-unlabeled", "-d", str(DATASET)])
        err = capsys.readouterr().err
        assert rc == 1 and "imagesUnlabeled is missing or holds no images" in err
    finally:
        os.rename(moved, unl)


def test_preprocess_unlabeled_without_plans(nnunet_env, capsys):
    generate_phantom_dataset(nnunet_env["nnUNet_raw"], DATASET, "Tiny", num_train_patients=1, num_test_patients=0,
                             num_unlabeled_patients=1, size=32)
    os.makedirs(os.path.join(nnunet_env["nnUNet_preprocessed"], NAME))
    rc = main(["preprocess-unlabeled", "-d", str(DATASET)])
    err = capsys.readouterr().err
    assert rc == 1 and "nnUNetPlans.json not found" in err and f"nnUNetv2_plan_and_preprocess -d {NAME}" in err


def test_empty_class_locations_keys():
    """class_locations written for unlabeled cases has nnU-Net's keys (and the ignore key when there is one)."""
    from nnunet_contrastive.prep.preprocess_unlabeled import empty_class_locations
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    pm = PlansManager({"dataset_name": "x", "plans_name": "p", "configurations": {}, "transpose_forward": [0, 1, 2],
                       "transpose_backward": [0, 1, 2], "image_reader_writer": "SimpleITKIO",
                       "label_manager": "LabelManager", "original_median_spacing_after_transp": [1, 1, 1],
                       "original_median_shape_after_transp": [1, 1, 1], "experiment_planner_used": "x",
                       "foreground_intensity_properties_per_channel": {}})
    assert empty_class_locations(pm, {"labels": {"background": 0, "a": 1, "b": 2}}) == {1: [], 2: []}
    with_ignore = empty_class_locations(pm, {"labels": {"background": 0, "a": 1, "ignore": 2}})
    assert with_ignore == {1: [], (-1, 0, 1): []}
    pickle.dumps(with_ignore)
