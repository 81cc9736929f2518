"""Stage bookkeeping and the stage-restarted poly LR, against nnU-Net's own formula written out by hand."""
import pytest
import torch

from nnunet_contrastive.framework.stages import StagePolyLRScheduler, stage_epoch, stage_of


def test_stage_of_and_local_epoch():
    assert [stage_of(e, 3) for e in range(6)] == [1, 1, 1, 2, 2, 2]
    assert [stage_epoch(e, 3, 10) for e in (0, 2, 3, 9)] == [(0, 3), (2, 3), (0, 7), (6, 7)]
    assert stage_of(0, 0) == 2  # no pre-training
    with pytest.raises(ValueError):
        stage_of(-1, 3)


def test_poly_lr_restarts_at_the_stage_boundary():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = StagePolyLRScheduler(opt, 0.01, pretrain_epochs=4, num_epochs=10)
    expected = [0.01 * (1 - e / 4) ** 0.9 for e in range(4)] + [0.01 * (1 - e / 6) ** 0.9 for e in range(6)]
    got = []
    for epoch in range(10):
        sched.step(epoch)
        got.append(opt.param_groups[0]["lr"])
    assert got == pytest.approx(expected)
    assert got[4] == pytest.approx(0.01) and got[3] < got[4]


def test_poly_lr_without_pretraining_equals_nnunets():
    from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler

    p = torch.nn.Parameter(torch.zeros(1))
    a, b = torch.optim.SGD([p], lr=1.0), torch.optim.SGD([p], lr=1.0)
    ours, stock = StagePolyLRScheduler(a, 0.01, 0, 7), PolyLRScheduler(b, 0.01, 7)
    for epoch in range(7):
        ours.step(epoch)
        stock.step(epoch)
        assert a.param_groups[0]["lr"] == pytest.approx(b.param_groups[0]["lr"])


def test_bad_stage_lengths():
    p = torch.nn.Parameter(torch.zeros(1))
    with pytest.raises(ValueError, match="pretrain_epochs"):
        StagePolyLRScheduler(torch.optim.SGD([p], lr=1.0), 0.01, pretrain_epochs=11, num_epochs=10)
