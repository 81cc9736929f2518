"""Chaitanya et al.'s global (G^R, G^D-, G^D) and local (L^R, L^D) losses against an independent NumPy reference
written from the paper's set definitions (loops over images, views and regions), the region grid and the local head.
"""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from nnunet_contrastive.components.local_head import LocalProjectionHead, region_grid, region_starts
from nnunet_contrastive.losses.global_local import (expand_pairs, global_contrastive_loss, global_pair_masks,
                                                    local_contrastive_loss, local_pair_masks)


# ---------------------------------------------------------------------------------------------- NumPy reference
def _cos(a, b):
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _pair_loss(za, zp, negs, tau):
    """Eq. 1 / Eq. 3: -log(e^{s_ap} / (e^{s_ap} + sum_neg e^{s_an}))."""
    s_pos = _cos(za, zp) / tau
    s_neg = [_cos(za, zn) / tau for zn in negs]
    m = max([s_pos] + s_neg)
    return -(s_pos - m - np.log(np.exp(s_pos - m) + sum(np.exp(s - m) for s in s_neg)))


def ref_global_terms(partition, strategy):
    """Directed pairs ((v, i), (v', j)) and each one's negatives, from the paper's sets; items (view, image)."""
    n = len(partition)
    items = [(v, i) for v in range(2) for i in range(n)]
    terms = []
    for (v, i) in items:
        for (w, j) in items:
            if (v, i) == (w, j):
                continue
            if strategy in ("GR", "GDminus"):
                positive = i == j  # the two transformed versions of one image
            else:  # GD: corresponding partitions across volumes, and all their transformed versions
                positive = partition[i] == partition[j]
            if not positive:
                continue
            if strategy == "GR":  # every remaining image (2N - 2 of them)
                negs = [(x, k) for (x, k) in items if k != i]
            else:  # G^D-, G^D: images only from partitions other than s
                negs = [(x, k) for (x, k) in items if partition[k] != partition[i]]
            terms.append(((v, i), (w, j), negs))
    return terms


def ref_local_terms(partition, n_regions, strategy):
    """Directed pairs over items (view, image, region) and their negatives (paper §3.3)."""
    n = len(partition)
    items = [(v, i, r) for v in range(2) for i in range(n) for r in range(n_regions)]
    terms = []
    for (v, i, r) in items:
        for (w, j, q) in items:
            if q != r or (v, i) == (w, j):
                continue
            own_other_view = i == j and v != w
            other_volume = strategy == "LD" and j != i and partition[j] == partition[i] and w == v
            if not (own_other_view or other_volume):
                continue
            # remaining regions of the anchor's image and of the positive's image, both views
            negs = [(x, k, u) for (x, k, u) in items if u != r and k in (i, j)]
            terms.append(((v, i, r), (w, j, q), negs))
    return terms


def ref_loss(emb, terms, tau):
    return float(np.mean([_pair_loss(emb[a], emb[p], [emb[k] for k in negs], tau) for a, p, negs in terms]))


def _global_emb(z1, z2):
    return {(v, i): (z1 if v == 0 else z2)[i] for v in range(2) for i in range(len(z1))}


def _local_emb(f1, f2):
    return {(v, i, r): (f1 if v == 0 else f2)[i, r] for v in range(2) for i in range(f1.shape[0])
            for r in range(f1.shape[1])}


def _terms_from_masks(masks, key_of):
    out = set()
    for row in range(masks.num_terms):
        a, p = int(masks.anchor[row]), int(masks.positive[row])
        negs = torch.nonzero(masks.valid[row]).flatten().tolist()
        negs.remove(p)
        out.add((key_of(a), key_of(p), frozenset(key_of(k) for k in negs)))
    return out


# ---------------------------------------------------------------------------------------------- fixtures
# 3 volumes x 2 partitions, volume-major (row = v*2 + p) plus an extra row whose partition has one volume only
PARTITION = np.array([0, 1, 0, 1, 0, 1, 2])


def _rand(*shape, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).standard_normal(shape)).double()


