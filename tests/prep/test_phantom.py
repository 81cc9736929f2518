"""Cardiac phantom: determinism, nnU-Net raw layout, metadata, and anatomy/intensity invariants of the volumes."""
import csv
import json
import os

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_contrastive.prep.phantom import generate_phantom_dataset

RV, MYO, LV = 1, 2, 3  # ACDC convention, checked against dataset.json below


def _read(path):
    return sitk.GetArrayFromImage(sitk.ReadImage(path))


def _gen(root, **kw):
    args = dict(num_train_patients=2, num_test_patients=1, num_unlabeled_patients=0, size=32, seed=0)
    args.update(kw)
    return generate_phantom_dataset(str(root), **args)


def _case_files(folder):
    out = {}
    for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs", "imagesUnlabeled"):
        d = os.path.join(folder, sub)
        if os.path.isdir(d):
            for f in sorted(os.listdir(d)):
                out[f"{sub}/{f}"] = os.path.join(d, f)
    return out


def _csv_rows(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.reader(f))


# ------------------------------------------------------------------------------------------------------ layout
def test_layout_dataset_json_and_metadata(tmp_path):
    folder = _gen(tmp_path, dataset_id=7, name="Heart", num_train_patients=2, num_test_patients=1,
                  num_unlabeled_patients=2)
    assert folder == os.path.join(str(tmp_path), "Dataset007_Heart")
    tr = ["patient001_ED", "patient001_ES", "patient002_ED", "patient002_ES"]
    ts = ["patient003_ED", "patient003_ES"]
    unl = ["patient004_ED", "patient004_ES", "patient005_ED", "patient005_ES"]
    assert sorted(os.listdir(os.path.join(folder, "imagesTr"))) == [f"{c}_0000.nii.gz" for c in tr]
    assert sorted(os.listdir(os.path.join(folder, "labelsTr"))) == [f"{c}.nii.gz" for c in tr]
    assert sorted(os.listdir(os.path.join(folder, "imagesTs"))) == [f"{c}_0000.nii.gz" for c in ts]
    assert sorted(os.listdir(os.path.join(folder, "labelsTs"))) == [f"{c}.nii.gz" for c in ts]
    assert sorted(os.listdir(os.path.join(folder, "imagesUnlabeled"))) == [f"{c}_0000.nii.gz" for c in unl]
    assert not os.path.exists(os.path.join(folder, "labelsUnlabeled"))

    with open(os.path.join(folder, "dataset.json")) as f:
        dj = json.load(f)
    assert dj["numTraining"] == len(tr)
    assert dj["file_ending"] == ".nii.gz"
    assert dj["channel_names"] == {"0": dj["channel_names"]["0"]} and dj["channel_names"]["0"]
    assert dj["labels"] == {"background": 0, "RV": RV, "MYO": MYO, "LV": LV}
    assert dj["meta_labels"] == ["patient", "phase"]

    rows = _csv_rows(os.path.join(folder, "metadata.csv"))
    assert rows[0] == ["case", "patient", "phase"]
    assert sorted(map(tuple, rows[1:])) == sorted((c, c.split("_")[0], c.split("_")[1]) for c in tr + unl)
    rows_ts = _csv_rows(os.path.join(folder, "metadata_Ts.csv"))
    assert rows_ts[0] == ["case", "patient", "phase"]
    assert sorted(map(tuple, rows_ts[1:])) == sorted((c, c.split("_")[0], c.split("_")[1]) for c in ts)


def test_metadata_reads_back_and_matches_images(tmp_path):
    from nnunet_contrastive.data.metadata import read_metadata, validate_against_cases

    folder = _gen(tmp_path, num_unlabeled_patients=1)
    with open(os.path.join(folder, "dataset.json")) as f:
        table = read_metadata(folder, json.load(f))
    labeled = [f[: -len("_0000.nii.gz")] for f in os.listdir(os.path.join(folder, "imagesTr"))]
    unlabeled = [f[: -len("_0000.nii.gz")] for f in os.listdir(os.path.join(folder, "imagesUnlabeled"))]
    assert validate_against_cases(table, labeled, unlabeled) == []
    assert table.value("patient002_ES", "patient") == "patient002"
    assert table.value("patient002_ES", "phase") == "ES"


