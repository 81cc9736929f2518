"""`nnunet-contrastive check` / dataset_check.check_dataset: cases vs metadata, counts, errors naming case/column."""
from __future__ import annotations

import json
import os
import shutil

import pytest

from nnunet_contrastive.cli import main
from nnunet_contrastive.prep.dataset_check import check_dataset, list_image_cases
from nnunet_contrastive.data.metadata import MetadataError
from nnunet_contrastive.prep.phantom import generate_phantom_dataset

LABELED = ["patient001_ED", "patient001_ES", "patient002_ED", "patient002_ES"]
UNLABELED = ["patient003_ED", "patient003_ES"]


@pytest.fixture
def phantom(nnunet_env):
    """Dataset990: 2 labeled patients, 1 unlabeled patient (imagesUnlabeled), 32x32 slices."""
    return generate_phantom_dataset(nnunet_env["nnUNet_raw"], 990, "Tiny", num_train_patients=2,
                                    num_test_patients=0, num_unlabeled_patients=1, size=32)


def _metadata(folder):
    with open(os.path.join(folder, "metadata.csv")) as f:
        return f.read().splitlines()


def _set_metadata(folder, lines):
    with open(os.path.join(folder, "metadata.csv"), "w") as f:
        f.write("\n".join(lines) + "\n")


def _check(capsys, dataset="990"):
    rc = main(["check", "-d", dataset])
    out, err = capsys.readouterr()
    return rc, out, err


def test_check_ok_prints_counts_and_copies_metadata(phantom, nnunet_env, capsys):
    report = check_dataset(phantom)
    assert report.ok, report.errors
    assert report.labeled == LABELED and report.unlabeled == UNLABELED
    assert report.counts["phase"] == {"ED": (2, 1), "ES": (2, 1)}
    assert report.counts["patient"] == {"patient001": (2, 0), "patient002": (2, 0), "patient003": (0, 2)}
    report.raise_for_errors()  # no-op
    rc, out, err = _check(capsys)
    assert rc == 0, err
    assert "4 labeled (imagesTr) + 2 unlabeled (imagesUnlabeled) cases" in out
    assert "ED: 3 (2 labeled, 1 unlabeled)" in out and "patient003: 2 (0 labeled, 2 unlabeled)" in out
    assert "does not exist yet" in out  # no preprocessed folder yet: nothing copied
    pre = os.path.join(nnunet_env["nnUNet_preprocessed"], os.path.basename(phantom))
    os.makedirs(pre)
    rc, out, err = _check(capsys, "Dataset990_Tiny")
    assert rc == 0, err
    with open(os.path.join(pre, "metadata.csv")) as a, open(os.path.join(phantom, "metadata.csv")) as b:
        assert a.read() == b.read()
    assert f"copied metadata.csv to {pre}" in out


def test_check_summarises_long_columns(phantom):
    report = check_dataset(phantom)
    text = report.format_counts(max_values=2)
    assert "patient: 3 values, 2 case(s) each" in text


@pytest.mark.parametrize("edit,expected", [
    # a case without metadata (labeled and unlabeled)
    (lambda ls: [l for l in ls if not l.startswith("patient002_ES")],
     "labeled case 'patient002_ES' (imagesTr) has no metadata row"),
    (lambda ls: [l for l in ls if not l.startswith("patient003_ED")],
     "unlabeled case 'patient003_ED' (imagesUnlabeled) has no metadata row"),
    # metadata for an unknown case
    (lambda ls: ls + ["patient009_ED,patient009,ED"],
     "row 'patient009_ED' names no image in imagesTr or imagesUnlabeled"),
    # an empty value
    (lambda ls: [l.replace("patient001_ES,patient001,ES", "patient001_ES,patient001,") for l in ls],
     "case 'patient001_ES' has an empty value in column 'phase'"),
    # mixed-type column
    (lambda ls: [l.replace("patient002_ED,patient002,ED", "patient002_ED,patient002,1") for l in ls],
     "column 'phase' mixes numbers and text"),
    # wrong header
    (lambda ls: ["id,patient,phase"] + ls[1:], "the first header column must be 'case'"),
])
def test_check_metadata_errors_name_case_and_column(phantom, capsys, edit, expected):
    _set_metadata(phantom, edit(_metadata(phantom)))
    report = check_dataset(phantom)
    assert not report.ok
    assert any(expected in e for e in report.errors), report.errors
    with pytest.raises(MetadataError, match="problem"):
        report.raise_for_errors()
    rc, out, err = _check(capsys)
    assert rc == 1
    assert expected in err and "error: " in err


