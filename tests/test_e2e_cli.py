"""End to end through nnU-Net's real CLI on tiny phantoms: plan/preprocess -> train -> predict -> evaluate.

The nnU-Net commands run in subprocesses whose environment has no nnUNet_extTrainer: finding our trainer relies on
the installed .pth hook alone, as in a new shell.
"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import PHANTOM_ID as DATASET
from conftest import cli_env as _env
from conftest import run_cli as _run

pytestmark = pytest.mark.slow
TRAINER = "nnUNetTrainerFewLabels"
PLANS = "nnUNetPlans_cpu_small"


def _chance_dice(gt_folder: str, labels: list[int]) -> float:
    """Expected Dice of a prediction drawing each voxel's class at random with the true class frequencies."""
    arrays = [sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(gt_folder, f))) for f in sorted(os.listdir(gt_folder))]
    allv = np.concatenate([a.ravel() for a in arrays])
    # for a random labelling with frequency p per class: E[Dice] ~= 2 p^2 / (2 p) = p
    return float(np.mean([np.mean(allv == c) for c in labels]))


def test_train_predict_evaluate_with_nnunet_cli(phantom_prepared):
    prepared = phantom_prepared
    env = _env(prepared["folders"], nnUNet_contrastive_epochs=3, nnUNet_contrastive_iterations=15,
               nnUNet_contrastive_val_iterations=2)
    out = _run(["nnUNetv2_train", DATASET, "2d", "0", "-tr", TRAINER, "-p", PLANS, "-device", "cpu"], env)
    splits = json.load(open(os.path.join(prepared["pre"], "splits_final.json")))
    n_lab = len(splits[0]["labeled"])
    assert n_lab == 6  # 3 patients x (ED, ES)
    assert f"Labeled subset: {n_lab} labeled and {len(splits[0]['train']) - n_lab} unlabeled" in out

    fold_dir = os.path.join(prepared["folders"]["nnUNet_results"], f"Dataset{DATASET}_E2E",
                            f"{TRAINER}__{PLANS}__2d", "fold_0")
    for f in ("checkpoint_final.pth", "progress.png", "labeled_subset.json", "validation/summary.json"):
        assert os.path.isfile(os.path.join(fold_dir, f)), f
    ckpt = torch.load(os.path.join(fold_dir, "checkpoint_final.pth"), map_location="cpu", weights_only=False)
    assert ckpt["trainer_name"] == TRAINER
    assert sorted(ckpt["nnunet_contrastive"]["labeled_keys"]) == sorted(splits[0]["labeled"])
    assert json.load(open(os.path.join(fold_dir, "labeled_subset.json")))["labeled"] == ckpt["nnunet_contrastive"][
        "labeled_keys"]
    assert not any(f.endswith(".tmp") for f in os.listdir(fold_dir))
    # the model records the metadata it was trained with, next to nnU-Net's dataset.json and plans.json
    assert open(os.path.join(os.path.dirname(fold_dir), "metadata.csv")).read() == \
        open(os.path.join(prepared["raw"], "metadata.csv")).read()

    pred = os.path.join(str(prepared["folders"]["nnUNet_results"]), "pred")
    _run(["nnUNetv2_predict", "-i", os.path.join(prepared["raw"], "imagesTs"), "-o", pred, "-d", DATASET,
          "-c", "2d", "-tr", TRAINER, "-p", PLANS, "-f", "0", "-npp", "0", "-nps", "0", "-device", "cpu",
          "--disable_progress_bar"], env)
    gt = os.path.join(prepared["raw"], "labelsTs")
    assert sorted(os.listdir(gt)) == sorted(f for f in os.listdir(pred) if f.endswith(".nii.gz"))
    _run(["nnUNetv2_evaluate_folder", gt, pred, "-djfile", os.path.join(prepared["raw"], "dataset.json"),
          "-pfile", os.path.join(prepared["pre"], f"{PLANS}.json"), "-np", "2"], env)
    summary = json.load(open(os.path.join(pred, "summary.json")))
    dice = summary["foreground_mean"]["Dice"]
    chance = _chance_dice(gt, [1, 2, 3])
    assert dice > max(0.3, 4 * chance), f"mean foreground Dice {dice:.3f} vs chance {chance:.3f}"


