"""nnUNetTrainerPLCon on tiny phantoms: stages, pseudo-label rounds (estimation, resume mid-round and mid-estimation,
never recomputed), labels of unlabeled cases never read, the term's gradient, and nnU-Net's CLI end to end."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from conftest import build_trainer, hide_label_files, phantom_in_process, predict_and_dice, train_phantom_cli

pytestmark = pytest.mark.slow


@pytest.fixture
def in_process(phantom_prepared, monkeypatch, tmp_path):
    return phantom_in_process(phantom_prepared, monkeypatch, str(tmp_path / "results"),
                              nnUNet_contrastive_stage_epochs="1,1,1,1", nnUNet_contrastive_iterations=2,
                              nnUNet_contrastive_val_iterations=1)


class _Interrupt(Exception):
    pass


def test_stages_follow_the_run_length(monkeypatch):
    from nnunet_contrastive.trainers import nnUNetTrainerPLCon, nnUNetTrainerPLConIntra

    monkeypatch.delenv("nnUNet_contrastive_epochs", raising=False)
    monkeypatch.delenv("nnUNet_contrastive_stage_epochs", raising=False)
    plan = nnUNetTrainerPLCon.stage_plan()
    assert [(s.name, s.epochs) for s in plan.stages] == [("warmup", 250), ("round1", 250), ("round2", 250),
                                                         ("round3", 250)]
    monkeypatch.setenv("nnUNet_contrastive_epochs", "10")
    stages = nnUNetTrainerPLCon.declare_stages()
    assert [(s.name, s.epochs) for s in stages] == [("warmup", 2), ("round1", 3), ("round2", 3), ("round3", 2)]
    warm, r1, r2 = stages[:3]
    assert warm.term_names == ["sup"] and warm.loader.unlabeled == 0  # supervised warm-up on labeled cases
    assert [(u.term, u.rows, u.weight) for u in r1.terms] == [("sup", "labeled", 1.0), ("plcon", "all", 0.1)]
    assert r1.fresh_lr and not r2.fresh_lr and r1.loader.unlabeled == 0.5
    assert nnUNetTrainerPLCon.needs_unlabeled() and not nnUNetTrainerPLCon.pretraining_stage_names()
    assert nnUNetTrainerPLConIntra.inter_image is False
    from nnunet_contrastive.trainers import nnUNetTrainerPLConLongWarmup

    assert [(s.name, s.epochs) for s in nnUNetTrainerPLConLongWarmup.declare_stages()] == [
        ("warmup", 5), ("round1", 2), ("round2", 2), ("round3", 1)]
    from nnunet_contrastive.trainers import nnUNetTrainerPLConSelfTrain

    st = nnUNetTrainerPLConSelfTrain.declare_stages()
    assert st[0].term_names == ["sup"]  # the warm-up has no pseudo-labels yet
    for s in st[1:]:  # every round adds CE on the unlabeled rows' pseudo-labels
        assert [(u.term, u.rows, u.weight) for u in s.terms] == [("sup", "labeled", 1.0), ("plcon", "all", 0.1),
                                                                ("plce", "unlabeled", 1.0)]
    from nnunet_contrastive.trainers import nnUNetTrainerPLConSelfTrainLongWarmup

    lw = nnUNetTrainerPLConSelfTrainLongWarmup.declare_stages()  # half the run as warm-up, then the same rounds
    assert [(s.name, s.epochs) for s in lw] == [("warmup", 5), ("round1", 2), ("round2", 2), ("round3", 1)]
    assert [[u.term for u in s.terms] for s in lw[1:]] == [["sup", "plcon", "plce"]] * 3


def test_variants_lowce_and_one_lr_schedule(monkeypatch):
    """LowCE only lowers the pseudo-label CE weight; both OneLR variants' runs follow FewLabels' single poly decay
    0.01 (1 - e / E) ** 0.9 through the warm-up and the rounds, where LongWarmup restarts at round 1."""
    from nnunet_contrastive.framework.stages import StagedPolyLR
    from nnunet_contrastive.trainers import (nnUNetTrainerPLConLongWarmupOneLR, nnUNetTrainerPLConSelfTrainLongWarmup,
                                             nnUNetTrainerPLConSelfTrainLongWarmupLowCE,
                                             nnUNetTrainerPLConSelfTrainLongWarmupOneLR)

    monkeypatch.setenv("nnUNet_contrastive_epochs", "10")
    monkeypatch.delenv("nnUNet_contrastive_stage_epochs", raising=False)
    low = nnUNetTrainerPLConSelfTrainLongWarmupLowCE.declare_stages()
    assert [(s.name, s.epochs) for s in low] == [("warmup", 5), ("round1", 2), ("round2", 2), ("round3", 1)]
    assert [[(u.term, u.weight) for u in s.terms] for s in low[1:]] == [
        [("sup", 1.0), ("plcon", 0.1), ("plce", 0.3)]] * 3
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.01)
    for one_lr in (nnUNetTrainerPLConSelfTrainLongWarmupOneLR, nnUNetTrainerPLConLongWarmupOneLR):
        one = StagedPolyLR(opt, 0.01, one_lr.stage_plan())
        for e in [0.0, 2.5, 4.9, 5.0, 6.5, 9.9]:
            assert one.lr_at(e) == pytest.approx(0.01 * (1 - e / 10) ** 0.9)
        assert not any(s.fresh_lr or s.fresh_momentum for s in one_lr.declare_stages()[1:])
    restart = StagedPolyLR(opt, 0.01, nnUNetTrainerPLConSelfTrainLongWarmup.stage_plan())
    assert restart.lr_at(5.0) == pytest.approx(0.01) and restart.lr_at(4.9) == pytest.approx(0.01 * 0.02 ** 0.9)


def test_longwarmup_candidates_confident_and_one_lr(monkeypatch):
    """LongWarmupConfident declares LongWarmup's stages (no pseudo-label CE) and only filters the contrast's
    unlabeled pixels; LongWarmupOneLR declares the same terms, without LongWarmup's restart at round 1 (its LR
    schedule: test_variants_lowce_and_one_lr_schedule)."""
    from nnunet_contrastive.trainers import (nnUNetTrainerPLConLongWarmup, nnUNetTrainerPLConLongWarmupConfident,
                                             nnUNetTrainerPLConLongWarmupOneLR)

    monkeypatch.setenv("nnUNet_contrastive_epochs", "10")
    monkeypatch.delenv("nnUNet_contrastive_stage_epochs", raising=False)
    lw = nnUNetTrainerPLConLongWarmup.declare_stages()
    assert nnUNetTrainerPLConLongWarmupConfident.declare_stages() == lw
    assert [[(u.term, u.weight) for u in s.terms] for s in lw[1:]] == [[("sup", 1.0), ("plcon", 0.1)]] * 3
    assert (nnUNetTrainerPLConLongWarmupConfident.min_confidence, nnUNetTrainerPLConLongWarmup.min_confidence) == (
        0.9, 0.0)
    one = nnUNetTrainerPLConLongWarmupOneLR.declare_stages()
    assert [[u.term for u in s.terms] for s in one] == [[u.term for u in s.terms] for s in lw]
    assert not any(s.fresh_lr or s.fresh_momentum for s in one[1:]) and lw[1].fresh_lr and lw[1].fresh_momentum


def _train_until_estimating(trainer, r: int, write_first: bool) -> None:
    """Train until round r's pseudo-label estimation writes its first case, then stop (after writing that case
    when write_first)."""
    import nnunet_contrastive.data.pseudo_labels as PL

    original = PL.PseudoLabelStore.write_case

    def write_or_stop(self, rr, case, labels, confidence):
        if rr != r or write_first:
            original(self, rr, case, labels, confidence)
        if rr == r:
            raise _Interrupt()

    PL.PseudoLabelStore.write_case = write_or_stop
    try:
        with pytest.raises(_Interrupt):
            trainer.run_training()
    finally:
        PL.PseudoLabelStore.write_case = original
    trainer._finish_loaders()


def test_rounds_estimate_resume_mid_estimation_and_never_recompute(in_process):
    """Round 1 is estimated at the end of the warm-up; the run is stopped while round 2 is being estimated (one
    case written); --c restarts round 2 from the same network state (the written case is kept), never recomputes
    round 1, and finishes rounds 2 and 3 with their statistics logged."""
    a = build_trainer(in_process, "nnUNetTrainerPLCon")
    a.save_every = 1
    store = a.pseudo_label_store
    _train_until_estimating(a, 2, write_first=True)
    n_unl = len(a.unlabeled_keys)
    assert n_unl > 1
    m1 = store.manifest(1)
    assert m1["complete"] and m1["state"]["epoch"] == 1 and len(m1["cases"]) == n_unl
    assert m1["changed_fraction"] is None and 0.0 <= m1["val_dice_mean"] <= 1.0 and m1["seconds_per_case"] > 0
    m2 = store.manifest(2)
    assert not m2["complete"] and m2["state"]["epoch"] == 2
    written = [f for f in os.listdir(store.round_dir(2)) if f.endswith("_pl.npy")]
    assert len(written) == 1
    r1_files = {f: os.path.getmtime(os.path.join(store.round_dir(1), f)) for f in os.listdir(store.round_dir(1))}
    # every pseudo-label is a valid label map on the preprocessed grid of its case
    case = m1["cases"][0]
    pl = np.load(os.path.join(store.round_dir(1), f"{case}_pl.npy"))
    conf = np.load(os.path.join(store.round_dir(1), f"{case}_conf.npy"))
    import blosc2

    img = blosc2.open(os.path.join(a.preprocessed_dataset_folder, f"{case}.b2nd"))
    assert pl.shape == (1, *img.shape[1:]) and set(np.unique(pl).tolist()) <= set(a.label_manager.all_labels)
    assert conf.shape == pl.shape and conf.min() >= 1 / len(a.label_manager.all_labels) - 1e-3 and conf.max() <= 1.0

    b = build_trainer(in_process, "nnUNetTrainerPLCon")
    b.load_checkpoint(os.path.join(b.output_folder, "checkpoint_latest.pth"))
    assert b.current_epoch == 2  # the stop came before epoch 2 (round 2) started
    logs = []
    b.print_to_log_file = lambda *args, **kw: logs.append(" ".join(str(x) for x in args))
    b.run_training()
    assert any("1 kept from an interrupted estimation with the same network" in s for s in logs)
    assert any("Pseudo-labels round" in s and "changed since round 1" in s for s in logs)
    assert {f: os.path.getmtime(os.path.join(store.round_dir(1), f)) for f in os.listdir(store.round_dir(1))} \
        == r1_files  # round 1 never recomputed
    m2, m3 = store.manifest(2), store.manifest(3)
    assert m2["complete"] and m2["num_estimated"] == n_unl - 1 and m3["complete"] and m3["state"]["epoch"] == 3
    assert 0.0 <= m2["changed_fraction"] <= 1.0
    log = b.logger.local_logger.my_fantastic_logging
    assert np.isnan(log["plcon_loss"][0]) and all(np.isfinite(log["plcon_loss"][1:4]))
    assert log["plcon_round"][1:4] == [1.0, 2.0, 3.0]
    assert log["plcon_val_dice"][3] == pytest.approx(m3["val_dice_mean"])
    assert log["plcon_changed"][2] == pytest.approx(m2["changed_fraction"])
    assert all(k in log for k in ("plcon_anchors_c1", "plcon_anchors_c2", "plcon_images"))
    ckpt = torch.load(os.path.join(b.output_folder, "checkpoint_final.pth"), map_location="cpu", weights_only=False)
    assert any(k.startswith("plcon.head.") for k in ckpt["nnunet_contrastive"]["terms"])
    assert not any("plcon" in k or "head" in k for k in ckpt["network_weights"])  # head outside the network

    # a third start in the last round: every round is complete, nothing is estimated again
    c = build_trainer(in_process, "nnUNetTrainerPLCon")
    c.load_checkpoint(os.path.join(c.output_folder, "checkpoint_final.pth"))  # nnU-Net deletes checkpoint_latest
    logs.clear()
    c.print_to_log_file = lambda *args, **kw: logs.append(" ".join(str(x) for x in args))
    c.current_epoch = 3
    c.on_train_start()
    assert any("round 3: complete" in s and "not recomputed" in s for s in logs)
    c._finish_loaders()


def _same(a, b) -> bool:
    """Nested checkpoint contents equal (tensors by value)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return np.array_equal(a, b)
    return a == b


