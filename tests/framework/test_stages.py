"""Stage plans and the staged poly LR, against nnU-Net's own formula written out by hand."""
import pytest
import torch

from nnunet_contrastive.framework.stages import LoaderSpec, Stage, StagedPolyLR, StagePlan, Use, \
    stage_lengths_from_env


def _stage(name, epochs, **kw):
    return Stage(name, epochs, LoaderSpec(), terms=(Use("sup"),), **kw)


def test_plan_locates_stage_and_fractional_progress():
    plan = StagePlan.resolve([_stage("a", 3), _stage("b", None)], num_epochs=10)
    assert [plan.index(e) for e in range(10)] == [0, 0, 0, 1, 1, 1, 1, 1, 1, 1]
    assert [s.epochs for s in plan.stages] == [3, 7] and plan.starts == [0, 3]
    assert plan.progress(1.5) == pytest.approx(0.5) and plan.progress(3.0) == 0.0
    assert plan.progress(6.5) == pytest.approx(3.5 / 7)
    assert plan.starts_stage(3) and not plan.starts_stage(4)
    with pytest.raises(ValueError):
        plan.index(-1)


def test_zero_length_stages_are_dropped_and_bad_plans_rejected():
    plan = StagePlan.resolve([_stage("a", 0), _stage("b", None)], num_epochs=5)
    assert [s.name for s in plan.stages] == ["b"] and plan.num_epochs == 5
    with pytest.raises(ValueError, match="nothing left"):
        StagePlan.resolve([_stage("a", 5), _stage("b", None)], num_epochs=5)
    with pytest.raises(ValueError, match="only one stage"):
        StagePlan.resolve([_stage("a", None), _stage("b", None)], num_epochs=5)
    with pytest.raises(ValueError, match="no loss term"):
        Stage("x", 1, LoaderSpec())


def test_env_lengths_and_pretrain_override_only_touch_existing_pretraining_stages():
    stages = [_stage("pre", 100, pretraining=True), _stage("local", 50, pretraining=True), _stage("fine", None)]
    got, applied = stage_lengths_from_env(stages, {"nnUNet_contrastive_pretrain_epochs": "2"})
    assert [s.epochs for s in got] == [2, 2, None] and applied == {"nnUNet_contrastive_pretrain_epochs": 2}
    got, _ = stage_lengths_from_env([_stage("pre", 0, pretraining=True), _stage("fine", None)],
                                    {"nnUNet_contrastive_pretrain_epochs": "2"})
    assert [s.epochs for s in got] == [0, None]  # a dropped pre-training stage is not brought back
    got, _ = stage_lengths_from_env(stages, {"nnUNet_contrastive_stage_epochs": "1,0,4"})
    assert [s.epochs for s in got] == [1, 0, 4]
    for bad in ("1,2", "a,b,c", "1,-1,2"):
        with pytest.raises(ValueError, match="nnUNet_contrastive_stage_epochs"):
            stage_lengths_from_env(stages, {"nnUNet_contrastive_stage_epochs": bad})


def _lrs(plan, epochs):
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = StagedPolyLR(opt, 0.01, plan)
    out = []
    for e in epochs:
        sched.set(e)
        out.append(opt.param_groups[0]["lr"])
    return out


def test_poly_lr_restarts_at_a_fresh_stage_and_continues_otherwise():
    plan = StagePlan.resolve([_stage("a", 4), _stage("b", None)], num_epochs=10)
    expected = [0.01 * (1 - e / 4) ** 0.9 for e in range(4)] + [0.01 * (1 - e / 6) ** 0.9 for e in range(6)]
    got = _lrs(plan, range(10))
    assert got == pytest.approx(expected)
    assert got[4] == pytest.approx(0.01) and got[3] < got[4]
    cont = StagePlan.resolve([_stage("a", 4), _stage("b", None, fresh_lr=False)], num_epochs=10)
    assert _lrs(cont, range(10)) == pytest.approx([0.01 * (1 - e / 10) ** 0.9 for e in range(10)])
    # per iteration: fractional epochs
    assert _lrs(plan, [4.5])[0] == pytest.approx(0.01 * (1 - 0.5 / 6) ** 0.9)


def test_poly_lr_of_one_stage_equals_nnunets_and_warmup_ramps():
    from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler

    plan = StagePlan.resolve([_stage("a", None)], num_epochs=7)
    p = torch.nn.Parameter(torch.zeros(1))
    a, b = torch.optim.SGD([p], lr=1.0), torch.optim.SGD([p], lr=1.0)
    ours, stock = StagedPolyLR(a, 0.01, plan), PolyLRScheduler(b, 0.01, 7)
    for epoch in range(7):
        ours.step(epoch)
        stock.step(epoch)
        assert a.param_groups[0]["lr"] == pytest.approx(b.param_groups[0]["lr"])
    warm = StagePlan.resolve([_stage("a", 2), _stage("b", None, warmup=0.5)], num_epochs=6)
    lr = _lrs(warm, [2.0, 3.0, 4.0])
    assert lr[0] < lr[1]  # ramping: at 1/4 of stage b's progress the warm-up (half the stage) is half done
    assert lr[1] == pytest.approx(0.01 * (1 - 0.25) ** 0.9 * 0.5)
    assert lr[2] == pytest.approx(0.01 * (1 - 0.5) ** 0.9)


def test_training_progress_spans_the_stages_after_the_pretraining():
    def st(name, n, pre=False):
        return Stage(name, n, LoaderSpec(), terms=(Use("sup"),), pretraining=pre)

    plan = StagePlan.resolve([st("pre", 10, True), st("a", 20), st("b", 10)], 40)
    for epoch, want in ((0, 0.0), (5, 0.0), (10, 0.0), (25, 0.5), (30, 20 / 30), (39.5, 29.5 / 30), (40, 1.0)):
        assert plan.training_progress(epoch) == pytest.approx(want), epoch
    assert plan.progress(30) == 0.0  # stage b starts: the stage clock restarts, the training clock does not
    plain = StagePlan.resolve([st("a", 4), st("b", 4)], 8)
    assert [plain.training_progress(e) for e in (0, 2, 4, 6, 8)] == pytest.approx([0, 0.25, 0.5, 0.75, 1.0])
