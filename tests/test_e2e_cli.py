"""End to end through nnU-Net's real CLI on tiny phantoms: plan/preprocess -> train -> predict -> evaluate.

The nnU-Net commands run in subprocesses whose environment has no nnUNet_extTrainer: finding our trainer relies on
the installed .pth hook alone, as in a new shell.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from nnunet_contrastive.phantom import generate_phantom_dataset
from nnunet_contrastive.pipeline import console_script, small_machine_env

pytestmark = pytest.mark.slow
DATASET = 991
TRAINER = "nnUNetTrainerFewLabels"
PLANS = "nnUNetPlans_cpu_small"


def _env(folders, **extra):
    env = small_machine_env({k: v for k, v in os.environ.items() if k != "nnUNet_extTrainer"}, **folders, **extra)
    return env


def _run(args, env, timeout=900):
    exe = console_script(args[0])
    out = subprocess.run([exe] + [str(a) for a in args[1:]], env=env, capture_output=True, text=True,
                         timeout=timeout)
    assert out.returncode == 0, f"{args[0]} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out.stdout


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A phantom dataset, planned and preprocessed by nnU-Net, with a cpu plans override and 3 labeled patients."""
    root = tmp_path_factory.mktemp("e2e")
    folders = {k: str(root / k) for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
    for f in folders.values():
        os.makedirs(f)
    raw = generate_phantom_dataset(folders["nnUNet_raw"], DATASET, "E2E", num_train_patients=6,
                                   num_test_patients=2, size=48, seed=3)
    env = _env(folders)
    plan_env = {k: v for k, v in env.items() if k != "nnUNet_n_proc_DA"}  # 2.8.1 planner: set_num_threads(0)
    _run(["nnUNetv2_plan_and_preprocess", "-d", DATASET, "-c", "2d", "-np", "2", "-npfp", "2",
          "--verify_dataset_integrity"], plan_env)
    _run(["nnunet-contrastive", "plans", "-d", DATASET, "-o", "cpu_small"], env)
    _run(["nnunet-contrastive", "select-labeled", "-d", DATASET, "--num-labeled", "3", "--by", "patient",
          "-f", "0"], env)
    pre = os.path.join(folders["nnUNet_preprocessed"], f"Dataset{DATASET}_E2E")
    return dict(folders=folders, env=env, raw=raw, pre=pre)


def _chance_dice(gt_folder: str, labels: list[int]) -> float:
    """Expected Dice of a prediction drawing each voxel's class at random with the true class frequencies."""
    arrays = [sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(gt_folder, f))) for f in sorted(os.listdir(gt_folder))]
    allv = np.concatenate([a.ravel() for a in arrays])
    # for a random labelling with frequency p per class: E[Dice] ~= 2 p^2 / (2 p) = p
    return float(np.mean([np.mean(allv == c) for c in labels]))


def test_train_predict_evaluate_with_nnunet_cli(prepared):
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
def in_process_env(prepared, monkeypatch):
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
