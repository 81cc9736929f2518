"""The checks of a trainer's start-up (`nnUNetv2_train` skips our CLI): the split and the unlabeled folder
(`do_split`), the checkpoint of a resume (`load_checkpoint`). Bad input raises a UserInputError that names the file,
before nnU-Net reads it, and leaves every file as it was."""
from __future__ import annotations

import json
import os
import zipfile

import pytest
import torch

from bad_input import snapshot, truncate, write_bytes
from nnunet_contrastive.data.checkpoints import CheckpointError, read_checkpoint, resume_advice
from nnunet_contrastive.errors import UserInputError

DATASET = "Dataset992_Start"
CASES = ["a", "b", "c", "d", "e"]


def _plans() -> dict:
    conf = {"data_identifier": "nnUNetPlans_2d", "preprocessor_name": "DefaultPreprocessor", "batch_size": 2,
            "patch_size": [16, 16], "median_image_size_in_voxels": [16.0, 16.0], "spacing": [1.0, 1.0],
            "normalization_schemes": ["ZScoreNormalization"], "use_mask_for_norm": [False],
            "resampling_fn_data": "resample_data_or_seg_to_shape", "resampling_fn_seg": "resample_data_or_seg_to_shape",
            "resampling_fn_data_kwargs": {}, "resampling_fn_seg_kwargs": {},
            "resampling_fn_probabilities": "resample_data_or_seg_to_shape", "resampling_fn_probabilities_kwargs": {},
            "architecture": {"network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
                             "arch_kwargs": {}, "_kw_requires_import": []},
            "batch_dice": True}
    return {"dataset_name": DATASET, "plans_name": "nnUNetPlans", "image_reader_writer": "SimpleITKIO",
            "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2], "label_manager": "LabelManager",
            "original_median_spacing_after_transp": [1.0, 1.0, 1.0], "configurations": {"2d": conf},
            "experiment_planner_used": "ExperimentPlanner", "foreground_intensity_properties_per_channel": {},
            "continue_training": False}


@pytest.fixture
def trainer(nnunet_env):
    """An nnUNetTrainerFewLabels over a preprocessed folder that holds only the file names nnU-Net lists."""
    import nnunet_contrastive.trainers as T

    pre = os.path.join(nnunet_env["nnUNet_preprocessed"], DATASET)
    data = os.path.join(pre, "nnUNetPlans_2d")
    os.makedirs(data)
    for case in CASES:
        for ending in (".b2nd", "_seg.b2nd", ".pkl"):
            write_bytes(os.path.join(data, case + ending), b"")
    dj = {"channel_names": {"0": "MRI"}, "labels": {"background": 0, "x": 1}, "numTraining": 5,
          "file_ending": ".nii.gz"}
    return T.nnUNetTrainerFewLabels(_plans(), "2d", 0, dj, device=torch.device("cpu"))


def _split(trainer, content):
    path = os.path.join(trainer.preprocessed_dataset_folder_base, "splits_final.json")
    write_bytes(path, content if isinstance(content, bytes) else json.dumps(content).encode())
    return path


SPLIT_CASES = {
    "split from another dataset": ([{"train": ["hippocampus_001", "a"], "val": ["b"]}], ["hippocampus_001",
                                                                                         "another dataset"]),
    "truncated split file": (b'[{"train": ["a", "b"], "val": ', ["splits_final.json, line 1", "not valid JSON"]),
    "wrongly keyed split": ([{"training": ["a"], "val": ["b"]}], ["fold 0", "'train'"]),
    "case in train and val": ([{"train": ["a", "b"], "val": ["b"]}], ["fold 0", "'b'", "both"]),
    "labeled case outside train": ([{"train": ["a", "b"], "val": ["c"], "labeled": ["c"]}], ["fold 0", "'c'"]),
    "non-UTF-8 split file": (b'[{"train": ["a", "b\xe9"], "val": ["c"]}]', ["splits_final.json, line 1", "0xe9"]),
    "split of objects of the wrong type": ([["a", "b"]], ["fold 0", "object"]),
}


