"""nnUNetTrainerSPCon and its variants on tiny phantoms: nnU-Net's CLI end to end, exact resume, meta-label checks."""
from __future__ import annotations

import json
import math
import os
import shutil

import numpy as np
import pytest
import torch

from conftest import PHANTOM_ID, build_trainer, cli_env, phantom_in_process, predict_and_dice, run_cli

pytestmark = pytest.mark.slow
PLANS = "nnUNetPlans_cpu_small"


def _fold_dir(prepared, trainer, results=None):
    return os.path.join(results or prepared["folders"]["nnUNet_results"], f"Dataset{PHANTOM_ID}_E2E",
                        f"{trainer}__{PLANS}__2d", "fold_0")


def _l_max(n: int, tau: float) -> float:
    """Largest pair loss for n samples (2n views) of unit vectors: log(1 + 2(n-1) e^{2/tau}), written out here."""
    return math.log1p(2 * (n - 1) * math.exp(2 / tau))


def test_spcon_cli_train_predict_evaluate_student_and_teacher(phantom_prepared):
    prepared = phantom_prepared
    env = cli_env(prepared["folders"], nnUNet_contrastive_epochs=4, nnUNet_contrastive_pretrain_epochs=1,
                  nnUNet_contrastive_iterations=10, nnUNet_contrastive_val_iterations=1)
    out = run_cli(["nnUNetv2_train", PHANTOM_ID, "2d", "0", "-tr", "nnUNetTrainerSPCon", "-p", PLANS,
                   "-device", "cpu"], env)
    assert "stage 1: " in out and "sp_loss_partition" in out and "sp_loss_patient" in out
    assert "stage 2: " in out and "mt_loss" in out and "sp_loss_phase" in out
    fold = _fold_dir(prepared, "nnUNetTrainerSPCon")
    for f in ("checkpoint_final.pth", "checkpoint_teacher.pth", "progress.png", "progress_contrastive.png"):
        assert os.path.isfile(os.path.join(fold, f)), f
    ckpt = torch.load(os.path.join(fold, "checkpoint_final.pth"), map_location="cpu", weights_only=False)
    extra = ckpt["nnunet_contrastive"]
    assert extra["active_meta_labels"] == ["partition", "patient", "phase"]
    assert extra["teacher"] and any(k.startswith("sp.head.") for k in extra["terms"])  # head and teacher beside
    assert not any(k.startswith(("sp.", "head", "projection_head", "teacher")) for k in ckpt["network_weights"])
    teacher = torch.load(os.path.join(fold, "checkpoint_teacher.pth"), map_location="cpu", weights_only=False)
    assert teacher["network_weights"].keys() == ckpt["network_weights"].keys()
    assert any(not torch.equal(teacher["network_weights"][k], ckpt["network_weights"][k])
               for k in ckpt["network_weights"])
    log = ckpt["logging"]
    assert log["stage"] == [1.0, 2.0, 2.0, 2.0]
    # gamma (Eq. 16, p = 0.5) as a multiple of the largest pair loss: stage 1 has 6 samples (2 volumes x 3
    # partitions of the batch of 8), stage 2 the 4 unlabeled rows added to the 8 labeled ones. gamma steps every
    # iteration (10 per epoch): the logged value is the epoch mean
    frac = lambda t, length: 0.15 + (1.8 - 0.15) * (t / length) ** 0.5  # noqa: E731
    mean_frac = lambda e, length: sum(frac(e + i / 10, length) for i in range(10)) / 10  # noqa: E731
    expected = [mean_frac(0, 1) * _l_max(6, 0.07)] + [mean_frac(t, 3) * _l_max(4, 0.07) for t in range(3)]
    assert log["gamma_partition"] == pytest.approx(expected, rel=1e-6)
    assert all(0 <= w <= 1 for w in log["w_mean_partition"])
    assert log["mt_weight"][1] < log["mt_weight"][3]  # ramp-up
    dice_student = predict_and_dice(prepared, "nnUNetTrainerSPCon", env, "checkpoint_final.pth", "pred_spcon")
    dice_teacher = predict_and_dice(prepared, "nnUNetTrainerSPCon", env, "checkpoint_teacher.pth", "pred_teacher")
    assert dice_student > 0.15 and dice_teacher > 0.0, (dice_student, dice_teacher)


