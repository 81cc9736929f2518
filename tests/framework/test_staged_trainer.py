"""The staged framework on a three-stage toy trainer (phantoms, in-process): freezing, teacher re-sync, exact resume
in the middle of a stage (the same next batch, drawn from the restored generators, and the same step), stats logged
by name."""
from __future__ import annotations

import os
import shutil

import pytest
import torch

from conftest import build_trainer, phantom_in_process
from nnunet_contrastive.framework.stages import LoaderSpec, Stage, Use
from nnunet_contrastive.terms import MeanTeacherTerm, SupervisedTerm
from nnunet_contrastive.trainers.staged import nnUNetTrainerStaged

pytestmark = pytest.mark.slow


def _clone(module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


class ThreeStageToy(nnUNetTrainerStaged):
    """warm-up (whole network) -> decoder only (encoder frozen) -> supervised + Mean Teacher (teacher re-synced)."""

    records: dict = {}

    @classmethod
    def declare_stages(cls):
        sup = Use("sup", rows="labeled")
        return [Stage("warm", 1, LoaderSpec(labeled="batch"), terms=(sup,)),
                Stage("decoder_only", 1, LoaderSpec(labeled="batch"), trains=("decoder",), terms=(sup,)),
                Stage("mt", None, LoaderSpec(labeled="batch", unlabeled=0.5, views=2, share_spatial=True),
                      terms=(sup, Use("mt", 0.5, rows="unlabeled")), resync_teacher=True, flip_student=True)]

    def build_terms(self):
        return {"sup": SupervisedTerm(), "mt": MeanTeacherTerm()}

    def train_step(self, batch):
        rec, key = self.records, (self.current_epoch, self._iteration)
        if self._iteration == 0:
            rec[("start", self.current_epoch)] = {"enc": _clone(self.network.encoder), "net": _clone(self.network),
                                                  "teacher": _clone(self.teacher.module)}
        if key == (3, 0) and "batch" not in rec:  # mid-stage: the state a resumed run must reproduce
            shutil.copy(os.path.join(self.output_folder, "checkpoint_latest.pth"), rec["side_checkpoint"])
            rec["batch"] = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in batch.items()}
        out = super().train_step(batch)
        if key == (3, 0) and "after" not in rec:
            rec["after"] = {"net": _clone(self.network), "teacher": _clone(self.teacher.module),
                            "lr": self.optimizer.param_groups[0]["lr"]}
        return out


@pytest.fixture
def toy_env(phantom_prepared, monkeypatch, tmp_path):
    return phantom_in_process(phantom_prepared, monkeypatch, str(tmp_path / "results"), nnUNet_contrastive_epochs=5,
                              nnUNet_contrastive_iterations=2, nnUNet_contrastive_val_iterations=1)


def _toy(prepared):
    return build_trainer(prepared, ThreeStageToy)


def test_three_stages_freeze_resync_log_and_resume_exactly(toy_env, tmp_path):
    ThreeStageToy.records = {"side_checkpoint": str(tmp_path / "epoch3.pth")}
    a = _toy(toy_env)
    assert [(s.name, s.epochs) for s in a.plan.stages] == [("warm", 1), ("decoder_only", 1), ("mt", 3)]
    a.save_every = 1
    a.run_training()
    rec = ThreeStageToy.records

    # stage 1 trains the encoder; stage 2 leaves it bit-identical and trains the decoder
    enc1, enc2, enc3 = rec[("start", 0)]["enc"], rec[("start", 1)]["enc"], rec[("start", 2)]["enc"]
    assert any(not torch.equal(enc1[k], enc2[k]) for k in enc1)
    assert all(torch.equal(enc2[k], enc3[k]) for k in enc2)
    dec = [k for k in rec[("start", 1)]["net"] if not k.startswith("encoder.") and "seg_layers" in k]
    assert any(not torch.equal(rec[("start", 1)]["net"][k], rec[("start", 2)]["net"][k]) for k in dec)

    # the teacher is not updated before stage 3 and is re-synced with the student when stage 3 starts
    t2, s2 = rec[("start", 2)]["teacher"], rec[("start", 2)]["net"]
    assert all(torch.equal(t2[k], s2[k]) for k in s2)
    assert all(torch.equal(rec[("start", 1)]["teacher"][k], rec[("start", 0)]["teacher"][k]) for k in t2)
    assert any(not torch.equal(rec[("start", 4)]["teacher"][k], s2[k]) for k in s2)  # then it moves

    # stats by name, NaN before the stage that first logs them
    log = torch.load(os.path.join(a.output_folder, "checkpoint_final.pth"), map_location="cpu",
                     weights_only=False)["logging"]
    assert log["stage"] == [1.0, 2.0, 3.0, 3.0, 3.0]
    assert all(v == v for v in log["sup_loss"]) and log["mt_loss"][1] != log["mt_loss"][1]  # NaN
    assert all(v == v for v in log["mt_loss"][2:])
    assert os.path.isfile(os.path.join(a.output_folder, "progress_contrastive.png"))
    assert os.path.isfile(os.path.join(a.output_folder, "checkpoint_teacher.pth"))

    # exact resume in the middle of stage 3: same batch -> bit-identical student, teacher and LR
    b = _toy(toy_env)
    b.initialize()
    b.load_checkpoint(rec["side_checkpoint"])
    assert b.current_epoch == 3
    b.on_train_start()
    b.on_epoch_start()
    b.on_train_epoch_start()
    ThreeStageToy.records = {"side_checkpoint": str(tmp_path / "unused.pth"), "batch": rec["batch"],
                             "after": "resumed"}  # keep b from recording over a's values
    batch = next(b.dataloader_train)  # the random generators continue from the checkpoint: a's batch again
    assert list(batch["keys"]) == list(rec["batch"]["keys"])
    for k, v in rec["batch"].items():
        if torch.is_tensor(v):
            assert torch.equal(batch[k], v), k
    b.train_step(batch)
    assert b.optimizer.param_groups[0]["lr"] == rec["after"]["lr"]
    for k, v in _clone(b.network).items():
        assert torch.equal(v, rec["after"]["net"][k]), k
    for k, v in _clone(b.teacher.module).items():
        assert torch.equal(v, rec["after"]["teacher"][k]), k
    b._finish_loaders()
