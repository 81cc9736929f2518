"""Bidirectional copy-paste: the weighted Dice + CE against a NumPy reference and nnU-Net's own loss, the mixed
rows, targets and weights against a NumPy construction, gradients to the student only, clear errors."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import np_softmax, tiny_unet

from nnunet_contrastive.framework.context import StepContext
from nnunet_contrastive.terms.copy_paste import BidirectionalCopyPasteTerm, weighted_dice_ce


def _np_weighted_dice_ce(logits, target, weight, batch_dice=True):
    """Per-pixel loops: CE weighted and averaged over all pixels; soft Dice of the foreground classes with
    weighted intersection and sums (over the batch with batch_dice, else per row then averaged)."""
    p = np_softmax(logits.astype(np.float64))
    n, c = p.shape[:2]
    t, w = target[:, 0], weight[:, 0]
    ce = float(np.mean([-np.log(p[(i, t[(i,) + pix]) + pix]) * w[(i,) + pix]
                        for i in range(n) for pix in np.ndindex(t.shape[1:])]))
    dices = []
    rows = [list(range(n))] if batch_dice else [[i] for i in range(n)]
    for group in rows:
        for k in range(1, c):
            inter = sum(p[(i, k) + pix] * (t[(i,) + pix] == k) * w[(i,) + pix] for i in group
                        for pix in np.ndindex(t.shape[1:]))
            s_pred = sum(p[(i, k) + pix] * w[(i,) + pix] for i in group for pix in np.ndindex(t.shape[1:]))
            s_gt = sum((t[(i,) + pix] == k) * w[(i,) + pix] for i in group for pix in np.ndindex(t.shape[1:]))
            dices.append((2 * inter + 1e-5) / max(s_gt + s_pred + 1e-5, 1e-8))
    return ce - float(np.mean(dices))


@pytest.mark.parametrize("batch_dice", [True, False])
def test_weighted_dice_ce_matches_numpy_reference(batch_dice):
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 4, 5, 6, generator=g)
    target = torch.randint(0, 4, (3, 1, 5, 6), generator=g)
    weight = torch.rand(3, 1, 5, 6, generator=g) * (torch.rand(3, 1, 5, 6, generator=g) > 0.2)
    got = float(weighted_dice_ce(logits, target, weight, batch_dice))
    ref = _np_weighted_dice_ce(logits.numpy(), target.numpy(), weight.numpy(), batch_dice)
    assert got == pytest.approx(ref, rel=1e-5)


def test_weight_one_is_nnunets_dice_and_ce():
    from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(2, 3, 8, 8, generator=g)
    target = torch.randint(0, 3, (2, 1, 8, 8), generator=g).float()
    stock = DC_and_CE_loss({"batch_dice": True, "smooth": 1e-5, "do_bg": False, "ddp": False}, {}, weight_ce=1,
                           weight_dice=1, dice_class=MemoryEfficientSoftDiceLoss)
    assert float(weighted_dice_ce(logits, target, torch.ones_like(target))) == pytest.approx(
        float(stock(logits, target)), rel=1e-5)


def _ctx(labeled=(True, True, False, False, False), seed=5):
    g = torch.Generator().manual_seed(seed)
    n = len(labeled)
    batch = {"data": torch.randn(n, 1, 8, 8, generator=g), "labeled": torch.tensor(labeled),
             "target": [torch.randint(0, 3, (n, 1, 8, 8), generator=g).float()]}
    return StepContext(batch, torch.device("cpu"), tiny_unet(0), teacher=tiny_unet(1))


def _reference(ctx, seed, alpha, ignore=None):
    """The mixed rows, targets and weights built with NumPy from the batch and boxes drawn with ``seed``; the loss
    of the student's logits on them by the NumPy reference."""
    from nnunet_contrastive.components.cutmix import box_masks
    lab = np.flatnonzero(ctx.labeled.numpy())
    unl = np.flatnonzero(~ctx.labeled.numpy())
    x = ctx.batch["data"].numpy()
    y = ctx.batch["target"][0].numpy().astype(np.int64)
    with torch.no_grad():
        t = ctx.teacher(torch.from_numpy(x[unl]))
    pseudo = (t[0] if isinstance(t, (list, tuple)) else t).numpy().argmax(axis=1)[:, None]
    torch.manual_seed(seed)
    m = box_masks(len(unl), x.shape[2:]).numpy().astype(bool)
    xs, ts, ws = [], [], []
    for direction in ("in", "out"):
        for j, u in enumerate(unl):
            labeled_row = lab[j % len(lab)] if direction == "in" else lab[(j + 1) % len(lab)]
            yl = y[labeled_row].copy()
            wl = np.ones_like(yl, dtype=np.float64)
            if ignore is not None:
                wl[yl == ignore] = 0.0
                yl[yl == ignore] = 0
            box = m[j]
            if direction == "in":   # the unlabeled box in the labeled frame
                xs.append(np.where(box, x[u], x[labeled_row]))
                ts.append(np.where(box, pseudo[j], yl))
                ws.append(np.where(box, alpha, wl))
            else:                   # the labeled box in the unlabeled frame
                xs.append(np.where(box, x[labeled_row], x[u]))
                ts.append(np.where(box, yl, pseudo[j]))
                ws.append(np.where(box, wl, alpha))
    with torch.no_grad():
        s = ctx.student(torch.from_numpy(np.stack(xs)))
    s = (s[0] if isinstance(s, (list, tuple)) else s).numpy()
    return _np_weighted_dice_ce(s, np.stack(ts), np.stack(ws)), pseudo


