"""nnUNetTrainerComposed (SPCon's stage 2 as warm-up, then PLCon's pseudo-label rounds with Mean Teacher and the
meta-label contrast kept): its stage declaration, one self-paced pace over the whole run, all four terms in a
round's step with pseudo-labels on both views, unlabeled labels never read, and nnU-Net's CLI end to end."""
from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch

from conftest import build_trainer, hide_label_files, phantom_in_process, predict_and_dice, train_phantom_cli


def test_stages_warm_up_half_the_run_then_three_rounds_with_every_term(monkeypatch):
    from nnunet_contrastive.trainers import nnUNetTrainerComposed as C

    for total, expected in ((30, [15, 5, 5, 5]), (1000, [500, 167, 167, 166])):
        monkeypatch.setenv("nnUNet_contrastive_epochs", str(total))
        plan = C.stage_plan(total)
        assert [s.name for s in plan.stages] == ["warmup", "round1", "round2", "round3"]
        assert [s.epochs for s in plan.stages] == expected
    warm, r1, r2, r3 = plan.stages
    assert [u.term for u in warm.terms] == ["sup", "mt", "sp"]
    assert [(u.term, u.rows) for u in r1.terms] == [("plcon", "all"), ("sup", "labeled"), ("mt", "unlabeled"),
                                                    ("sp", "unlabeled")]
    assert all(s.flip_student and s.loader.views == 2 and s.loader.share_spatial and s.loader.unlabeled == 0.5
               for s in plan.stages)
    assert set(r1.trains) == {"network", "sp", "plcon"} and set(warm.trains) == {"network", "sp"}
    # the Mean-Teacher ramp covers the first 20 % of the RUN (40 % of the half-run warm-up), then full weight
    mt = {s.name: next(u for u in s.terms if u.term == "mt") for s in plan.stages}
    assert mt["warmup"].weight_at(0.4) == pytest.approx(1.0) and mt["warmup"].weight_at(0.2) == pytest.approx(
        math.exp(-5 * 0.5 ** 2))
    assert all(mt[r].weight_at(0.0) == 1.0 for r in ("round1", "round2", "round3"))
    # round 1 restarts the LR and momentum (as PLConLongWarmup), the teacher is never re-synced after the start
    assert [s.fresh_lr for s in plan.stages] == [True, True, False, False]
    assert [s.resync_teacher for s in plan.stages[1:]] == [False, False, False]
    assert C.pretraining_stage_names() == [] and C.needs_unlabeled()


def test_one_lr_variant_follows_one_poly_decay_over_the_run(monkeypatch):
    """ComposedOneLR: no LR restart or momentum reset at round 1, so its LR at every epoch is nnU-Net's single poly
    decay over the run (SPConSemiOnly's), while the default's restarts at round 1."""
    from nnunet_contrastive.framework.stages import StagedPolyLR
    from nnunet_contrastive.trainers import nnUNetTrainerComposed, nnUNetTrainerComposedOneLR

    monkeypatch.setenv("nnUNet_contrastive_epochs", "30")
    one, default = nnUNetTrainerComposedOneLR.stage_plan(30), nnUNetTrainerComposed.stage_plan(30)
    assert [s.epochs for s in one.stages] == [s.epochs for s in default.stages]
    assert [s.fresh_lr for s in one.stages] == [True, False, False, False]
    assert not any(s.fresh_momentum for s in one.stages[1:])
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.01)
    for epoch in (0.0, 10.0, 15.0, 22.5, 29.0):
        assert StagedPolyLR(opt, 0.01, one).lr_at(epoch) == pytest.approx(0.01 * (1 - epoch / 30) ** 0.9)
    assert StagedPolyLR(opt, 0.01, default).lr_at(15.0) == pytest.approx(0.01)


def _two_step_epochs(prepared, monkeypatch, tmp_path, stage_epochs):
    """The phantom dataset prepared for in-process trainers: one epoch of 2 iterations per stage."""
    return phantom_in_process(prepared, monkeypatch, str(tmp_path / "results"),
                              nnUNet_contrastive_stage_epochs=stage_epochs, nnUNet_contrastive_iterations=2,
                              nnUNet_contrastive_val_iterations=1)


@pytest.fixture
def in_process(phantom_prepared, monkeypatch, tmp_path):
    return _two_step_epochs(phantom_prepared, monkeypatch, tmp_path, "1,1,1,1")


