"""convert-msd / convert-acdc: layouts, file names, labels, dataset.json, metadata, and errors naming the item."""
from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_contrastive.cli import main
from nnunet_contrastive.prep.converters import ConversionError, default_msd_name, plan_acdc, plan_msd
from nnunet_contrastive.prep.dataset_check import check_dataset
from nnunet_contrastive.data.metadata import read_metadata


def _write(path, array_zyx, spacing=(1.25, 1.25, 5.0), origin=(0.0, 0.0, 0.0)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    img = sitk.GetImageFromArray(np.asarray(array_zyx))
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    sitk.WriteImage(img, path, useCompression=True)


def _read(path):
    return sitk.GetArrayFromImage(sitk.ReadImage(path))


def _run(argv, capsys):
    rc = main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


# ---------------------------------------------------------------------------------------------- MSD: real data
def test_convert_msd_hippocampus(hippocampus_dir, nnunet_env, capsys):
    rc, out, err = _run(["convert-msd", hippocampus_dir, "-d", "4"], capsys)
    assert rc == 0, err
    target = os.path.join(nnunet_env["nnUNet_raw"], "Dataset004_Hippocampus")
    assert "one volume per subject" in out and target in out
    src_cases = sorted(f[:-7] for f in os.listdir(os.path.join(hippocampus_dir, "imagesTr"))
                       if f.endswith(".nii.gz") and not f.startswith("."))
    assert len(src_cases) == 200
    assert sorted(os.listdir(os.path.join(target, "imagesTr"))) == [f"{c}_0000.nii.gz" for c in src_cases]
    assert sorted(os.listdir(os.path.join(target, "labelsTr"))) == [f"{c}.nii.gz" for c in src_cases]
    assert not os.path.exists(os.path.join(target, "imagesTs"))
    with open(os.path.join(target, "dataset.json")) as f:
        dj = json.load(f)
    assert dj["channel_names"] == {"0": "MRI"}
    assert dj["labels"] == {"background": 0, "Anterior": 1, "Posterior": 2}
    assert dj["numTraining"] == 200 and dj["file_ending"] == ".nii.gz" and dj["meta_labels"] == ["patient"]
    table = read_metadata(target, dj)
    assert table.cases == src_cases and table.columns == ["patient"]
    assert all(table.value(c, "patient") == c for c in src_cases)
    # images and labels are the source files, byte for byte; label values are the MSD ones
    seen = set()
    for case in src_cases[:: 40]:
        for sub, name in (("imagesTr", f"{case}_0000.nii.gz"), ("labelsTr", f"{case}.nii.gz")):
            with open(os.path.join(hippocampus_dir, sub, f"{case}.nii.gz"), "rb") as a, \
                    open(os.path.join(target, sub, name), "rb") as b:
                assert a.read() == b.read()
        seen |= set(np.unique(_read(os.path.join(target, "labelsTr", f"{case}.nii.gz"))).tolist())
    assert seen == {0, 1, 2}
    report = check_dataset(target)
    assert report.ok, report.errors
    assert len(report.labeled) == 200 and report.unlabeled == []


# ---------------------------------------------------------------------------------------------- MSD: tiny
def _tiny_msd(root, n_train=3, n_test=1, channels=("T2", "ADC"), junk=True):
    """An MSD-like task folder; multi-channel images as 4D files. Returns (folder, {case: channel arrays})."""
    src = os.path.join(root, "Task05_Prostate")
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n, offset in (("Tr", n_train, 0), ("Ts", n_test, 100)):
        for i in range(n):
            case = f"prostate_{offset + i:02d}"
            chans = [rng.normal(size=(3, 6, 5)).astype(np.float32) + 10 * c for c in range(len(channels))]
            arrays[case] = chans
            path = os.path.join(src, f"images{split}", f"{case}.nii.gz")
            os.makedirs(os.path.dirname(path), exist_ok=True)
            if len(channels) == 1:  # the label's grid (nnU-Net and the converter require one grid)
                _write(path, chans[0], spacing=(0.6, 0.6, 3.6), origin=(-10.0, 5.0, 2.0))
            else:
                imgs = []
                for a in chans:
                    im = sitk.GetImageFromArray(a)
                    im.SetSpacing((0.6, 0.6, 3.6))
                    im.SetOrigin((-10.0, 5.0, 2.0))
                    imgs.append(im)
                sitk.WriteImage(sitk.JoinSeries(imgs), path, useCompression=True)
            if split == "Tr":
                _write(os.path.join(src, "labelsTr", f"{case}.nii.gz"),
                       rng.integers(0, 3, size=(3, 6, 5)).astype(np.uint8), spacing=(0.6, 0.6, 3.6),
                       origin=(-10.0, 5.0, 2.0))
    if junk:  # macOS resource forks and Finder files, as found in the MSD tarballs
        for sub in ("imagesTr", "labelsTr", "imagesTs"):
            with open(os.path.join(src, sub, "._prostate_00.nii.gz"), "wb") as f:
                f.write(b"\x00\x05\x16\x07junk")
            with open(os.path.join(src, sub, ".DS_Store"), "wb") as f:
                f.write(b"junk")
    with open(os.path.join(src, "dataset.json"), "w") as f:
        json.dump({"name": "PROSTATE", "modality": {str(i): c for i, c in enumerate(channels)},
                   "labels": {"0": "background", "1": "PZ", "2": "TZ"}, "numTraining": n_train,
                   "training": [], "test": []}, f)
    return src, arrays


def test_convert_msd_tiny_multimodal_splits_channels(tmp_path, nnunet_env, capsys):
    src, arrays = _tiny_msd(str(tmp_path))
    assert default_msd_name(src) == "Prostate"
    rc, out, err = _run(["convert-msd", src, "-d", "5"], capsys)
    assert rc == 0, err
    target = os.path.join(nnunet_env["nnUNet_raw"], "Dataset005_Prostate")
    assert sorted(os.listdir(os.path.join(target, "imagesTr"))) == [
        f"prostate_0{i}_000{c}.nii.gz" for i in range(3) for c in range(2)]
    assert sorted(os.listdir(os.path.join(target, "imagesTs"))) == ["prostate_100_0000.nii.gz",
                                                                     "prostate_100_0001.nii.gz"]
    assert sorted(os.listdir(os.path.join(target, "labelsTr"))) == [f"prostate_0{i}.nii.gz" for i in range(3)]
    for case, chans in arrays.items():
        split = "Ts" if case == "prostate_100" else "Tr"
        for c, expected in enumerate(chans):
            img = sitk.ReadImage(os.path.join(target, f"images{split}", f"{case}_{c:04d}.nii.gz"))
            assert img.GetDimension() == 3
            np.testing.assert_array_equal(sitk.GetArrayFromImage(img), expected)
            assert img.GetSpacing() == pytest.approx((0.6, 0.6, 3.6))
            assert img.GetOrigin() == pytest.approx((-10.0, 5.0, 2.0))
            if split == "Tr":  # same geometry as the label, as nnU-Net requires
                lab = sitk.ReadImage(os.path.join(target, "labelsTr", f"{case}.nii.gz"))
                assert lab.GetSpacing() == pytest.approx(img.GetSpacing())
                assert lab.GetOrigin() == pytest.approx(img.GetOrigin())
    with open(os.path.join(target, "dataset.json")) as f:
        dj = json.load(f)
    assert dj["channel_names"] == {"0": "T2", "1": "ADC"}
    assert dj["labels"] == {"background": 0, "PZ": 1, "TZ": 2}
    assert dj["numTraining"] == 3
    assert read_metadata(target, dj).cases == ["prostate_00", "prostate_01", "prostate_02"]
    assert read_metadata(os.path.join(target, "metadata_Ts.csv")).cases == ["prostate_100"]
    assert check_dataset(target).ok


def test_convert_msd_name_copy_and_overwrite(tmp_path, nnunet_env, capsys):
    src, _ = _tiny_msd(str(tmp_path), n_test=0, channels=("CT",), junk=False)
    args = ["convert-msd", src, "-d", "7", "--name", "Mini"]
    rc, _, err = _run(args, capsys)
    assert rc == 0, err
    target = os.path.join(nnunet_env["nnUNet_raw"], "Dataset007_Mini")
    a = os.path.join(src, "imagesTr", "prostate_00.nii.gz")
    b = os.path.join(target, "imagesTr", "prostate_00_0000.nii.gz")
    assert os.stat(a).st_ino != os.stat(b).st_ino  # default: a copy, never a hard link into the source
    # the target exists: refused, with the way out named
    rc, _, err = _run(args, capsys)
    assert rc == 1 and "Dataset007_Mini already exists" in err and "--overwrite" in err
    with open(os.path.join(target, "stale.txt"), "w") as f:
        f.write("x")
    rc, _, err = _run(args + ["--overwrite"], capsys)
    assert rc == 0, err
    assert not os.path.exists(os.path.join(target, "stale.txt"))
    # --link: a hard link to the source (same file system here)
    rc, _, err = _run(args + ["--overwrite", "--link"], capsys)
    assert rc == 0, err
    assert os.stat(a).st_ino == os.stat(b).st_ino
    # another dataset already has this id
    rc, _, err = _run(["convert-msd", src, "-d", "7", "--name", "Other"], capsys)
    assert rc == 1 and "id 7 is already used" in err and "Dataset007_Mini" in err
    # nothing half-written is left behind
    assert sorted(os.listdir(nnunet_env["nnUNet_raw"])) == ["Dataset007_Mini"]


def test_convert_msd_errors_name_the_item(tmp_path, nnunet_env, capsys):
    src, _ = _tiny_msd(str(tmp_path), n_test=0, channels=("CT",), junk=False)
    os.remove(os.path.join(src, "labelsTr", "prostate_01.nii.gz"))
    rc, _, err = _run(["convert-msd", src, "-d", "8"], capsys)
    assert rc == 1
    assert "prostate_01.nii.gz has no label" in err and "labelsTr/prostate_01.nii.gz" in err
    assert os.listdir(nnunet_env["nnUNet_raw"]) == []  # nothing written
    # duplicate case id (.nii next to .nii.gz)
    _write(os.path.join(src, "labelsTr", "prostate_01.nii.gz"), np.zeros((3, 6, 5), np.uint8), spacing=(0.6, 0.6, 3.6),
           origin=(-10.0, 5.0, 2.0))
    _write(os.path.join(src, "imagesTr", "prostate_02.nii"), np.zeros((3, 6, 5), np.float32))
    with pytest.raises(ConversionError, match=r"duplicate case id 'prostate_02'.*prostate_02\.nii"):
        plan_msd(src)
    os.remove(os.path.join(src, "imagesTr", "prostate_02.nii"))
    plan_msd(src)  # fixed
    os.remove(os.path.join(src, "dataset.json"))
    with pytest.raises(ConversionError, match="dataset.json is missing"):
        plan_msd(src)
    with pytest.raises(ConversionError, match="no 'imagesTr/'"):
        plan_msd(str(tmp_path))
    # an nnU-Net v2 raw folder given by mistake
    for name in os.listdir(os.path.join(src, "imagesTr")):
        os.rename(os.path.join(src, "imagesTr", name), os.path.join(src, "imagesTr", name[:-7] + "_0000.nii.gz"))
    with open(os.path.join(src, "dataset.json"), "w") as f:
        json.dump({"modality": {"0": "CT"}, "labels": {"0": "background"}}, f)
    with pytest.raises(ConversionError, match="looks like an nnU-Net raw dataset already"):
        plan_msd(src)


def test_convert_needs_nnunet_raw(tmp_path, monkeypatch, capsys):
    src, _ = _tiny_msd(str(tmp_path), n_test=0, channels=("CT",), junk=False)
    monkeypatch.delenv("nnUNet_raw", raising=False)
    rc, _, err = _run(["convert-msd", src, "-d", "5"], capsys)
    assert rc == 1 and "nnUNet_raw is not set" in err
    rc, _, err = _run(["convert-msd", src, "-d", "1000"], capsys)
    assert rc == 1 and "1 to 999" in err


def test_convert_msd_multimodal_needs_4d_images(tmp_path, nnunet_env):
    from nnunet_contrastive.prep.converters import convert_msd

    src, _ = _tiny_msd(str(tmp_path), n_test=0, channels=("T2",), junk=False)
    with open(os.path.join(src, "dataset.json")) as f:
        dj = json.load(f)
    dj["modality"] = {"0": "T2", "1": "ADC"}  # claims 2 channels, files are 3D
    with open(os.path.join(src, "dataset.json"), "w") as f:
        json.dump(dj, f)
    with pytest.raises(ConversionError, match=r"prostate_00\.nii\.gz: expected a 4D image with 2 channels"):
        convert_msd(src, 9)
    assert os.listdir(nnunet_env["nnUNet_raw"]) == []  # the partial folder was removed


# ---------------------------------------------------------------------------------------------- ACDC
def _acdc_patient(folder, patient, n_frames, ed, es, gt=True, group="DCM", info=None):
    d = os.path.join(folder, patient)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "Info.cfg"), "w") as f:
        f.write(info if info is not None else
                f"ED: {ed}\nES: {es}\n" + (f"Group: {group}\n" if group else "") + "Height: 180.0\n"
                f"NbFrame: {n_frames}\nWeight: 80.0\n")
    rng = np.random.default_rng(int(patient[-3:]))
    for fr in range(1, n_frames + 1):
        _write(os.path.join(d, f"{patient}_frame{fr:02d}.nii.gz"), rng.normal(size=(2, 8, 7)).astype(np.float32))
        if gt and fr in (ed, es):
            lab = np.zeros((2, 8, 7), np.uint8)
            lab[0, 2:5, 2:5] = 3
            lab[1, 1:3, 1:6] = 2
            lab[1, 5, 3] = 1
            _write(os.path.join(d, f"{patient}_frame{fr:02d}_gt.nii.gz"), lab)
    _write(os.path.join(d, f"{patient}_4d.nii.gz"), np.zeros((n_frames, 2, 8, 7), np.float32)[..., 0])
    with open(os.path.join(d, f"._{patient}_frame01.nii.gz"), "wb") as f:
        f.write(b"\x00\x05junk")
    return d