def _start_from_kept_warmup(prepared, source, trainer: str):
    """``trainer`` on the phantoms, resumed from ``source``'s checkpoint_warmup_end.pth as the benchmark's
    --share-warmup does (copied into its fold folder as checkpoint_latest.pth, then --c)."""
    import shutil

    b = build_trainer(prepared, trainer)
    os.makedirs(b.output_folder, exist_ok=True)
    shutil.copyfile(os.path.join(source.output_folder, "checkpoint_warmup_end.pth"),
                    os.path.join(b.output_folder, "checkpoint_latest.pth"))
    b.load_checkpoint(os.path.join(b.output_folder, "checkpoint_latest.pth"))
    return b


def test_warmup_end_is_kept_and_starts_a_variant_with_the_same_warmup(in_process):
    """checkpoint_warmup_end.pth holds the state at the switch to round 1 (network, optimizer, generators, log: all
    equal to checkpoint_latest.pth of that epoch), no other stage's end is kept, and a variant with the same warm-up
    key (self-training) resumes from it with --c and trains its rounds."""
    a = build_trainer(in_process, "nnUNetTrainerPLCon")
    a.save_every = 1
    _train_until_estimating(a, 1, write_first=False)  # round 1 is estimated right after the warm-up's last epoch
    load = lambda p: torch.load(p, map_location="cpu", weights_only=False)  # noqa: E731
    latest = load(os.path.join(a.output_folder, "checkpoint_latest.pth"))
    kept = load(os.path.join(a.output_folder, "checkpoint_warmup_end.pth"))
    assert kept["current_epoch"] == latest["current_epoch"] == 1
    for key in ("network_weights", "optimizer_state", "logging", "nnunet_contrastive"):
        assert _same(kept[key], latest[key]), key
    assert kept["nnunet_contrastive"]["rng"] is not None

    from nnunet_contrastive.trainers import nnUNetTrainerPLCon, nnUNetTrainerPLConSelfTrain

    assert nnUNetTrainerPLConSelfTrain.warmup_key() == nnUNetTrainerPLCon.warmup_key()
    b = _start_from_kept_warmup(in_process, a, "nnUNetTrainerPLConSelfTrain")
    assert b.current_epoch == 1
    assert all(torch.equal(v, kept["network_weights"][k]) for k, v in b.network.state_dict().items())
    b.run_training()
    assert os.path.isfile(os.path.join(b.output_folder, "checkpoint_final.pth"))
    log = b.logger.local_logger.my_fantastic_logging
    assert np.isnan(log["plce_loss"][0]) and all(np.isfinite(log["plce_loss"][1:4]))
    assert [f for f in os.listdir(b.output_folder) if f.endswith("_end.pth")] == []  # the rounds' ends: not kept