def test_spcon_variant_cli_train_predict_evaluate(phantom_prepared):
    prepared = phantom_prepared
    env = cli_env(prepared["folders"], nnUNet_contrastive_epochs=3, nnUNet_contrastive_pretrain_epochs=1,
                  nnUNet_contrastive_iterations=10, nnUNet_contrastive_val_iterations=1)
    out = run_cli(["nnUNetv2_train", PHANTOM_ID, "2d", "0", "-tr", "nnUNetTrainerSPConHard", "-p", PLANS,
                   "-device", "cpu"], env)
    assert "hard weights" in out
    ckpt = torch.load(os.path.join(_fold_dir(prepared, "nnUNetTrainerSPConHard"), "checkpoint_final.pth"),
                      map_location="cpu", weights_only=False)
    assert ckpt["trainer_name"] == "nnUNetTrainerSPConHard"
    # hard weights are 0 or 1 per pair: their mean equals the fraction of non-zero weights
    log = ckpt["logging"]
    assert log["w_mean_partition"] == pytest.approx(log["w_nonzero_partition"])
    dice = predict_and_dice(prepared, "nnUNetTrainerSPConHard", env, "checkpoint_final.pth", "pred_hard")
    assert dice > 0.05


# ---------------------------------------------------------------------------------------------- in-process
@pytest.fixture
def in_process(phantom_prepared, monkeypatch, tmp_path):
    return phantom_in_process(phantom_prepared, monkeypatch, str(tmp_path / "results"), nnUNet_contrastive_epochs=4,
                              nnUNet_contrastive_pretrain_epochs=2, nnUNet_contrastive_iterations=2,
                              nnUNet_contrastive_val_iterations=1)


def _trainer(prepared, cls_name="nnUNetTrainerSPCon"):
    return build_trainer(prepared, cls_name)


class _Interrupt(Exception):
    pass


def test_resume_restores_stage_gamma_teacher_head_and_optimizer(in_process):
    a = _trainer(in_process)
    a.save_every = 1
    original = a.on_epoch_start

    def stop_at_3():
        if a.current_epoch == 3:
            raise _Interrupt()
        original()

    a.on_epoch_start = stop_at_3
    with pytest.raises(_Interrupt):
        a.run_training()
    latest = os.path.join(a.output_folder, "checkpoint_latest.pth")
    assert os.path.isfile(latest)

    b = _trainer(in_process)
    b.load_checkpoint(latest)
    assert b.current_epoch == a.current_epoch == 3
    b.on_train_start()  # a resumed run must NOT re-sync the teacher from the student
    for (ka, va), (kb, vb) in zip(a.teacher.state_dict().items(), b.teacher.state_dict().items()):
        assert ka == kb
        assert (va == vb) if not torch.is_tensor(va) else torch.equal(va, vb), ka
    assert b.teacher.num_updates == a.teacher.num_updates > 0
    for va, vb in zip(a.terms["sp"].head.state_dict().values(), b.terms["sp"].head.state_dict().values()):
        assert torch.equal(va, vb)
    names = b.active_meta_labels
    assert b.progress() == a.plan.progress(3.0)  # schedules are functions of (epoch, iteration)
    assert b.terms["sp"].gammas(names, 4, b.progress()) == a.terms["sp"].gammas(names, 4, a.plan.progress(3.0))
    assert b.active_meta_labels == a.active_meta_labels
    sa, sb = a.optimizer.state_dict()["state"], b.optimizer.state_dict()["state"]
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k]["momentum_buffer"], sb[k]["momentum_buffer"])
                                          for k in sa)
    assert torch.equal(a._flip_generator.get_state(), b._flip_generator.get_state())
    assert b.logger.local_logger.my_fantastic_logging["gamma_partition"] == \
        a.logger.local_logger.my_fantastic_logging["gamma_partition"]
    b._finish_loaders()
    a._finish_loaders()


def test_fresh_start_and_pretrained_weights_resync_the_teacher(in_process):
    from nnunetv2.run.load_pretrained_weights import load_pretrained_weights

    pre = _trainer(in_process, "nnUNetTrainerSPConPretrain")
    assert pre.num_epochs == 2
    pre.run_training()
    ckpt = os.path.join(pre.output_folder, "checkpoint_final.pth")
    assert not os.path.exists(os.path.join(pre.output_folder, "checkpoint_teacher.pth"))

    # stage 2 from the pre-trained encoder: -pretrained_weights loads after initialize(); the teacher follows
    semi = _trainer(in_process, "nnUNetTrainerSPConSemiOnly")
    semi.initialize()
    load_pretrained_weights(semi.network, ckpt, verbose=False)
    semi.on_train_start()
    for (k, t), s in zip(semi.teacher.module.state_dict().items(), semi.network.state_dict().values()):
        assert torch.equal(t, s), k
    semi._finish_loaders()

    # the stock trainer accepts the pre-training checkpoint too
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    plans = json.load(open(os.path.join(in_process["pre"], f"{PLANS}.json")))
    plans["continue_training"] = False
    stock = nnUNetTrainer(plans, "2d", 0, json.load(open(os.path.join(in_process["pre"], "dataset.json"))),
                          device=torch.device("cpu"))
    stock.initialize()
    load_pretrained_weights(stock.network, ckpt, verbose=False)
    saved = torch.load(ckpt, map_location="cpu", weights_only=False)["network_weights"]
    enc = {k: v for k, v in stock.network.state_dict().items() if k.startswith("encoder.")}
    assert enc and all(torch.equal(v, saved[k]) for k, v in enc.items())


