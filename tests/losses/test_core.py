"""The contrastive core (info_nce) against an independent NumPy loop, and its invariants."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from nnunet_contrastive.losses.core import class_averaged_mean, info_nce, label_positive_mask, two_view_masks


def _np_info_nce(a, k, pos, valid, w, tau):
    """Written from the formula: per anchor, -1/|P| sum_{j in P} w_ij log(exp(s_ij) / sum_{l valid} exp(s_il))."""
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    k = k / np.linalg.norm(k, axis=1, keepdims=True)
    losses = []
    for i in range(a.shape[0]):
        js = [j for j in range(k.shape[0]) if pos[i, j]]
        if not js:
            continue
        den = sum(np.exp(a[i] @ k[l] / tau) for l in range(k.shape[0]) if valid[i, l])
        losses.append(-sum(w[i, j] * np.log(np.exp(a[i] @ k[j] / tau) / den) for j in js) / len(js))
    return float(np.mean(losses)) if losses else 0.0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_info_nce_matches_numpy_with_masks_and_weights(seed):
    rng = np.random.default_rng(seed)
    a, k = rng.normal(size=(5, 4)), rng.normal(size=(7, 4))
    valid = rng.random((5, 7)) < 0.8
    pos = (rng.random((5, 7)) < 0.4) & valid
    pos[0] = False  # an anchor without positives is skipped
    w = rng.random((5, 7))
    out = info_nce(torch.tensor(a), torch.tensor(k), torch.tensor(pos), torch.tensor(valid),
                   weight=torch.tensor(w), temperature=0.3)
    assert out.loss.item() == pytest.approx(_np_info_nce(a, k, pos, valid, w, 0.3), rel=1e-10)
    assert not out.has_pos[0] and out.per_anchor[0].item() == 0.0


def test_simclr_masks_and_weight_fn_see_the_detached_pair_loss():
    n = 3
    z = torch.randn(2 * n, 8, dtype=torch.float64, requires_grad=True)
    pos, valid = two_view_masks(n)
    assert pos.sum().item() == 2 * n and not valid.diagonal().any()
    seen = {}

    def weight_fn(pair_loss, pos_mask):
        seen["grad"] = pair_loss.requires_grad
        return (pair_loss < 1e9).to(pair_loss.dtype)  # all ones: must equal the unweighted loss

    out = info_nce(z, None, pos, valid, weight_fn=weight_fn, temperature=0.5)
    ref = info_nce(z, None, pos, valid, temperature=0.5)
    assert seen["grad"] is False
    torch.testing.assert_close(out.loss, ref.loss)
    out.loss.backward()
    assert torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0


def test_batched_masks_share_one_matrix_and_equal_separate_calls():
    labels = torch.tensor([[0, 1], [0, 0], [1, 1], [1, 0]])
    z = torch.randn(8, 5, dtype=torch.float64)
    pos = label_positive_mask(labels)  # (2, 8, 8)
    valid = ~torch.eye(8, dtype=torch.bool)
    both = info_nce(z, None, pos, valid, temperature=0.2)
    for m in range(2):
        one = info_nce(z, None, pos[m], valid, temperature=0.2)
        torch.testing.assert_close(both.loss[m], one.loss)


def test_positive_outside_valid_is_an_error_and_half_precision_is_upcast():
    z = torch.randn(4, 3)
    pos, valid = two_view_masks(2)
    with pytest.raises(ValueError, match="positive"):
        info_nce(z, None, pos, valid & ~pos)
    out = info_nce(z.half(), None, pos, valid, temperature=0.07)
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)


def test_denominator_excludes_invalid_keys():
    """Removing a negative from the valid mask must lower the loss of its anchor (smaller denominator)."""
    z = torch.randn(6, 4, dtype=torch.float64)
    pos, valid = two_view_masks(3)
    full = info_nce(z, None, pos, valid, temperature=0.5)
    fewer = valid.clone()
    fewer[0, 1] = False
    part = info_nce(z, None, pos, fewer, temperature=0.5)
    assert part.per_anchor[0] < full.per_anchor[0]
    torch.testing.assert_close(part.per_anchor[1:], full.per_anchor[1:])


def test_class_averaged_mean_matches_numpy_loop():
    rng = np.random.default_rng(3)
    values, classes = rng.normal(size=40), rng.integers(0, 4, size=40)
    weights = rng.uniform(size=40) * (classes != 2)  # classes 2 and 3 have entries but no weight, class 4 none
    weights[classes == 3] = 0.0
    ref_pc = [sum(v * w for v, c2, w in zip(values, classes, weights) if c2 == c) / max(
        sum(w for c2, w in zip(classes, weights) if c2 == c), 1) for c in range(5)]
    used_ref = [any(w > 0 for c2, w in zip(classes, weights) if c2 == c) for c in range(5)]
    loss, per_class, used = class_averaged_mean(torch.tensor(values), torch.tensor(classes), torch.tensor(weights), 5)
    assert used.tolist() == used_ref == [True, True, False, False, False]
    assert per_class.numpy() == pytest.approx(ref_pc)
    assert float(loss) == pytest.approx((ref_pc[0] + ref_pc[1]) / 2)
    zero = class_averaged_mean(torch.tensor(values), torch.tensor(classes), torch.zeros(40, dtype=torch.float64), 5)
    assert float(zero[0]) == 0.0 and not zero[2].any()