def test_a_run_started_from_the_kept_warmup_repeats_the_uninterrupted_run(in_process, monkeypatch):
    """Seeded: a trainer with the same warm-up key and rounds (LongWarmup, under the stage-length variable) started
    from PLCon's checkpoint_warmup_end.pth trains every round epoch bit-identically to PLCon's uninterrupted run
    (the generators are restored before the round's loaders are built and its pseudo-labels estimated, as the
    uninterrupted run drew them after writing that checkpoint)."""
    monkeypatch.setenv("nnUNet_contrastive_stage_epochs", "1,2,1,1")  # two epochs in round 1: resume inside a stage
    snaps = {}

    def record(trainer, tag):
        original = trainer.on_epoch_end

        def on_epoch_end():
            snaps[tag, trainer.current_epoch] = {k: v.detach().clone() for k, v in trainer.network.state_dict().items()}
            original()
        trainer.on_epoch_end = on_epoch_end

    a = build_trainer(in_process, "nnUNetTrainerPLCon")
    record(a, "a")
    a.run_training()
    b = _start_from_kept_warmup(in_process, a, "nnUNetTrainerPLConLongWarmup")
    record(b, "b")
    b.run_training()
    assert sorted(e for t, e in snaps if t == "b") == [1, 2, 3, 4]
    for e in (1, 2, 3, 4):  # every epoch trains (the weights move), and both runs move the same way
        assert any(not torch.equal(snaps["a", e][k], v) for k, v in snaps["a", e - 1].items()), f"epoch {e}"
        assert all(torch.equal(snaps["a", e][k], v) for k, v in snaps["b", e].items()), f"epoch {e}"
    for r in (1, 2, 3):
        assert np.array_equal(np.load(os.path.join(a.pseudo_label_store.round_dir(r), f"{a.unlabeled_keys[0]}_pl.npy")),
                              np.load(os.path.join(b.pseudo_label_store.round_dir(r), f"{a.unlabeled_keys[0]}_pl.npy")))