@pytest.mark.slow
def test_a_round_step_sums_all_four_terms_on_pseudo_labels_without_reading_unlabeled_labels(in_process, tmp_path):
    t = build_trainer(in_process, "nnUNetTrainerComposed")
    t.initialize()
    t.do_split()
    with hide_label_files(t, t.unlabeled_keys, str(tmp_path)):
        t.on_train_start()  # warm-up: Mean Teacher + meta-label contrast, no pseudo-labels
        out = t.train_step(next(t.dataloader_train))
        assert np.isfinite(out["loss"])
        assert {"sup_loss", "mt_loss", "sp_loss"} <= set(t._epoch_stats) and "plcon_loss" not in t._epoch_stats
        t.current_epoch = 1
        t.on_epoch_start()  # round 1: pseudo-labels estimated from image-only reads, two-view mixed loaders
        assert t.pseudo_label_store.is_complete(1)
        batch = next(t.dataloader_train)
        labeled = torch.as_tensor(np.asarray(batch["labeled"]))
        assert int(labeled.sum()) == t.batch_size and int((~labeled).sum()) == round(0.5 * t.batch_size)
        for suffix in ("", "_view2"):  # both views carry the pseudo-label, -1 on labeled rows
            pl = batch["pseudo_target" + suffix]
            assert (pl[labeled] == -1).all() and (pl[~labeled] >= 0).all()
        # the views share the spatial transform: their pseudo-labels agree wherever both are defined
        assert torch.equal(batch["pseudo_target"], batch["pseudo_target_view2"])
        t._epoch_stats = {}
        head_before = [p.detach().clone() for p in t.terms["plcon"].head.parameters()]
        out = t.train_step(batch)
        assert np.isfinite(out["loss"])
        assert {"plcon_loss", "sup_loss", "mt_loss", "sp_loss"} <= set(t._epoch_stats)
        assert any(not torch.equal(a, b) for a, b in zip(head_before, t.terms["plcon"].head.parameters()))
        # one pace over the run: at round 1's first step (epoch 1 of 4) gamma is at training progress 1/4, not at
        # the round's progress 0 (Eq. 16 with p = 0.5, times the largest pair loss of the unlabeled rows)
        sp = t.terms["sp"]
        n = int((~labeled).sum())
        upper = math.log(1 + 2 * (n - 1) * math.exp(2 / sp.temperature))
        g0, g1 = t.gamma_start["partition"], t.gamma_end["partition"]
        assert float(t._epoch_stats["gamma_partition"][0]) == pytest.approx(upper * (g0 + (g1 - g0) * 0.25 ** 0.5),
                                                                           rel=1e-6)
        t._finish_loaders()


@pytest.mark.slow
def test_composed_cli_train_predict_evaluate(phantom_prepared):
    prepared = phantom_prepared
    out, env, fold = train_phantom_cli(prepared, "nnUNetTrainerComposed", nnUNet_contrastive_stage_epochs="2,1,1,1")
    assert "Pseudo-labels round 3 complete" in out and "plcon_loss" in out and "mt_loss" in out
    assert "gamma_partition" in out
    for f in ("checkpoint_final.pth", "checkpoint_teacher.pth", "checkpoint_warmup_end.pth",
              "progress_contrastive.png", "pseudo_labels/round_3/manifest.json"):
        assert os.path.isfile(os.path.join(fold, f)), f
    dice = predict_and_dice(prepared, "nnUNetTrainerComposed", env, out_name="pred_composed")
    assert dice > 0.05


# ------------------------------------------------------------------ SPCon with copy-paste in place of Mean Teacher
def test_spcon_bcp_declares_spcon_stages_with_copy_paste_in_place_of_mean_teacher():
    from nnunet_contrastive.trainers import nnUNetTrainerSPCon, nnUNetTrainerSPConBCP

    bcp, spcon = nnUNetTrainerSPConBCP.stage_plan(1000), nnUNetTrainerSPCon.stage_plan(1000)
    assert [(s.name, s.epochs) for s in bcp.stages] == [(s.name, s.epochs) for s in spcon.stages] == \
        [("pretrain", 100), ("semi", 900)]
    assert bcp.stages[0] == spcon.stages[0]  # the same label-free pre-training
    semi, ref = bcp.stages[1], spcon.stages[1]
    assert [(u.term, u.rows) for u in semi.terms] == [("sup", "labeled"), ("bcp", "all"), ("sp", "unlabeled")]
    assert [(u.term, u.rows) for u in ref.terms] == [("sup", "labeled"), ("mt", "unlabeled"), ("sp", "unlabeled")]
    # the copy-paste term takes Mean Teacher's ramp: sigmoid over the first 20 % of the stage, then 1
    for p in (0.0, 0.1, 0.2, 0.5):
        assert semi.terms[1].weight_at(p) == pytest.approx(ref.terms[1].weight_at(p))
    assert semi.terms[1].weight_at(0.1) == pytest.approx(math.exp(-5 * 0.5 ** 2))
    assert semi.loader == ref.loader and semi.loader.views == 2 and semi.flip_student and semi.resync_teacher


@pytest.fixture
def spcon_bcp_in_process(phantom_prepared, monkeypatch, tmp_path):
    return _two_step_epochs(phantom_prepared, monkeypatch, tmp_path, "1,1")


@pytest.mark.slow
def test_spcon_bcp_stage2_step_trains_copy_paste_and_contrast_without_reading_unlabeled_labels(
        spcon_bcp_in_process, tmp_path):
    t = build_trainer(spcon_bcp_in_process, "nnUNetTrainerSPConBCP")
    t.initialize()
    t.do_split()
    assert set(t.terms) == {"sup", "bcp", "sp"}
    with hide_label_files(t, t.unlabeled_keys, str(tmp_path)):
        t.on_train_start()
        out = t.train_step(next(t.dataloader_train))  # stage 1: the contrast alone
        assert np.isfinite(out["loss"]) and "sp_loss" in t._epoch_stats and "bcp_loss" not in t._epoch_stats
        t._finish_loaders()
        t.current_epoch = 1
        t.on_epoch_start()  # stage 2
        t._epoch_stats = {}
        before = [p.detach().clone() for p in t.network.decoder.parameters()]
        out = t.train_step(next(t.dataloader_train))
        assert np.isfinite(out["loss"])
        assert {"sup_loss", "bcp_loss", "sp_loss", "bcp_pseudo_foreground"} <= set(t._epoch_stats)
        assert "mt_loss" not in t._epoch_stats
        assert any(not torch.equal(a, b) for a, b in zip(before, t.network.decoder.parameters()))
        t._finish_loaders()