def _make_trainer(prepared, device="cpu"):
    from nnunet_contrastive.trainers import nnUNetTrainerFewLabels

    plans = json.load(open(os.path.join(prepared["pre"], f"{PLANS}.json")))
    plans["continue_training"] = False
    dj = json.load(open(os.path.join(prepared["pre"], "dataset.json")))
    return nnUNetTrainerFewLabels(plans, "2d", 0, dj, device=torch.device(device))


@pytest.fixture
def in_process_env(phantom_prepared, monkeypatch):
    prepared = phantom_prepared
    """Trainers built in this process (nnU-Net reads its folders from os.environ lazily)."""
    for k, v in prepared["env"].items():
        if k.startswith("nnUNet"):
            monkeypatch.setenv(k, v)
    monkeypatch.setenv("nnUNet_results", prepared["folders"]["nnUNet_results"] + "_inproc")
    return prepared


def test_few_labels_never_loads_unlabeled_cases(in_process_env, tmp_path):
    prepared = in_process_env
    trainer = _make_trainer(prepared)
    trainer.initialize()
    tr_keys, _ = trainer.do_split()
    labeled, unlabeled = trainer.labeled_keys, trainer.unlabeled_keys
    splits = json.load(open(os.path.join(prepared["pre"], "splits_final.json")))
    assert sorted(tr_keys) == sorted(splits[0]["labeled"]) and len(unlabeled) > 0
    # hide the unlabeled cases' label files: training batches must not notice
    data_dir = trainer.preprocessed_dataset_folder
    moved = []
    for case in unlabeled:
        src = os.path.join(data_dir, f"{case}_seg.b2nd")
        dst = os.path.join(str(tmp_path), f"{case}_seg.b2nd")
        os.replace(src, dst)
        moved.append((src, dst))
    try:
        dl_tr, _ = trainer.get_dataloaders()
        seen = set()
        for _ in range(6):
            batch = next(dl_tr)
            seen |= set(batch["keys"])
            out = trainer.train_step(batch)
            assert np.isfinite(out["loss"])
        assert seen <= set(labeled), seen - set(labeled)
    finally:
        for src, dst in moved:
            os.replace(dst, src)


def test_resume_with_a_different_labeled_subset_is_refused(in_process_env, tmp_path):
    prepared = in_process_env
    trainer = _make_trainer(prepared)
    trainer.initialize()
    trainer.do_split()
    ckpt = str(tmp_path / "checkpoint_latest.pth")
    trainer.save_checkpoint(ckpt)
    assert not os.path.exists(ckpt + ".tmp")
    splits_path = os.path.join(prepared["pre"], "splits_final.json")
    original = open(splits_path).read()
    splits = json.loads(original)
    splits[0]["labeled"] = sorted(splits[0]["train"])[:1]
    try:
        with open(splits_path, "w") as f:
            json.dump(splits, f)
        resumed = _make_trainer(prepared)
        resumed.load_checkpoint(ckpt)
        assert sorted(resumed.labeled_keys) == sorted(trainer.labeled_keys)
        with pytest.raises(RuntimeError, match="labeled subset of fold 0"):
            resumed.do_split()
    finally:
        with open(splits_path, "w") as f:
            f.write(original)


def test_schedule_env_overrides_and_errors(monkeypatch):
    from nnunet_contrastive.trainers.base import schedule_from_env

    assert schedule_from_env({"nnUNet_contrastive_epochs": "3", "nnUNet_contrastive_iterations": "7"}) == {
        "num_epochs": 3, "num_iterations_per_epoch": 7}
    assert schedule_from_env({}) == {}
    for bad in ("0", "-1", "x", "1.5"):
        with pytest.raises(ValueError, match="nnUNet_contrastive_epochs"):
            schedule_from_env({"nnUNet_contrastive_epochs": bad})