def test_teacher_variant_from_a_kept_warmup_estimates_rounds_2_3_with_the_ema_teacher(in_process, monkeypatch):
    """LongWarmupTeacher started from LongWarmup's kept warm-up (which has no teacher): round 1 is estimated with
    the network; the teacher becomes the network at round 1's start, is averaged only over the rounds' steps, and
    estimates rounds 2 and 3 (a network that is not the student's); LongWarmup itself keeps no teacher."""
    import nnunet_contrastive.trainers.plcon as P
    from nnunet_contrastive.data.pseudo_labels import network_fingerprint
    from nnunet_contrastive.trainers import nnUNetTrainerPLConLongWarmup, nnUNetTrainerPLConLongWarmupTeacher

    assert nnUNetTrainerPLConLongWarmupTeacher.warmup_key() == nnUNetTrainerPLConLongWarmup.warmup_key()
    a = build_trainer(in_process, "nnUNetTrainerPLConLongWarmup")
    _train_until_estimating(a, 1, write_first=False)
    assert a.teacher is None

    b = _start_from_kept_warmup(in_process, a, "nnUNetTrainerPLConLongWarmupTeacher")
    calls, original = [], P.estimate_round

    def recording(trainer, store, r, *args, network=None, **kw):
        calls.append((r, network_fingerprint(trainer.network if network is None else network),
                      network_fingerprint(trainer.network), network_fingerprint(trainer.teacher.module),
                      trainer.teacher.num_updates))
        return original(trainer, store, r, *args, network=network, **kw)

    monkeypatch.setattr(P, "estimate_round", recording)
    b.run_training()
    assert [c[0] for c in calls] == [1, 2, 3]
    r1, r2, r3 = calls
    assert r1[1] == r1[2] != r1[3]  # round 1: the network; the teacher is not yet synced (no teacher in the warm-up)
    its = b.num_iterations_per_epoch
    for c, updates in ((r2, its), (r3, 2 * its)):  # synced at round 1's start, then one update per rounds' step
        assert c[1] == c[3] != c[2] and c[4] == updates
    manifests = [b.pseudo_label_store.manifest(r)["state"] for r in (1, 2, 3)]
    assert [m.get("source") for m in manifests] == [None, "EMA teacher", "EMA teacher"]
    assert b.teacher.decay == pytest.approx(min(0.999, 1 - 1 / max(2.0, 0.3 * its)))


