"""Pixel-to-class-mean contrast (Chaitanya et al. 2021, Eq. 3-4) against an independent NumPy double loop."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from nnunet_contrastive.components.samplers import NSSampler, class_masks
from nnunet_contrastive.losses.pixel_contrast import pixel_contrast_loss, random_partners


def _reference(emb: np.ndarray, labels: np.ndarray, classes, index, count, partners, tau: float) -> float:
    """Loops over images, classes and sampled pixels; cosine and -log softmax written out in float64."""
    emb = emb.astype(np.float64)
    B, D = emb.shape[:2]
    z = emb.reshape(B, D, -1)
    lab = labels.reshape(B, -1)

    def mean(b, c):
        sel = lab[b] == c
        return z[b][:, sel].mean(1) if sel.any() else None

    def cos(u, v):
        nu, nv = math.sqrt(float(u @ u)), math.sqrt(float(v @ v))
        return float(u @ v) / (max(nu, 1e-12) * max(nv, 1e-12))

    image_losses = []
    for b in range(B):
        imgs = [b] if partners is None or partners[b] == b else [b, int(partners[b])]
        keys = [(c, mean(i, c)) for i in imgs for c in classes if mean(i, c) is not None]
        class_losses = []
        for ci, c in enumerate(classes):
            if not any(k == c for k, _ in keys) or not any(k != c for k, _ in keys) or mean(b, c) is None:
                continue
            terms = []
            for s in range(int(count[b, ci])):
                a = z[b][:, int(index[b, ci, s])]
                logits = [cos(a, m) / tau for _, m in keys]
                mx = max(logits)
                lse = mx + math.log(sum(math.exp(v - mx) for v in logits))
                pos = [lg - lse for (k, _), lg in zip(keys, logits) if k == c]
                terms.append(-sum(pos) / len(pos))
            if terms:
                class_losses.append(sum(terms) / len(terms))
        if class_losses:
            image_losses.append(sum(class_losses) / len(class_losses))
    return sum(image_losses) / len(image_losses) if image_losses else 0.0


def _case(seed=0, B=4, D=5, H=6, W=7, K=3):
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(B, D, H, W, generator=g, dtype=torch.float64)
    labels = torch.randint(0, K + 1, (B, H, W), generator=g)
    return emb, labels


def _check(emb, labels, classes, partners, n=3, seed=1, tau=0.1):
    sample = NSSampler().sample(class_masks(labels, classes), n, generator=torch.Generator().manual_seed(seed))
    out = pixel_contrast_loss(emb, labels, classes, sample=sample, partners=partners, temperature=tau)
    ref = _reference(emb.numpy(), labels.numpy(), classes, sample.index.numpy(), sample.count.numpy(),
                     None if partners is None else partners.numpy(), tau)
    assert math.isfinite(float(out.loss))
    assert float(out.loss) == pytest.approx(ref, rel=1e-9, abs=1e-12)
    return out


@pytest.mark.parametrize("inter", [False, True])
def test_matches_numpy_double_loop(inter):
    emb, labels = _case()
    partners = torch.tensor([1, 2, 3, 0]) if inter else None
    out = _check(emb, labels, [1, 2, 3], partners)
    assert out.num_images == 4 and out.loss > 0
    assert out.anchors_per_class.tolist() == [12, 12, 12]


@pytest.mark.parametrize("inter", [False, True])
def test_absent_and_one_pixel_classes(inter):
    emb, labels = _case(seed=3, B=3)
    labels[0][labels[0] == 2] = 0  # class 2 absent in image 0
    labels[1] = 0
    labels[1, 2, 3] = 1  # image 1: class 1 is one pixel, class 3 one pixel, class 2 absent
    labels[1, 4, 4] = 3
    labels[2][labels[2] != 3] = 0  # image 2: only class 3 (intra: no negative, dropped)
    partners = torch.tensor([2, 0, 1]) if inter else None
    out = _check(emb, labels, [1, 2, 3], partners)
    assert torch.isfinite(out.per_anchor).all()
    if not inter:
        assert out.num_images == 2 and not bool((out.anchor_image == 2).any())
    else:  # image 2's partner (image 1) brings class 1 as a negative
        assert out.num_images == 3
    assert int((out.anchor_image == 1).sum()) == 2  # the one-pixel classes: one anchor each, not three


def test_no_foreground_gives_zero_with_a_graph():
    emb, labels = _case(B=2)
    emb.requires_grad_(True)
    out = pixel_contrast_loss(emb, torch.zeros_like(labels), [1, 2, 3])
    assert float(out.loss.detach()) == 0.0 and out.num_images == 0
    out.loss.backward()
    assert torch.equal(emb.grad, torch.zeros_like(emb))


def test_background_and_other_values_are_never_used():
    emb, labels = _case(seed=5)
    a = _check(emb, labels, [1, 2, 3], None)
    emb2 = emb.clone()
    emb2[(labels == 0).unsqueeze(1).expand_as(emb)] += 100.0  # background pixels change: nothing may move
    labels2 = labels.clone()
    labels2[labels == 0] = -1
    b = _check(emb2, labels2, [1, 2, 3], None)
    assert float(a.loss) == pytest.approx(float(b.loss), rel=1e-12)


@pytest.mark.parametrize("inter", [False, True])
def test_permutation_invariance_over_images(inter):
    emb, labels = _case(seed=7, B=5)
    classes = [1, 2, 3]
    partners = torch.tensor([3, 0, 4, 1, 2]) if inter else None
    sample = NSSampler().sample(class_masks(labels, classes), 3, generator=torch.Generator().manual_seed(2))
    a = pixel_contrast_loss(emb, labels, classes, sample=sample, partners=partners)
    perm = torch.tensor([4, 2, 0, 3, 1])
    inv = torch.argsort(perm)
    from nnunet_contrastive.components.samplers import PixelSample

    sample_p = PixelSample(sample.index[perm], sample.count[perm], sample.partner[perm])
    partners_p = None if partners is None else inv[partners[perm]]
    b = pixel_contrast_loss(emb[perm], labels[perm], classes, sample=sample_p, partners=partners_p)
    assert float(a.loss) == pytest.approx(float(b.loss), rel=1e-12)
    assert torch.equal(a.anchors_per_class, b.anchors_per_class)


def test_gradient_reaches_embeddings_through_anchors_and_means():
    emb, labels = _case(seed=9)
    emb.requires_grad_(True)
    out = pixel_contrast_loss(emb, labels, [1, 2, 3], n_per_class=2, generator=torch.Generator().manual_seed(0))
    out.loss.backward()
    fg = (labels > 0).unsqueeze(1).expand_as(emb)
    assert emb.grad[fg].abs().sum() > 0  # class means: every foreground pixel gets a gradient
    assert emb.grad[~fg].abs().sum() == 0  # background is never used


def test_random_partners_is_a_cycle():
    p = random_partners(6, torch.Generator().manual_seed(0))
    assert sorted(p.tolist()) == list(range(6)) and all(p[i] != i for i in range(6))
    seen, i = set(), 0
    for _ in range(6):
        seen.add(i)
        i = int(p[i])
    assert seen == set(range(6))  # one cycle through every image


def test_float32_and_temperature():
    emb, labels = _case(seed=11)
    lo = _check(emb, labels, [1, 2, 3], None, tau=0.5)
    hi = _check(emb, labels, [1, 2, 3], None, tau=0.05)
    assert float(lo.loss) != float(hi.loss)
    out32 = pixel_contrast_loss(emb.float(), labels, [1, 2, 3], sample=lo.sample, temperature=0.5)
    assert float(out32.loss) == pytest.approx(float(lo.loss), rel=1e-5)


def test_class_means_stay_finite_and_exact_under_float16_autocast():
    """Per-image class means (the positives) under CUDA AMP ran their einsum in float16: a patch's sums overflow.
    CPU float16 autocast reproduces it; the means must match a float64 NumPy reference."""
    from nnunet_contrastive.losses.pixel_contrast import class_means

    gen = torch.Generator().manual_seed(1)
    emb = 3.0 + torch.rand(2, 4, 128, 160, generator=gen)  # 20 480 pixels x ~3.5 per image: > 65 504
    masks = torch.zeros(2, 2, 128, 160, dtype=torch.bool)
    masks[:, 0] = True
    masks[0, 1, :10] = True
    e, m = emb.double().numpy(), masks.numpy()
    with torch.autocast("cpu", dtype=torch.float16):
        means, counts = class_means(emb.half(), masks)
    assert torch.isfinite(means).all()
    for b in range(2):
        for k in range(2):
            ref = np.array([e[b, d][m[b, k]].mean() for d in range(4)]) if m[b, k].any() else np.zeros(4)
            np.testing.assert_allclose(means[b, k].double().numpy(), ref, rtol=2e-3, atol=1e-3)
    assert counts.tolist() == [[int(m[b, k].sum()) for k in range(2)] for b in range(2)]