def test_no_test_or_unlabeled_folders_when_not_requested(tmp_path):
    folder = _gen(tmp_path, num_train_patients=1, num_test_patients=0, num_unlabeled_patients=0)
    assert sorted(os.listdir(folder)) == ["dataset.json", "imagesTr", "labelsTr", "metadata.csv"]


def test_image_and_label_geometry(tmp_path):
    folder = _gen(tmp_path, num_train_patients=1, num_test_patients=0, size=40, spacing_xyz=(1.25, 1.5, 9.0))
    for case in ("patient001_ED", "patient001_ES"):
        img = sitk.ReadImage(os.path.join(folder, "imagesTr", f"{case}_0000.nii.gz"))
        seg = sitk.ReadImage(os.path.join(folder, "labelsTr", f"{case}.nii.gz"))
        assert img.GetSpacing() == pytest.approx((1.25, 1.5, 9.0))
        assert seg.GetSpacing() == pytest.approx(img.GetSpacing())
        assert img.GetSize() == seg.GetSize()
        assert img.GetSize()[:2] == (40, 40)
        assert np.issubdtype(sitk.GetArrayFromImage(seg).dtype, np.integer)
    # both phases of one patient have the same number of slices
    ed = _read(os.path.join(folder, "labelsTr", "patient001_ED.nii.gz"))
    es = _read(os.path.join(folder, "labelsTr", "patient001_ES.nii.gz"))
    assert ed.shape == es.shape


# ------------------------------------------------------------------------------------------------- determinism
def test_same_seed_same_files(tmp_path):
    a = _gen(tmp_path / "a", num_unlabeled_patients=1, seed=5)
    b = _gen(tmp_path / "b", num_unlabeled_patients=1, seed=5)
    fa, fb = _case_files(a), _case_files(b)
    assert list(fa) == list(fb) and len(fa) == 2 * 2 * 2 + 1 * 2 * 2 + 1 * 2  # Tr img+lab, Ts img+lab, Unlabeled img
    for key in fa:
        np.testing.assert_array_equal(_read(fa[key]), _read(fb[key]), err_msg=key)
    for name in ("dataset.json", "metadata.csv", "metadata_Ts.csv"):
        assert open(os.path.join(a, name)).read() == open(os.path.join(b, name)).read()


def test_adding_patients_keeps_earlier_patients(tmp_path):
    small = _gen(tmp_path / "small", num_train_patients=1, num_test_patients=1, seed=3)
    large = _gen(tmp_path / "large", num_train_patients=3, num_test_patients=1, seed=3)
    # patient001 trains in both; patient002 is a test patient in `small` and a training patient in `large`
    for case in ("patient001_ED", "patient001_ES"):
        for sub, name in (("imagesTr", f"{case}_0000.nii.gz"), ("labelsTr", f"{case}.nii.gz")):
            np.testing.assert_array_equal(_read(os.path.join(small, sub, name)), _read(os.path.join(large, sub, name)))
    for case in ("patient002_ED", "patient002_ES"):
        np.testing.assert_array_equal(_read(os.path.join(small, "imagesTs", f"{case}_0000.nii.gz")),
                                      _read(os.path.join(large, "imagesTr", f"{case}_0000.nii.gz")))
        np.testing.assert_array_equal(_read(os.path.join(small, "labelsTs", f"{case}.nii.gz")),
                                      _read(os.path.join(large, "labelsTr", f"{case}.nii.gz")))


def test_different_seed_different_data(tmp_path):
    a = _gen(tmp_path / "a", num_train_patients=1, num_test_patients=0, seed=0)
    b = _gen(tmp_path / "b", num_train_patients=1, num_test_patients=0, seed=1)
    for sub, name in (("imagesTr", "patient001_ED_0000.nii.gz"), ("labelsTr", "patient001_ED.nii.gz")):
        x, y = _read(os.path.join(a, sub, name)), _read(os.path.join(b, sub, name))
        assert x.shape != y.shape or not np.array_equal(x, y), sub


def test_patients_differ_from_each_other(tmp_path):
    folder = _gen(tmp_path, num_train_patients=2, num_test_patients=0)
    x = _read(os.path.join(folder, "labelsTr", "patient001_ED.nii.gz"))
    y = _read(os.path.join(folder, "labelsTr", "patient002_ED.nii.gz"))
    assert x.shape != y.shape or not np.array_equal(x, y)