def test_mirrored_variant_estimates_with_test_time_mirroring(in_process):
    """LongWarmupMirrored declares LongWarmup's stages and warm-up (it may start from its kept warm-up) and its
    round-1 estimate is the mirrored one: the stored confidence is that of nnU-Net's predictor with mirroring, not
    without, and the mirrored logits are equivariant to a flip of the image (the plain ones are not)."""
    from nnunet_contrastive.data.dataloading import load_image_only
    from nnunet_contrastive.data.pseudo_labels import make_predictor, predict_case
    from nnunet_contrastive.trainers import nnUNetTrainerPLConLongWarmup, nnUNetTrainerPLConLongWarmupMirrored

    assert nnUNetTrainerPLConLongWarmupMirrored.warmup_key() == nnUNetTrainerPLConLongWarmup.warmup_key()
    assert nnUNetTrainerPLConLongWarmupMirrored.declare_stages() == nnUNetTrainerPLConLongWarmup.declare_stages()
    t = build_trainer(in_process, "nnUNetTrainerPLConLongWarmupMirrored")
    _train_until_estimating(t, 1, write_first=True)
    ds, case = t.unlabeled_cases()[0]
    stored = np.load(os.path.join(t.pseudo_label_store.round_dir(1), f"{case}_conf.npy"))[0]
    data, _ = load_image_only(ds, case)
    t.set_deep_supervision_enabled(False)
    t.network.eval()
    on, off = make_predictor(t, True), make_predictor(t, False)
    assert np.array_equal(stored, predict_case(on, data)[1]) and not np.array_equal(stored, predict_case(off, data)[1])
    x = torch.randn((data.shape[0], 1, *t.configuration_manager.patch_size), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # one patch-sized tile, no padding: the mirrored average commutes with the flip exactly
        err = {m: float((p.predict_sliding_window_return_logits(x).float() - p.predict_sliding_window_return_logits(
            torch.flip(x, (-1,))).float().flip(-1)).abs().max()) for m, p in (("on", on), ("off", off))}
    assert err["on"] < 0.01 * err["off"], err  # fp16 logits: "on" differs by their rounding only


def test_plcon_never_reads_unlabeled_labels_and_gradients_reach_head_and_network(in_process, tmp_path):
    """Hide every unlabeled case's label file, estimate round 1 and train on mixed batches: the contrast reads
    ground truth on labeled rows and pseudo-labels (never a gradient) on unlabeled rows."""
    t = build_trainer(in_process, "nnUNetTrainerPLConConfident")
    t.initialize()
    t.do_split()
    with hide_label_files(t, t.unlabeled_keys, str(tmp_path)):
        t.on_train_start()  # stage 1: labeled rows only
        t.train_step(next(t.dataloader_train))
        t.current_epoch = 1
        t.on_epoch_start()  # round 1: estimation on image-only reads, then mixed loaders
        assert t.pseudo_label_store.is_complete(1)
        batch = next(t.dataloader_train)
        labeled = np.asarray(batch["labeled"])
        assert labeled.sum() == t.batch_size and (~labeled).sum() == round(0.5 * t.batch_size)
        assert set(batch["keys"][~labeled]) <= set(t.unlabeled_keys)
        assert (batch["pseudo_target"][labeled] == -1).all() and (batch["pseudo_target"][~labeled] >= 0).all()
        assert "pseudo_confidence" in batch and not batch["pseudo_target"].requires_grad
        head = t.terms["plcon"].head
        from nnunet_contrastive.framework.context import StepContext

        ctx = StepContext(batch, t.device, t.network, None, None, 0.0, t.current_stage(), t)
        lab = t.terms["plcon"].row_labels(ctx, "all")
        conf = batch["pseudo_confidence"][:, 0]
        low = (~torch.as_tensor(labeled)).view(-1, 1, 1) & (conf < 0.9)
        assert (lab[low] == -1).all()  # confidence filter
        tgt = batch["target"][0] if isinstance(batch["target"], list) else batch["target"]
        assert torch.equal(lab[torch.as_tensor(labeled)], tgt[torch.as_tensor(labeled), 0].long())
        t.optimizer.zero_grad(set_to_none=True)
        loss, stats = t.terms["plcon"](ctx, "all")
        assert loss.requires_grad and float(loss.detach()) > 0
        loss.backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head.parameters())
        dec_last = t.network.decoder.stages[-1]
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in dec_last.parameters())
        assert stats["plcon_images"] > 0 and "plcon_anchors_c1" in stats
        out = t.train_step(next(t.dataloader_train))
        assert np.isfinite(out["loss"])
        t._finish_loaders()