def _acdc(root):
    src = os.path.join(root, "ACDC", "database")
    _acdc_patient(os.path.join(src, "training"), "patient001", 4, ed=1, es=3, group="DCM")
    _acdc_patient(os.path.join(src, "training"), "patient002", 5, ed=2, es=4, group="NOR")  # ED is not frame 01
    _acdc_patient(os.path.join(src, "testing"), "patient101", 3, ed=1, es=2, gt=False, group="MINF")
    return src


def test_convert_acdc_cases_patients_phases(tmp_path, nnunet_env, capsys):
    src = _acdc(str(tmp_path))
    rc, out, err = _run(["convert-acdc", os.path.dirname(src), "-d", "27"], capsys)
    assert rc == 0, err
    target = os.path.join(nnunet_env["nnUNet_raw"], "Dataset027_ACDC")
    labeled = ["patient001_frame01", "patient001_frame03", "patient002_frame02", "patient002_frame04"]
    unlabeled = ["patient101_frame01", "patient101_frame02"]
    assert sorted(os.listdir(os.path.join(target, "imagesTr"))) == [f"{c}_0000.nii.gz" for c in labeled]
    assert sorted(os.listdir(os.path.join(target, "labelsTr"))) == [f"{c}.nii.gz" for c in labeled]
    assert sorted(os.listdir(os.path.join(target, "imagesUnlabeled"))) == [f"{c}_0000.nii.gz" for c in unlabeled]
    assert not os.path.exists(os.path.join(target, "labelsUnlabeled"))
    with open(os.path.join(target, "dataset.json")) as f:
        dj = json.load(f)
    assert dj["labels"] == {"background": 0, "RV": 1, "MYO": 2, "LV": 3}
    assert dj["numTraining"] == 4 and dj["file_ending"] == ".nii.gz" and dj["meta_labels"] == ["patient", "phase"]
    table = read_metadata(target, dj)
    assert sorted(table.cases) == sorted(labeled + unlabeled)
    expected = {"patient001_frame01": ("patient001", "ED", "DCM"), "patient001_frame03": ("patient001", "ES", "DCM"),
                "patient002_frame02": ("patient002", "ED", "NOR"), "patient002_frame04": ("patient002", "ES", "NOR"),
                "patient101_frame01": ("patient101", "ED", "MINF"), "patient101_frame02": ("patient101", "ES", "MINF")}
    for case, (patient, phase, group) in expected.items():
        assert (table.value(case, "patient"), table.value(case, "phase"), table.value(case, "group")) == \
               (patient, phase, group)
    assert table.meta_label_columns == ["patient", "phase"]
    # the right frame was taken (ED of patient002 is frame 02), labels unchanged
    np.testing.assert_array_equal(
        _read(os.path.join(target, "imagesTr", "patient002_frame02_0000.nii.gz")),
        _read(os.path.join(src, "training", "patient002", "patient002_frame02.nii.gz")))
    lab = _read(os.path.join(target, "labelsTr", "patient002_frame04.nii.gz"))
    assert set(np.unique(lab).tolist()) == {0, 1, 2, 3}
    assert "2 frame(s) without ground truth" in out
    report = check_dataset(target)
    assert report.ok, report.errors
    assert report.unlabeled == unlabeled
    assert report.counts["phase"] == {"ED": (2, 1), "ES": (2, 1)}


