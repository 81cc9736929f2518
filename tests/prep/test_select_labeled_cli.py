"""`nnunet-contrastive select-labeled` on a fake preprocessed dataset (only file names are read)."""
import json
import os

import pytest

from nnunet_contrastive.cli import main
from nnunet_contrastive.data.metadata import write_metadata

DATASET = "Dataset987_Fake"
# 7 patients with 2 phases, 1 patient with a single case: 15 cases
PATIENT_OF = {f"pat{i}_{ph}": f"pat{i}" for i in range(7) for ph in ("ED", "ES")}
PATIENT_OF["pat7_ED"] = "pat7"


def _patients(cases):
    return {PATIENT_OF[c] for c in cases}


@pytest.fixture
def fake_dataset(nnunet_env):
    pre = os.path.join(nnunet_env["nnUNet_preprocessed"], DATASET)
    os.makedirs(os.path.join(pre, "gt_segmentations"))
    with open(os.path.join(pre, "dataset.json"), "w") as f:
        json.dump({"channel_names": {"0": "MRI"}, "labels": {"background": 0, "LV": 1},
                   "numTraining": len(PATIENT_OF), "file_ending": ".nii.gz",
                   "meta_labels": ["patient", "phase"]}, f)
    for case in PATIENT_OF:
        open(os.path.join(pre, "gt_segmentations", case + ".nii.gz"), "w").close()
    open(os.path.join(pre, "gt_segmentations", "notes.txt"), "w").close()  # not a case
    write_metadata(pre, {c: {"patient": p, "phase": c.split("_")[1]} for c, p in PATIENT_OF.items()})
    return pre


def _splits(pre):
    with open(os.path.join(pre, "splits_final.json")) as f:
        return json.load(f)


def test_creates_patient_level_split_and_labeled_lists(fake_dataset, capsys):
    assert main(["select-labeled", "-d", "987", "--num-labeled", "2", "--by", "patient", "--seed", "3"]) == 0
    out = capsys.readouterr().out
    splits = _splits(fake_dataset)
    assert len(splits) == 5
    val_seen = []
    for fold, s in enumerate(splits):
        assert set(s["train"]) | set(s["val"]) == set(PATIENT_OF)
        assert not _patients(s["train"]) & _patients(s["val"]), fold  # split over patients
        val_seen += s["val"]
        lab = s["labeled"]
        assert set(lab) <= set(s["train"])
        assert len(_patients(lab)) == 2
        # whole patients: every training case of a chosen patient is labeled
        assert {c for c in s["train"] if PATIENT_OF[c] in _patients(lab)} == set(lab)
        assert s["labeled_selection"] == {"num_labeled": 2, "seed": 3, "by": "patient"}
        assert f"fold {fold}: {len(lab)} labeled / {len(s['train']) - len(lab)} unlabeled" in out
    assert sorted(val_seen) == sorted(PATIENT_OF)
    assert "created splits_final.json" in out and "over patients" in out


def test_rerun_is_reproducible_and_keeps_existing_split(fake_dataset, capsys):
    assert main(["select-labeled", "-d", DATASET, "--num-labeled", "3", "--by", "patient"]) == 0
    first = _splits(fake_dataset)
    assert "created splits_final.json" in capsys.readouterr().out
    assert main(["select-labeled", "-d", DATASET, "--num-labeled", "3", "--by", "patient"]) == 0
    assert _splits(fake_dataset) == first
    assert "created" not in capsys.readouterr().out  # the existing split is read, not re-made
    # a different seed changes the labeled lists of at least one fold, but not train/val
    assert main(["select-labeled", "-d", DATASET, "--num-labeled", "3", "--by", "patient", "--seed", "11"]) == 0
    other = _splits(fake_dataset)
    assert [(s["train"], s["val"]) for s in other] == [(s["train"], s["val"]) for s in first]
    assert [s["labeled"] for s in other] != [s["labeled"] for s in first]


def test_case_level_default_and_folds(fake_dataset):
    from nnunetv2.utilities.crossval_split import generate_crossval_split

    assert main(["select-labeled", "-d", "987", "--num-labeled", "4", "-f", "1", "3"]) == 0
    splits = _splits(fake_dataset)
    ref = generate_crossval_split(sorted(PATIENT_OF), seed=12345, n_splits=5)  # nnU-Net's own split
    assert [(s["train"], s["val"]) for s in splits] == [([str(x) for x in r["train"]], [str(x) for x in r["val"]])
                                                        for r in ref]
    assert [("labeled" in s) for s in splits] == [False, True, False, True, False]
    for s in (splits[1], splits[3]):
        assert len(s["labeled"]) == 4 and set(s["labeled"]) <= set(s["train"])


def test_too_many_requested_exits_1(fake_dataset, capsys):
    assert main(["select-labeled", "-d", "987", "--num-labeled", "9", "--by", "patient"]) == 1
    err = capsys.readouterr().err
    # 8 patients, 5 folds: each fold trains on 6 or 7 patients
    assert err.startswith("error: ") and "fold 0" in err and "9 labeled patients" in err and "at most" in err
    splits = _splits(fake_dataset)  # the split was created, but no labeled list was written
    assert not any("labeled" in s for s in splits)
    max_train_patients = len(_patients(splits[0]["train"]))
    assert f"only {max_train_patients}" in err


@pytest.mark.parametrize("value", ["0", "-2", "some"])
def test_bad_num_labeled_exits_1(fake_dataset, capsys, value):
    assert main(["select-labeled", "-d", "987", "--num-labeled", value]) == 1
    err = capsys.readouterr().err
    assert "--num-labeled must be a positive integer or 'all'" in err and value in err


def test_all(fake_dataset):
    assert main(["select-labeled", "-d", "987", "--num-labeled", "all"]) == 0
    for s in _splits(fake_dataset):
        assert s["labeled"] == sorted(s["train"])


def test_warns_about_case_level_split_mixing_a_patient(fake_dataset, capsys):
    cases = sorted(PATIENT_OF)
    # a case-level split: pat0_ED trains while pat0_ES validates in fold 0; fold 1 is clean
    val0 = ["pat0_ES", "pat1_ED", "pat1_ES"]
    val1 = ["pat2_ED", "pat2_ES"]
    split = [{"train": [c for c in cases if c not in v], "val": v} for v in (val0, val1)]
    with open(os.path.join(fake_dataset, "splits_final.json"), "w") as f:
        json.dump(split, f)
    assert main(["select-labeled", "-d", "987", "--num-labeled", "1", "--by", "patient"]) == 0
    err = capsys.readouterr().err
    assert "warning: fold 0" in err and "pat0" in err and "--by patient" in err
    assert "fold 1" not in err and "pat1" not in err
    new = _splits(fake_dataset)
    assert [(s["train"], s["val"]) for s in new] == [(s["train"], s["val"]) for s in split]  # split kept


def test_by_patient_without_metadata(fake_dataset, capsys):
    os.remove(os.path.join(fake_dataset, "metadata.csv"))
    assert main(["select-labeled", "-d", "987", "--num-labeled", "1", "--by", "patient"]) == 1
    err = capsys.readouterr().err
    assert "metadata.csv" in err and "'patient'" in err


def test_unknown_dataset(nnunet_env, capsys):
    assert main(["select-labeled", "-d", "555", "--num-labeled", "1"]) == 1
    assert "No dataset with id 555" in capsys.readouterr().err