def test_plcon_cli_train_predict_evaluate(phantom_prepared):
    prepared = phantom_prepared
    out, env, fold = train_phantom_cli(prepared, "nnUNetTrainerPLCon", nnUNet_contrastive_stage_epochs="2,1,1,1")
    assert "Pseudo-labels round 3 complete" in out and "plcon_loss" in out and "plcon_anchors_c1" in out
    for f in ("checkpoint_final.pth", "progress_contrastive.png", "pseudo_labels/round_3/manifest.json"):
        assert os.path.isfile(os.path.join(fold, f)), f
    dice = predict_and_dice(prepared, "nnUNetTrainerPLCon", env, out_name="pred_plcon")
    assert dice > 0.05


@pytest.mark.parametrize("trainer,reduction", [("nnUNetTrainerPLConSelfTrain", "pixel_mean"),
                                               ("nnUNetTrainerPLConSelfTrainBalanced", "class_balanced_mean")])
def test_selftrain_rounds_add_ce_on_confident_pseudo_labels(in_process, trainer, reduction):
    t = build_trainer(in_process, trainer)
    t.initialize()
    assert t.terms["plce"].reduction.__name__ == reduction
    t.on_train_start()  # warm-up: no pseudo-labels, no plce
    t.train_step(next(t.dataloader_train))
    assert "plce_loss" not in t._epoch_stats
    t.current_epoch = 1
    t.on_epoch_start()  # round 1: the loader carries the confidence the CE filters on
    batch = next(t.dataloader_train)
    assert "pseudo_confidence" in batch
    out = t.train_step(batch)
    assert np.isfinite(out["loss"])
    plce, kept = float(t._epoch_stats["plce_loss"][0]), float(t._epoch_stats["plce_kept"][0])
    conf = batch["pseudo_confidence"][~torch.as_tensor(np.asarray(batch["labeled"]))].float()
    assert np.isfinite(plce) and plce >= 0
    assert kept == pytest.approx(float((conf >= 0.9).float().mean()), abs=1e-6)
    t._finish_loaders()