def test_convert_acdc_group_column_only_when_complete(tmp_path):
    src = _acdc(str(tmp_path))
    _acdc_patient(os.path.join(src, "testing"), "patient102", 3, ed=1, es=3, gt=False, group=None)
    plan = plan_acdc(src)
    assert plan.meta_columns == ["patient", "phase"]
    assert any("'Group' is missing for 1 patient(s) (e.g. patient102)" in n for n in plan.notes)


@pytest.mark.parametrize("problem,expected", [
    ("missing_cfg", r"patient002/Info\.cfg is missing"),
    ("binary_cfg", r"patient002/Info\.cfg, line 1: byte 0xff at column 1 is not UTF-8 text"),
    ("garbled_cfg", r"patient002/Info\.cfg, line 1: expected 'Key: value'"),
    ("no_es", r"patient002/Info\.cfg has no 'ES:' line"),
    ("bad_ed", r"patient002/Info\.cfg: 'ED: first' is not a frame number"),
    ("missing_frame", r"ED frame file .*patient002/patient002_frame02\.nii\.gz is missing"),
    ("duplicate", r"duplicate case ids: patient 'patient002' appears in 2 folders"),
    ("same_frames", r"ED and ES are both frame 2"),
])
def test_convert_acdc_errors_name_the_item(tmp_path, nnunet_env, capsys, problem, expected):
    src = _acdc(str(tmp_path))
    p2 = os.path.join(src, "training", "patient002")
    cfg = os.path.join(p2, "Info.cfg")
    if problem == "missing_cfg":
        os.remove(cfg)
    elif problem == "binary_cfg":
        with open(cfg, "wb") as f:
            f.write(b"\xff\xfe\x00\x81ED\x00")
    elif problem == "garbled_cfg":
        with open(cfg, "w") as f:
            f.write("ED 2\nES 4\n")
    elif problem == "no_es":
        with open(cfg, "w") as f:
            f.write("ED: 2\nGroup: NOR\n")
    elif problem == "bad_ed":
        with open(cfg, "w") as f:
            f.write("ED: first\nES: 4\n")
    elif problem == "missing_frame":
        os.remove(os.path.join(p2, "patient002_frame02.nii.gz"))
    elif problem == "duplicate":
        _acdc_patient(os.path.join(src, "testing"), "patient002", 3, ed=1, es=2, gt=False)
    elif problem == "same_frames":
        with open(cfg, "w") as f:
            f.write("ED: 2\nES: 2\n")
    rc, _, err = _run(["convert-acdc", src, "-d", "27"], capsys)
    assert rc == 1
    assert err.startswith("error: ")
    assert re.search(expected, err), err
    assert os.listdir(nnunet_env["nnUNet_raw"]) == []


def test_convert_acdc_without_any_gt_is_refused(tmp_path, nnunet_env):
    from nnunet_contrastive.prep.converters import convert_acdc

    src = os.path.join(str(tmp_path), "acdc")
    _acdc_patient(src, "patient101", 3, ed=1, es=2, gt=False)
    with pytest.raises(ConversionError, match="no ED/ES frame has a ground truth file"):
        convert_acdc(src, 27)
    with pytest.raises(ConversionError, match="no patientXXX folders"):
        plan_acdc(os.path.join(src, "patient101"))
    with pytest.raises(ConversionError, match="is not a folder"):
        plan_acdc(str(tmp_path / "missing"))