# ------------------------------------------------------------------------------------------- anatomy invariants
def _volumes(folder, split="Tr"):
    """patient -> phase -> (image, label), arrays (z, y, x)."""
    out = {}
    for f in sorted(os.listdir(os.path.join(folder, f"labels{split}"))):
        case = f[: -len(".nii.gz")]
        patient, phase = case.split("_")
        out.setdefault(patient, {})[phase] = (_read(os.path.join(folder, f"images{split}", f"{case}_0000.nii.gz")),
                                              _read(os.path.join(folder, f"labels{split}", f)))
    return out


@pytest.fixture(scope="module", params=[(32, 0), (48, 1), (40, 7)], ids=lambda p: f"size{p[0]}-seed{p[1]}")
def cohort(request, tmp_path_factory):
    size, seed = request.param
    folder = generate_phantom_dataset(str(tmp_path_factory.mktemp("cohort")), num_train_patients=4,
                                      num_test_patients=1, size=size, seed=seed)
    vols = _volumes(folder, "Tr")
    vols.update(_volumes(folder, "Ts"))
    assert len(vols) == 5
    return vols


def test_slices_and_label_values(cohort):
    for patient, phases in cohort.items():
        assert set(phases) == {"ED", "ES"}
        for phase, (img, lab) in phases.items():
            assert 8 <= lab.shape[0] <= 12, (patient, phase, lab.shape)
            assert img.shape == lab.shape
            assert set(np.unique(lab).tolist()) <= {0, RV, MYO, LV}
            for z in range(lab.shape[0]):  # every slice shows LV and myocardium
                assert (lab[z] == LV).any() and (lab[z] == MYO).any(), (patient, phase, z)


def test_lv_enclosed_by_myocardium(cohort):
    for patient, phases in cohort.items():
        for phase, (_, lab) in phases.items():
            for z in range(lab.shape[0]):
                s = lab[z]
                lv = s == LV
                # labels padded with background: an LV pixel on the image border fails too
                pad = np.pad(s, 1)
                neighbours = [pad[:-2, 1:-1], pad[2:, 1:-1], pad[1:-1, :-2], pad[1:-1, 2:]]
                for nb in neighbours:
                    assert np.isin(nb[lv], (LV, MYO)).all(), (patient, phase, z)


def test_lv_larger_at_ed_than_es_on_every_slice(cohort):
    for patient, phases in cohort.items():
        ed, es = phases["ED"][1], phases["ES"][1]
        for z in range(ed.shape[0]):
            assert (ed[z] == LV).sum() > (es[z] == LV).sum(), (patient, z)


def test_heart_shrinks_from_base_to_apex(cohort):
    for patient, phases in cohort.items():
        for phase, (_, lab) in phases.items():
            area = ((lab == LV) | (lab == MYO)).sum(axis=(1, 2))
            assert area[0] > area[-1], (patient, phase, area.tolist())
            rv = (lab == RV).sum(axis=(1, 2))
            assert rv[0] > 0, (patient, phase)  # the RV is seen at the base
            assert rv[-1] < rv[0], (patient, phase, rv.tolist())


def test_contrast_and_noise(cohort):
    for patient, phases in cohort.items():
        for phase, (img, lab) in phases.items():
            lv_mean, myo_mean = img[lab == LV].mean(), img[lab == MYO].mean()
            assert lv_mean > 1.5 * myo_mean, (patient, phase, lv_mean, myo_mean)
            assert img[lab == RV].mean() > myo_mean
            for cls in (LV, MYO):
                assert img[lab == cls].std() > 0, (patient, phase, cls)
            # noise, not only the smooth bias: neighbouring LV pixels differ
            lv0 = lab[0] == LV
            assert np.unique(img[0][lv0]).size > lv0.sum() // 2


# ------------------------------------------------------------------------------------------------- bad arguments
@pytest.mark.parametrize("kw, word", [({"num_train_patients": 0}, "num_train_patients"),
                                      ({"size": 31}, "size")])
def test_bad_arguments(tmp_path, kw, word):
    with pytest.raises(ValueError) as e:
        _gen(tmp_path, **kw)
    assert word in str(e.value) and str(list(kw.values())[0]) in str(e.value)
    assert not os.listdir(tmp_path)  # nothing written


def test_bad_phase():
    from nnunet_contrastive.prep.phantom import render_volume, sample_anatomy

    anat = sample_anatomy(np.random.default_rng(0), 32)
    with pytest.raises(ValueError, match="phase must be one of.*'MID'"):
        render_volume(anat, "MID", 32, np.random.default_rng(0))