def test_missing_required_meta_label_stops_with_a_clear_error(in_process):
    from nnunet_contrastive.trainers.spcon import MetaLabelError

    phase = _trainer(in_process, "nnUNetTrainerSPConPhase")
    with pytest.raises(MetaLabelError, match=r"phase.*Dataset991_E2E"):
        phase.resolve_meta_labels(["partition", "patient"])
    spcon = _trainer(in_process)
    assert spcon.resolve_meta_labels(["partition", "patient"]) == ["partition", "patient"]
    assert _trainer(in_process, "nnUNetTrainerSPConPatient").resolve_meta_labels(["partition", "patient"]) == \
        ["patient"]


def test_spcon_steps_never_read_unlabeled_labels(in_process, tmp_path, monkeypatch):
    """Stage 1 reads no label at all; stage 2 only those of labeled cases: hide the others and train."""
    monkeypatch.setenv("nnUNet_contrastive_pretrain_epochs", "1")
    t = _trainer(in_process)
    t.initialize()
    t.do_split()
    hidden = []
    data_dir = t.preprocessed_dataset_folder
    for case in t.unlabeled_keys + t.labeled_keys:
        src = os.path.join(data_dir, f"{case}_seg.b2nd")
        dst = os.path.join(str(tmp_path), os.path.basename(src))
        shutil.move(src, dst)
        hidden.append((src, dst))
    try:
        t.on_train_start()
        t.current_epoch = 0
        for _ in range(2):  # stage 1: no label file exists at all
            out = t.train_step(next(t.dataloader_train))
            assert np.isfinite(out["loss"])
        for src, dst in hidden:  # stage 2 may read labeled cases' labels, never the unlabeled ones
            if os.path.basename(src)[: -len("_seg.b2nd")] in t.labeled_keys:
                shutil.move(dst, src)
        t.current_epoch = 1
        t.on_epoch_start()
        for _ in range(2):
            batch = next(t.dataloader_train)
            labeled = np.asarray(batch["labeled"])
            assert set(batch["keys"][labeled]) <= set(t.labeled_keys)
            # stage 2: the plans' full batch of labeled rows (as stock nnU-Net) plus 8 * 0.5 unlabeled rows
            assert labeled.sum() == t.batch_size == 8 and (~labeled).sum() == 4
            out = t.train_step(batch)
            assert np.isfinite(out["loss"])
        t._finish_loaders()
    finally:
        for src, dst in hidden:
            if os.path.exists(dst):
                shutil.move(dst, src)


def test_pretrain_env_only_shortens_an_existing_pretraining_stage(in_process):
    """nnUNet_contrastive_pretrain_epochs=2 (set by the fixture) must not give stage-2-only trainers a stage 1."""
    assert _trainer(in_process).pretrain_epochs == 2
    assert _trainer(in_process, "nnUNetTrainerSPConSemiOnly").pretrain_epochs == 0
    assert _trainer(in_process, "nnUNetTrainerMeanTeacher").pretrain_epochs == 0
    assert _trainer(in_process, "nnUNetTrainerUnsupCon").pretrain_epochs == 2


def test_loader_build_splits_once_per_stage(in_process, monkeypatch):
    """get_dataloaders runs do_split (which logs and writes labeled_subset.json) once, in both stages."""
    t = _trainer(in_process)
    t.initialize()
    calls = []
    original = t.do_split
    monkeypatch.setattr(t, "do_split", lambda: calls.append(1) or original())
    for epoch in (0, t.pretrain_epochs):  # stage 1, stage 2
        t.current_epoch = epoch
        calls.clear()
        t.dataloader_train, t.dataloader_val = t.get_dataloaders()
        assert len(calls) == 1, (epoch, len(calls))
        t._finish_loaders()