# ---------------------------------------------------------------------------------------------- global
@pytest.mark.parametrize("strategy", ["GR", "GDminus", "GD"])
def test_global_pairs_and_negatives_match_the_paper_sets(strategy):
    n = len(PARTITION)
    masks = global_pair_masks(n, strategy, torch.as_tensor(PARTITION))
    got = _terms_from_masks(masks, lambda k: (k // n, k % n))
    want = {(a, p, frozenset(negs)) for a, p, negs in ref_global_terms(PARTITION, strategy)}
    assert got == want


def test_global_pairs_written_out_for_one_anchor():
    """Row 0 (volume 0, partition 0) of 3 volumes x 2 partitions + a lone partition-2 row, view 1."""
    n = len(PARTITION)
    key = lambda k: (k // n, k % n)  # noqa: E731
    for strategy, positives, negatives in [
        ("GR", {(1, 0)}, {(v, i) for v in range(2) for i in range(1, n)}),
        ("GDminus", {(1, 0)}, {(v, i) for v in range(2) for i in (1, 3, 5, 6)}),
        ("GD", {(1, 0), (0, 2), (1, 2), (0, 4), (1, 4)}, {(v, i) for v in range(2) for i in (1, 3, 5, 6)}),
    ]:
        m = global_pair_masks(n, strategy, torch.as_tensor(PARTITION))
        rows = (m.anchor == 0).nonzero().flatten()
        assert {key(int(m.positive[r])) for r in rows} == positives, strategy
        for r in rows:
            negs = {key(k) for k in m.valid[r].nonzero().flatten().tolist()} - {key(int(m.positive[r]))}
            assert negs == negatives, strategy
    # the lone partition-2 row: G^D has only its other view as positive, G^D- has all other partitions as negatives
    m = global_pair_masks(n, "GD", torch.as_tensor(PARTITION))
    assert {key(int(m.positive[r])) for r in (m.anchor == 6).nonzero().flatten()} == {(1, 6)}


@pytest.mark.parametrize("strategy", ["GR", "GDminus", "GD"])
@pytest.mark.parametrize("tau", [0.1, 0.5])
def test_global_loss_matches_numpy_reference(strategy, tau):
    z1, z2 = _rand(len(PARTITION), 5, seed=1), _rand(len(PARTITION), 5, seed=2)
    out = global_contrastive_loss(z1, z2, strategy, torch.as_tensor(PARTITION), temperature=tau)
    terms = ref_global_terms(PARTITION, strategy)
    ref = ref_loss(_global_emb(z1.numpy(), z2.numpy()), terms, tau)
    assert float(out.loss) == pytest.approx(ref, rel=1e-9)
    assert out.num_terms == len(terms)
    assert out.negatives_per_term == pytest.approx(np.mean([len(t[2]) for t in terms]))
    assert out.positives_per_anchor == pytest.approx(len(terms) / (2 * len(PARTITION)))


def test_global_strategies_differ_and_gd_counts():
    part = torch.as_tensor(PARTITION)
    z1, z2 = _rand(7, 4, seed=3), _rand(7, 4, seed=4)
    losses = {s: float(global_contrastive_loss(z1, z2, s, part).loss) for s in ("GR", "GDminus", "GD")}
    assert len({round(v, 9) for v in losses.values()}) == 3
    out = global_contrastive_loss(z1, z2, "GD", part)
    # partitions 0 and 1 have 3 volumes (2*3 - 1 = 5 positives), partition 2 one volume (1 positive)
    assert out.positives_per_anchor == pytest.approx((12 * 5 + 2 * 1) / 14)


@pytest.mark.parametrize("strategy", ["GR", "GDminus", "GD"])
def test_global_loss_invariant_to_permuting_volumes(strategy):
    """Volume x partition rows: permuting the volumes (blocks of rows, both views alike) leaves the loss unchanged."""
    k, m = 3, 4
    part = torch.arange(k).repeat(m)
    z1, z2 = _rand(k * m, 6, seed=5), _rand(k * m, 6, seed=6)
    perm_vol = torch.tensor([2, 0, 3, 1])
    rows = torch.cat([torch.arange(v * k, (v + 1) * k) for v in perm_vol])
    a = global_contrastive_loss(z1, z2, strategy, part)
    b = global_contrastive_loss(z1[rows], z2[rows], strategy, part[rows])
    assert float(a.loss) == pytest.approx(float(b.loss), rel=1e-12)
    # swapping the two views is also a symmetry of every strategy
    c = global_contrastive_loss(z2, z1, strategy, part)
    assert float(a.loss) == pytest.approx(float(c.loss), rel=1e-12)


def test_global_gradients_reach_both_views_and_partition_is_required():
    z1 = _rand(6, 4, seed=7).requires_grad_()
    z2 = _rand(6, 4, seed=8).requires_grad_()
    global_contrastive_loss(z1, z2, "GD", torch.tensor([0, 1, 2, 0, 1, 2])).loss.backward()
    assert z1.grad.abs().sum() > 0 and z2.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="partition"):
        global_contrastive_loss(z1, z2, "GD", None)
    with pytest.raises(ValueError, match="strategy"):
        global_contrastive_loss(z1, z2, "GX", None)


def test_expand_pairs_rejects_inconsistent_relations():
    eye = torch.eye(3, dtype=torch.bool)
    with pytest.raises(ValueError, match="own positive"):
        expand_pairs(eye, ~eye)
    pos = torch.zeros(3, 3, dtype=torch.bool)
    pos[0, 1] = True
    with pytest.raises(ValueError, match="both positive and negative"):
        expand_pairs(pos, pos.clone())


# ---------------------------------------------------------------------------------------------- local
@pytest.mark.parametrize("strategy", ["LR", "LD"])
def test_local_pairs_and_negatives_match_the_paper_sets(strategy):
    n, a = len(PARTITION), 3
    masks = local_pair_masks(n, a, strategy, torch.as_tensor(PARTITION))
    key = lambda k: (k // (n * a), (k // a) % n, k % a)  # noqa: E731
    got = _terms_from_masks(masks, key)
    want = {(x, p, frozenset(negs)) for x, p, negs in ref_local_terms(PARTITION, a, strategy)}
    assert got == want


def test_local_pairs_written_out_for_one_anchor():
    """Anchor: view 1, image 0 (partition 0), region 1 of 3; images 2 and 4 share partition 0."""
    n, a = len(PARTITION), 3
    key = lambda k: (k // (n * a), (k // a) % n, k % a)  # noqa: E731
    anchor = (0 * n + 0) * a + 1
    own = {(v, 0, r) for v in range(2) for r in (0, 2)}
    m = local_pair_masks(n, a, "LR", torch.as_tensor(PARTITION))
    (row,) = (m.anchor == anchor).nonzero().flatten().tolist()
    assert key(int(m.positive[row])) == (1, 0, 1)
    assert {key(k) for k in m.valid[row].nonzero().flatten().tolist()} - {(1, 0, 1)} == own
    m = local_pair_masks(n, a, "LD", torch.as_tensor(PARTITION))
    rows = (m.anchor == anchor).nonzero().flatten().tolist()
    assert {key(int(m.positive[r])) for r in rows} == {(1, 0, 1), (0, 2, 1), (0, 4, 1)}
    for r in rows:
        j = key(int(m.positive[r]))[1]
        negs = {key(k) for k in m.valid[r].nonzero().flatten().tolist()} - {key(int(m.positive[r]))}
        assert negs == own | {(v, j, q) for v in range(2) for q in (0, 2)}


@pytest.mark.parametrize("strategy", ["LR", "LD"])
def test_local_loss_matches_numpy_reference(strategy):
    n, a, tau = len(PARTITION), 4, 0.1
    f1, f2 = _rand(n, a, 5, seed=9), _rand(n, a, 5, seed=10)
    out = local_contrastive_loss(f1, f2, strategy, torch.as_tensor(PARTITION), temperature=tau)
    terms = ref_local_terms(PARTITION, a, strategy)
    assert float(out.loss) == pytest.approx(ref_loss(_local_emb(f1.numpy(), f2.numpy()), terms, tau), rel=1e-9)
    assert out.num_terms == len(terms)
    assert out.negatives_per_term == pytest.approx(np.mean([len(t[2]) for t in terms]))
    assert out.positives_per_anchor == pytest.approx(len(terms) / (2 * n * a))


def test_local_lr_is_eq4_exactly():
    """L^R = 1/|X| sum_x 1/(2A) sum_r [l(x~, x^, r) + l(x^, x~, r)] with Omega^- = other regions of both maps."""
    n, a, tau = 3, 4, 0.5
    f1, f2 = _rand(n, a, 3, seed=11), _rand(n, a, 3, seed=12)
    total = 0.0
    for i in range(n):
        maps = (f1[i].numpy(), f2[i].numpy())
        for r in range(a):
            negs = [maps[v][q] for v in range(2) for q in range(a) if q != r]
            total += _pair_loss(maps[0][r], maps[1][r], negs, tau) + _pair_loss(maps[1][r], maps[0][r], negs, tau)
    eq4 = total / n / (2 * a)
    assert float(local_contrastive_loss(f1, f2, "LR", temperature=tau).loss) == pytest.approx(eq4, rel=1e-9)


@pytest.mark.parametrize("strategy", ["LR", "LD"])
def test_local_loss_invariant_to_permuting_volumes(strategy):
    k, m, a = 2, 3, 4
    part = torch.arange(k).repeat(m)
    f1, f2 = _rand(k * m, a, 4, seed=13), _rand(k * m, a, 4, seed=14)
    rows = torch.cat([torch.arange(v * k, (v + 1) * k) for v in (1, 2, 0)])
    x = local_contrastive_loss(f1, f2, strategy, part)
    y = local_contrastive_loss(f1[rows], f2[rows], strategy, part[rows])
    assert float(x.loss) == pytest.approx(float(y.loss), rel=1e-12)


def test_local_ld_with_a_lone_partition_equals_lr_there():
    """A partition with one volume: L^D has no other-volume positive there, so L^D == L^R on that row."""
    f1, f2 = _rand(1, 4, 3, seed=15), _rand(1, 4, 3, seed=16)
    lr = local_contrastive_loss(f1, f2, "LR")
    ld = local_contrastive_loss(f1, f2, "LD", torch.tensor([3]))
    assert float(lr.loss) == pytest.approx(float(ld.loss), rel=1e-12)
    f1, f2 = _rand(2, 4, 3, seed=17), _rand(2, 4, 3, seed=18)
    assert float(local_contrastive_loss(f1, f2, "LD", torch.tensor([0, 0])).loss) != pytest.approx(
        float(local_contrastive_loss(f1, f2, "LR").loss))


# ---------------------------------------------------------------------------------------------- region grid / head
@pytest.mark.parametrize("length,size,grid,starts,k", [
    (12, 3, 4, [0, 3, 6, 9], 3),        # exactly tiled
    (20, 3, 4, [0, 6, 11, 17], 3),      # spread from border to border: round(i * 17 / 3)
    (8, 3, 4, [0, 5], 3),               # only 8 // 3 = 2 windows fit without overlap
    (2, 3, 4, [0], 2),                  # window clamped to the axis
    (5, 1, 4, [0, 1, 3, 4], 1),         # 1x1 regions: round(i * 4 / 3)
])
def test_region_starts_rule(length, size, grid, starts, k):
    assert region_starts(length, size, grid) == (starts, k)


@pytest.mark.parametrize("length", range(1, 40))
@pytest.mark.parametrize("size,grid", [(1, 4), (3, 4), (3, 2), (5, 3)])
def test_region_windows_never_overlap_and_stay_inside(length, size, grid):
    starts, k = region_starts(length, size, grid)
    assert starts[0] == 0 and starts[-1] + k == length or len(starts) == 1
    assert all(b - a >= k for a, b in zip(starts, starts[1:]))
    assert starts[-1] + k <= length and 1 <= len(starts) <= grid


def test_local_head_regions_are_window_means_in_row_major_order():
    head = LocalProjectionHead(4, region_size=3, grid=2)
    maps = _rand(2, 4, 9, 7, seed=19).float()
    regions = head.pool_regions(maps)
    (ys, xs), (ky, kx) = region_grid((9, 7), 3, 2)
    assert (ys, xs) == ([0, 6], [0, 4])
    assert regions.shape == (2, 4, 4)
    for n, (y, x) in enumerate(itertools.product(ys, xs)):
        want = maps[:, :, y:y + ky, x:x + kx].mean(dim=(2, 3))
        torch.testing.assert_close(regions[:, n], want)
    assert head.regions(maps).shape == (2, 4, 4)
    assert head.num_regions((9, 7)) == 4