def test_term_matches_numpy_construction_and_trains_the_student_only():
    ctx = _ctx()
    torch.manual_seed(21)
    loss, stats = BidirectionalCopyPasteTerm(unlabeled_weight=0.3)(ctx)
    ref, pseudo = _reference(ctx, 21, 0.3)
    assert float(loss.detach()) == pytest.approx(ref, rel=1e-4)
    assert float(stats["bcp_pseudo_foreground"]) == pytest.approx(float((pseudo > 0).mean()))
    # the weight matters: another alpha gives another loss on the same boxes
    torch.manual_seed(21)
    other = float(BidirectionalCopyPasteTerm(unlabeled_weight=1.0)(ctx)[0].detach())
    assert other != pytest.approx(float(loss.detach()), rel=1e-4)
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in ctx.student.parameters())
    assert all(p.grad is None for p in ctx.teacher.parameters())


def test_ignore_label_pixels_weigh_nothing():
    ctx = _ctx(labeled=(True, False, False), seed=6)
    assert (ctx.batch["target"][0][0] == 2).any()
    torch.manual_seed(22)
    loss, _ = BidirectionalCopyPasteTerm(ignore_label=2)(ctx)
    ref, _ = _reference(ctx, 22, 0.5, ignore=2)
    assert float(loss.detach()) == pytest.approx(ref, rel=1e-4)


def test_needs_both_kinds_of_rows_and_a_valid_setup():
    assert BidirectionalCopyPasteTerm()(_ctx(labeled=(True,) * 4)) is None
    assert BidirectionalCopyPasteTerm()(_ctx(labeled=(False,) * 4)) is None
    with pytest.raises(ValueError, match="area"):
        BidirectionalCopyPasteTerm(area=0.0)
    with pytest.raises(ValueError, match="unlabeled_weight"):
        BidirectionalCopyPasteTerm(unlabeled_weight=0.0)
    with pytest.raises(ValueError, match="regions"):
        _trainer_on_regions("nnUNetTrainerBCP").build_terms()
    with pytest.raises(ValueError, match="weight"):
        weighted_dice_ce(torch.zeros(2, 3, 4, 4), torch.zeros(2, 1, 4, 4), torch.ones(2, 4, 4))


def _trainer_on_regions(name):
    """A trainer object of class ``name`` (not initialised) whose dataset trains regions."""
    import nnunet_contrastive.trainers as T
    trainer = object.__new__(getattr(T, name))
    trainer.label_manager = SimpleNamespace(has_regions=True, ignore_label=None)
    trainer.is_ddp = False
    return trainer


@pytest.mark.parametrize("name, build", [("nnUNetTrainerBCP", "build_terms"), ("nnUNetTrainerARCO", "build_terms"),
                                         ("nnUNetTrainerPLCon", "pixel_terms"),
                                         ("nnUNetTrainerSPConBCP", "consistency_term")])
def test_class_label_trainers_refuse_regions_at_start_up(name, build):
    trainer = _trainer_on_regions(name)
    args = (0.1,) if build == "pixel_terms" else ()
    with pytest.raises(ValueError, match=f"{name}: region-based datasets .*regions_class_order"):
        getattr(trainer, build)(*args)


def test_mixed_precision_gives_a_float32_loss_close_to_full_precision():
    """Under autocast (bfloat16 on CPU here, float16 on CUDA for users) the logits are low precision; the loss is
    computed in float32 and stays near the full-precision value on the same boxes."""
    ctx = _ctx()
    torch.manual_seed(23)
    full = float(BidirectionalCopyPasteTerm()(ctx)[0].detach())
    ctx = _ctx()
    torch.manual_seed(23)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low, _ = BidirectionalCopyPasteTerm()(ctx)
    assert low.dtype == torch.float32 and torch.isfinite(low)
    assert float(low.detach()) == pytest.approx(full, abs=0.05)