def test_warmup_and_paper_batch_variants_change_only_what_they_say(in_process):
    """nnUNetTrainerSPConWarmup: stage 2 starts at ~0 LR and reaches the poly LR after 10 % of the stage (SPCon:
    the full LR at the switch). nnUNetTrainerSPConPaperBatch: stage-1 batches of 10 volumes x 3 partitions (at most
    the volumes there are), two views each, whatever the plans' batch size; stage 2 as SPCon's."""
    spcon, warm = _trainer(in_process), _trainer(in_process, "nnUNetTrainerSPConWarmup")
    for t in (spcon, warm):
        t.initialize()
    switch, stage2 = spcon.pretrain_epochs, spcon.num_epochs - spcon.pretrain_epochs
    lr0 = spcon.initial_lr

    def lr_at(t, epoch):
        t.lr_scheduler.set(epoch)
        return t.optimizer.param_groups[0]["lr"]

    assert lr_at(spcon, switch) == pytest.approx(lr0)
    assert lr_at(warm, switch) <= 1e-3 * lr0 + 1e-12
    half = switch + 0.05 * stage2  # halfway through the warm-up (10 % of stage 2)
    assert lr_at(warm, half) == pytest.approx(0.5 * lr0 * (1 - 0.05) ** 0.9)
    after = switch + 0.5 * stage2
    assert lr_at(warm, after) == pytest.approx(lr_at(spcon, after)) == pytest.approx(lr0 * 0.5 ** 0.9)
    assert lr_at(warm, 0) == pytest.approx(lr0)  # stage 1 untouched

    paper = _trainer(in_process, "nnUNetTrainerSPConPaperBatch")
    paper.initialize()
    assert paper.batch_size == 8
    paper.current_epoch = 0
    paper.dataloader_train, paper.dataloader_val = paper.get_dataloaders()
    batch = next(paper.dataloader_train)
    n_volumes = len(set(batch["keys"]))
    with open(os.path.join(in_process["pre"], "splits_final.json")) as f:
        images = len(json.load(f)[0]["train"])  # stage 1 reads every training image of the fold, labeled or not
    assert n_volumes == min(10, images) and batch["data"].shape[0] == 3 * n_volumes
    assert batch["data_view2"].shape == batch["data"].shape
    default = _trainer(in_process)
    assert repr(paper.semi_stage()) == repr(default.semi_stage())  # (the ramp objects have no __eq__)
    paper._finish_loaders()


def test_more_unlabeled_variant_draws_as_many_unlabeled_rows_as_labeled(in_process):
    """nnUNetTrainerSPConSemiOnlyMoreUnlabeled: stage 2 batches of the plans' 8 labeled rows plus 8 unlabeled rows
    (SemiOnly: 8 + 4), two views each; no stage 1; otherwise SemiOnly's stage (terms, trained parts, teacher)."""
    semi, more = _trainer(in_process, "nnUNetTrainerSPConSemiOnly"), \
        _trainer(in_process, "nnUNetTrainerSPConSemiOnlyMoreUnlabeled")
    for t, n_unlabeled in ((semi, 4), (more, 8)):
        t.initialize()
        assert [s.name for s in t.plan.stages] == ["semi"]
        t.current_epoch = 0
        t.dataloader_train, t.dataloader_val = t.get_dataloaders()  # splits the fold (unlabeled_keys)
        batch = next(t.dataloader_train)
        labeled = np.asarray(batch["labeled"])
        assert labeled.sum() == t.batch_size == 8 and (~labeled).sum() == n_unlabeled
        assert set(batch["keys"][~labeled]) <= set(t.unlabeled_keys)
        assert batch["data_view2"].shape == batch["data"].shape
        t._finish_loaders()
    s_semi, s_more = semi.plan.stages[0], more.plan.stages[0]
    assert (s_more.trains, s_more.term_names, s_more.resync_teacher, s_more.flip_student) == \
        (s_semi.trains, s_semi.term_names, s_semi.resync_teacher, s_semi.flip_student)


def test_class_balanced_variant_changes_only_the_mean_teacher_reduction(in_process):
    """nnUNetTrainerSPConSemiOnlyClassBalanced: SemiOnly's stage (loader, terms, weights, teacher) with the Mean
    Teacher term reducing per teacher class (terms.pseudo_label.class_balanced_mean); SemiOnly keeps the plain mean."""
    from nnunet_contrastive.terms.pseudo_label import class_balanced_mean
    semi, balanced = _trainer(in_process, "nnUNetTrainerSPConSemiOnly"), \
        _trainer(in_process, "nnUNetTrainerSPConSemiOnlyClassBalanced")
    assert repr(type(balanced).declare_stages()) == repr(type(semi).declare_stages())
    for t in (semi, balanced):
        t.initialize()  # builds the terms (configure_optimizers)
    assert semi.terms["mt"].reduction is None
    assert balanced.terms["mt"].reduction is class_balanced_mean
    assert sorted(balanced.terms) == sorted(semi.terms) == ["mt", "sp", "sup"]