def test_check_errors_do_not_copy_metadata(phantom, nnunet_env, capsys):
    pre = os.path.join(nnunet_env["nnUNet_preprocessed"], os.path.basename(phantom))
    os.makedirs(pre)
    _set_metadata(phantom, _metadata(phantom)[:-1])
    rc, _, _ = _check(capsys)
    assert rc == 1 and not os.path.exists(os.path.join(pre, "metadata.csv"))


def test_check_missing_metadata_and_bad_meta_labels(phantom, capsys):
    with open(os.path.join(phantom, "dataset.json")) as f:
        dj = json.load(f)
    dj["meta_labels"] = ["patient", "scanner"]
    with open(os.path.join(phantom, "dataset.json"), "w") as f:
        json.dump(dj, f)
    report = check_dataset(phantom)
    assert any("declares meta-label 'scanner'" in e for e in report.errors), report.errors
    os.remove(os.path.join(phantom, "metadata.csv"))
    rc, _, err = _check(capsys)
    assert rc == 1 and "No metadata table" in err and "metadata.csv" in err


def test_check_case_files(phantom):
    unl = os.path.join(phantom, "imagesUnlabeled")
    # same case id labeled and unlabeled
    shutil.copy(os.path.join(phantom, "imagesTr", "patient001_ED_0000.nii.gz"), unl)
    # a file that does not follow <case>_XXXX<ending>
    shutil.copy(os.path.join(unl, "patient003_ED_0000.nii.gz"), os.path.join(unl, "scan.nii.gz"))
    # an image without label
    shutil.copy(os.path.join(phantom, "imagesTr", "patient002_ES_0000.nii.gz"),
                os.path.join(phantom, "imagesTr", "patient004_ED_0000.nii.gz"))
    # macOS junk is ignored
    with open(os.path.join(unl, "._patient003_ED_0000.nii.gz"), "wb") as f:
        f.write(b"junk")
    errors = check_dataset(phantom).errors
    joined = "\n".join(errors)
    assert "case 'patient001_ED' is in imagesTr and in imagesUnlabeled" in joined
    assert "scan.nii.gz: name must be <case>_XXXX.nii.gz" in joined
    assert "labeled case 'patient004_ED' (imagesTr) has no label" in joined
    assert "numTraining is 4 but imagesTr holds 5" in joined
    assert "._patient003" not in joined


def test_list_image_cases_channels(tmp_path):
    for name in ("a_0000.nii.gz", "a_0001.nii.gz", "b_0000.nii.gz", "c_0000.nii.gz", "c_0001.nii.gz",
                 "c_0002.nii.gz"):
        (tmp_path / name).write_bytes(b"")
    cases, errors = list_image_cases(str(tmp_path), ".nii.gz", 2)
    assert cases == {"a": [str(tmp_path / "a_0000.nii.gz"), str(tmp_path / "a_0001.nii.gz")]}
    assert any("case 'b' lacks channel file(s) b_0001.nii.gz" in e for e in errors)
    assert any("case 'c' has channel file(s) c_0002.nii.gz beyond" in e for e in errors)


def test_check_unknown_dataset(nnunet_env, capsys):
    rc, _, err = _check(capsys, "991")
    assert rc == 1 and "No dataset with id 991" in err