@pytest.mark.parametrize("case", sorted(SPLIT_CASES))
def test_do_split_refuses_a_bad_split_file(trainer, case):
    content, names = SPLIT_CASES[case]
    path = _split(trainer, content)
    before = snapshot(trainer.preprocessed_dataset_folder_base)
    with pytest.raises(UserInputError) as e:
        trainer.do_split()
    for name in [path] + names:
        assert name in str(e.value), str(e.value)
    assert snapshot(trainer.preprocessed_dataset_folder_base) == before  # nnU-Net did not rewrite the split


def test_do_split_refuses_a_case_that_is_labeled_and_unlabeled(trainer):
    _split(trainer, [{"train": ["a", "b", "c"], "val": ["d", "e"]}])
    unlabeled = trainer.preprocessed_dataset_folder + "_unlabeled"
    os.makedirs(unlabeled)
    for case in ("u1", "d"):  # 'd' is a validation case: it must not become an unlabeled training case
        write_bytes(os.path.join(unlabeled, case + ".pkl"), b"")
    with pytest.raises(UserInputError, match=r"\['d'\].*training pool"):
        trainer.do_split()
    os.remove(os.path.join(unlabeled, "d.pkl"))
    assert sorted(trainer.do_split()[0]) == ["a", "b", "c"]  # the check itself passes good input


def test_do_split_passes_a_good_split(trainer):
    _split(trainer, [{"train": ["a", "b", "c"], "val": ["d", "e"], "labeled": ["a"]}])
    tr, val = trainer.do_split()
    assert tr == ["a"] and sorted(val) == ["d", "e"] and trainer.unlabeled_keys == ["b", "c"]


# ------------------------------------------------------------------------------------------------ checkpoints
def _good_checkpoint(path):
    torch.save({"network_weights": {"w": torch.zeros(2)}, "optimizer_state": {}, "current_epoch": 3}, path)


def _truncated_zip(path):
    _good_checkpoint(path)
    truncate(path, 0.5)


CHECKPOINT_CASES = {
    "zero-byte checkpoint": (lambda p: write_bytes(p, b""), ["is empty (0 bytes)"]),
    "truncated checkpoint": (_truncated_zip, ["cannot be read"]),
    "not a checkpoint at all": (lambda p: write_bytes(p, b"\x00garbage" * 100), ["cannot be read"]),
    "another pickled object": (lambda p: torch.save([1, 2, 3], p), ["not an nnU-Net training checkpoint"]),
}


@pytest.mark.parametrize("case", sorted(CHECKPOINT_CASES))
def test_resume_names_the_unreadable_checkpoint_and_the_intact_one(trainer, tmp_path, case):
    fold = tmp_path / "fold_0"
    fold.mkdir()
    best, latest = str(fold / "checkpoint_best.pth"), str(fold / "checkpoint_latest.pth")
    _good_checkpoint(best)
    damage, names = CHECKPOINT_CASES[case]
    damage(latest)
    before = snapshot(str(fold))
    with pytest.raises(CheckpointError) as e:
        trainer.load_checkpoint(latest)  # what nnU-Net's --c calls when checkpoint_final.pth is absent
    msg = str(e.value)
    for name in [latest, "checkpoint_best.pth", "--c", "without --c"] + names:
        assert name in msg, msg
    assert snapshot(str(fold)) == before


def test_read_checkpoint_advice_without_alternatives(tmp_path):
    path = str(tmp_path / "checkpoint_final.pth")
    write_bytes(path, b"")
    with pytest.raises(CheckpointError, match="No other checkpoint"):
        read_checkpoint(path)
    _good_checkpoint(str(tmp_path / "checkpoint_latest.pth"))
    assert "checkpoint_latest.pth is in the same folder" in resume_advice(path)
    assert read_checkpoint(str(tmp_path / "checkpoint_latest.pth"))["current_epoch"] == 3
    with zipfile.ZipFile(str(tmp_path / "checkpoint_latest.pth")) as z:  # torch's format: a zip archive
        assert z.namelist()
