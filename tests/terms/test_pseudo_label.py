"""PseudoLabelCETerm: cross-entropy on unlabeled rows' confident pseudo-labels, against a NumPy reference."""
import numpy as np
import pytest
import torch
from conftest import tiny_unet

from nnunet_contrastive.framework.context import StepContext
from nnunet_contrastive.terms.pseudo_label import (PseudoLabelCETerm, class_balanced_mean, confident_pseudo_labels,
                                                   pixel_mean)


def _batch(min_conf_fill=None):
    g = torch.Generator().manual_seed(3)
    pl = torch.randint(0, 3, (4, 1, 8, 8), generator=g).to(torch.int16)
    pl[:2] = -1  # labeled rows carry no pseudo-label
    pl[2, 0, 0, :4] = -1  # outside the image
    conf = torch.rand(4, 1, 8, 8, generator=g).to(torch.float16)
    if min_conf_fill is not None:
        conf.fill_(min_conf_fill)
    return {"data": torch.randn(4, 1, 8, 8, generator=g), "labeled": torch.tensor([True, True, False, False]),
            "target": [torch.zeros(4, 1, 8, 8)], "pseudo_target": pl, "pseudo_confidence": conf}


def _kept_pixel_ce(logits: np.ndarray, pl: np.ndarray, conf: np.ndarray, min_conf: float) -> list:
    """[(class, -log softmax(logits)[class])] of every kept pixel, in float64, by explicit loops."""
    z = logits - logits.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    out = []
    for n in range(pl.shape[0]):
        for y in range(pl.shape[1]):
            for x in range(pl.shape[2]):
                c = pl[n, y, x]
                if c < 0 or (min_conf > 0 and conf[n, y, x] < min_conf):
                    continue
                out.append((c, -logp[n, c, y, x]))
    return out


def _reference(logits: np.ndarray, pl: np.ndarray, conf: np.ndarray, min_conf: float) -> float:
    """Mean over kept pixels of -log softmax(logits)[label]."""
    kept = _kept_pixel_ce(logits, pl, conf, min_conf)
    return sum(v for _, v in kept) / max(len(kept), 1)


def _reference_balanced(logits: np.ndarray, pl: np.ndarray, conf: np.ndarray, min_conf: float) -> float:
    """Mean over the classes among the kept pixels of each class's mean -log softmax(logits)[label]."""
    per_class = {}
    for c, v in _kept_pixel_ce(logits, pl, conf, min_conf):
        per_class.setdefault(c, []).append(v)
    return float(np.mean([np.mean(v) for v in per_class.values()])) if per_class else 0.0


@pytest.mark.parametrize("min_conf", [0.0, 0.5])
def test_class_balanced_matches_numpy_reference(min_conf):
    net, batch = tiny_unet(), _batch()
    ctx = StepContext(batch, torch.device("cpu"), net)
    loss, _ = PseudoLabelCETerm(min_conf, class_balanced_mean)(ctx, "unlabeled")
    logits = ctx.forward("student", 0).logits.detach().double().numpy()[2:]
    pl = batch["pseudo_target"].numpy()[2:, 0].astype(np.int64)
    conf = batch["pseudo_confidence"].float().numpy()[2:, 0]
    ref = _reference_balanced(logits, pl, conf, min_conf)
    assert float(loss.detach()) == pytest.approx(ref, rel=1e-5)
    assert ref != pytest.approx(_reference(logits, pl, conf, min_conf), rel=1e-3)  # the two reductions differ here


def test_class_balanced_ignores_class_frequencies():
    # per-pixel CE constant within a class: the balanced mean is the mean of the constants whatever the counts,
    # the pixel mean follows the counts (99 background pixels at 0.1, one foreground pixel at 5.0)
    target = torch.tensor([[0] * 99 + [2] + [-1] * 5])
    ce = torch.tensor([[0.1] * 99 + [5.0] + [100.0] * 5])
    assert float(class_balanced_mean(ce, target, 3)) == pytest.approx((0.1 + 5.0) / 2)
    assert float(pixel_mean(ce, target, 3)) == pytest.approx((99 * 0.1 + 5.0) / 100)
    none = torch.full_like(target, -1)
    assert float(class_balanced_mean(ce, none, 3)) == 0.0 and float(pixel_mean(ce, none, 3)) == 0.0


@pytest.mark.parametrize("min_conf", [0.0, 0.5])
def test_matches_numpy_reference_on_unlabeled_rows_only(min_conf):
    net, batch = tiny_unet(), _batch()
    term = PseudoLabelCETerm(min_conf)
    ctx = StepContext(batch, torch.device("cpu"), net)
    loss, stats = term(ctx, "unlabeled")
    logits = ctx.forward("student", 0).logits.detach().double().numpy()[2:]
    pl = batch["pseudo_target"].numpy()[2:, 0].astype(np.int64)
    conf = batch["pseudo_confidence"].float().numpy()[2:, 0]
    assert float(loss.detach()) == pytest.approx(_reference(logits, pl, conf, min_conf), rel=1e-5)
    kept = (pl >= 0) & ((conf >= min_conf) if min_conf > 0 else True)
    assert float(stats["PseudoLabelCETerm_kept"]) == pytest.approx(kept.mean())
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())


def test_gradient_only_through_unlabeled_rows():
    net, batch = tiny_unet(), _batch()
    x = batch["data"].clone().requires_grad_(True)
    batch["data"] = x
    net.eval()  # instance norm per row: rows do not mix
    loss, _ = PseudoLabelCETerm()(StepContext(batch, torch.device("cpu"), net), "unlabeled")
    loss.backward()
    assert x.grad[:2].abs().sum() == 0 and x.grad[2:].abs().sum() > 0


@pytest.mark.parametrize("reduction", [pixel_mean, class_balanced_mean])
def test_no_confident_pixel_gives_zero_loss_and_zero_gradient(reduction):
    net, batch = tiny_unet(), _batch(min_conf_fill=0.3)
    loss, stats = PseudoLabelCETerm(0.9, reduction)(StepContext(batch, torch.device("cpu"), net), "unlabeled")
    assert float(loss) == 0.0 and float(stats["PseudoLabelCETerm_kept"]) == 0.0
    loss.backward()
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in net.parameters())


def test_no_unlabeled_row_or_no_pseudo_labels():
    net = tiny_unet()
    batch = {**_batch(), "labeled": torch.ones(4, dtype=torch.bool)}
    assert PseudoLabelCETerm()(StepContext(batch, torch.device("cpu"), net), "unlabeled") is None
    batch = _batch()
    del batch["pseudo_target"]
    with pytest.raises(KeyError, match="pseudo_target"):
        PseudoLabelCETerm()(StepContext(batch, torch.device("cpu"), net), "unlabeled")


def test_confidence_filter_needs_confidence():
    pl = torch.tensor([[0, 1, 2]])
    assert torch.equal(confident_pseudo_labels(pl, None, 0.0), pl)
    assert confident_pseudo_labels(pl, torch.tensor([[0.95, 0.5, 0.9]]), 0.9).tolist() == [[0, -1, 2]]
    with pytest.raises(KeyError, match="pseudo_confidence"):
        confident_pseudo_labels(pl, None, 0.9)
