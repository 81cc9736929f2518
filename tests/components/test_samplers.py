"""Property tests of the ARCO pixel samplers (nnunet_contrastive.components.samplers, issue #11).

What the paper proves (You et al. 2023, Lemma 3.1 / Thm 3.2) is checked empirically over many independent draws
(the batch dimension holds R copies of one image, so one call gives R draws), against independent NumPy/Fraction
references: cells and mirrors from explicit cell boundaries, allocations with exact rational arithmetic,
variances from the textbook formulas of simple random and stratified sampling without replacement.
"""
from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch

from nnunet_contrastive.components.samplers import (NSSampler, PixelSample, SAGSampler, SGSampler,
                                                    allocate_largest_remainder, allocate_systematic,
                                                    build_sampler, class_masks, snake_order)

SAMPLER_FACTORIES = {
    "ns": lambda: NSSampler(),
    "sg": lambda: SGSampler(grid=4),
    "sag": lambda: SAGSampler(grid=4),
}


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------------- references
def np_cells(spatial, grid):
    """Independent reference: cell id and mirror (flat) of every pixel, from explicit cell boundaries.

    Cell i along an axis of length s cut into g cells spans [ceil(i s / g), ceil((i + 1) s / g)); the mirror of x
    in cell [a, b) is a + b - 1 - x (reflection through the box centre (a + b - 1) / 2)."""
    coords = np.meshgrid(*[np.arange(s) for s in spatial], indexing="ij")
    cell = np.zeros(spatial, dtype=np.int64)
    mirror_coords = []
    for x, s, g in zip(coords, spatial, grid):
        bounds = np.array([-(-(i * s) // g) for i in range(g + 1)])
        i = np.searchsorted(bounds, x, side="right") - 1
        i = np.minimum(i, g - 1)  # empty cells (equal bounds) are never the last bound <= x of a nonempty one
        cell = cell * g + i
        mirror_coords.append(bounds[i] + bounds[i + 1] - 1 - x)
    mirror = np.ravel_multi_index(mirror_coords, spatial)
    return cell.reshape(-1), mirror.reshape(-1)


def ref_systematic(counts, n, U):
    N = sum(counts)
    if N == 0:
        return [0] * len(counts)
    u = Fraction(U, N)
    cum = np.cumsum([0] + list(counts))
    bounds = [math.ceil(Fraction(n * int(c), N) - u) for c in cum]
    return [bounds[i + 1] - bounds[i] for i in range(len(counts))]


def ref_largest_remainder(counts, n):
    N = sum(counts)
    if N == 0:
        return [0] * len(counts)
    q = [Fraction(n * c, N) for c in counts]
    base = [math.floor(x) for x in q]
    left = n - sum(base)
    order = sorted(range(len(q)), key=lambda m: (-(q[m] - base[m]), m))
    for m in order[:left]:
        base[m] += 1
    return base


def ref_snake_2d(rows, cols):
    return [i * cols + (j if i % 2 == 0 else cols - 1 - j) for i in range(rows) for j in range(cols)]


def samples_np(res: PixelSample):
    """List over (g, k) of the sampled index arrays (padding removed)."""
    idx = res.index.numpy()
    cnt = res.count.numpy()
    return [[idx[g, k, :cnt[g, k]] for k in range(idx.shape[1])] for g in range(idx.shape[0])]


def estimates(res: PixelSample, h: np.ndarray, k: int = 0) -> np.ndarray:
    """Sample mean of h (flat, per image) for class k, one value per image (draw)."""
    idx = res.index[:, k].numpy()
    cnt = res.count[:, k].numpy()
    m = np.arange(idx.shape[1])[None] < cnt[:, None]
    return (h[idx] * m).sum(1) / cnt


def disk(shape, centre, radius):
    yy, xx = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    return (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius ** 2


def repeat_mask(mask: np.ndarray, R: int) -> torch.Tensor:
    return torch.from_numpy(mask).reshape((1, 1) + mask.shape).expand((R, 1) + mask.shape).contiguous()


def assert_unbiased(est: np.ndarray, target: float, z: float = 4.5):
    """Mean of R i.i.d. estimates within z standard errors of the target (plus float round-off)."""
    se = est.std(ddof=1) / math.sqrt(len(est))
    assert abs(est.mean() - target) <= z * se + 1e-9, (est.mean(), target, se)


# ---------------------------------------------------------------------------------------------- allocation
def test_systematic_allocation_matches_exact_reference_and_is_proportional_in_expectation():
    rng = np.random.default_rng(0)
    for _ in range(30):
        M = int(rng.integers(1, 9))
        counts = [int(c) for c in rng.integers(0, 7, M)]
        N = sum(counts)
        n = int(rng.integers(0, N + 1))
        U = torch.arange(max(N, 1))
        got = allocate_systematic(torch.tensor([counts] * len(U)), torch.full((len(U),), n), U).numpy()
        for u in range(len(U)):
            ref = ref_systematic(counts, n, u)
            assert got[u].tolist() == ref
            assert sum(ref) == n
            for m in range(M):  # floor or ceil of the quota
                q = Fraction(n * counts[m], max(N, 1))
                assert math.floor(q) <= got[u, m] <= math.ceil(q)
        if N:  # exhaustive average over the uniform offset = the proportional quota, exactly
            for m in range(M):
                assert Fraction(int(got[:, m].sum()), N) == Fraction(n * counts[m], N)


def test_largest_remainder_allocation_matches_reference():
    rng = np.random.default_rng(1)
    rows, ns, refs = [], [], []
    for _ in range(40):
        M = int(rng.integers(1, 10))
        counts = [int(c) for c in rng.integers(0, 9, M)]
        n = int(rng.integers(0, sum(counts) + 1))
        rows.append(counts + [0] * (10 - M))
        ns.append(n)
        refs.append(ref_largest_remainder(counts, n) + [0] * (10 - M))
    got = allocate_largest_remainder(torch.tensor(rows), torch.tensor(ns))
    assert got.tolist() == refs
    assert got.sum(1).tolist() == ns
    # a tie at remainder 1/2 in every cell: the lower cell indices get the extra samples
    assert allocate_largest_remainder(torch.tensor([[1, 1, 1, 1]]), torch.tensor([2])).tolist() == [[1, 1, 0, 0]]


@pytest.mark.parametrize("allocation", ["systematic", "largest_remainder"])
def test_sg_cell_counts_follow_the_rounding_rule(allocation):
    H, W, grid, n, R = 20, 18, (4, 3), 23, 600
    mask = disk((H, W), (8, 7), 8) | (np.add.outer(np.arange(H), np.arange(W)) % 5 == 0)
    cell, _ = np_cells((H, W), grid)
    vcell = cell[mask.reshape(-1)]
    counts = np.bincount(vcell, minlength=12)
    q = n * counts / counts.sum()
    res = SGSampler(grid=grid, allocation=allocation)(repeat_mask(mask, R), n, _gen(3))
    per_draw = np.stack([np.bincount(cell[s[0]], minlength=12) for s in samples_np(res)])
    assert (per_draw.sum(1) == n).all()
    assert (per_draw >= np.floor(q) - 1e-9).all() and (per_draw <= np.ceil(q) + 1e-9).all()
    if allocation == "largest_remainder":
        ref = ref_largest_remainder([int(c) for c in counts], n)
        assert (per_draw == np.array(ref)[None]).all()
    else:
        # every draw is the systematic allocation along the snake order for one offset U in [0, N)
        snake = ref_snake_2d(*grid)
        N = int(counts.sum())
        possible = set()
        for U in range(N):
            alloc = ref_systematic([int(counts[m]) for m in snake], n, U)
            full = [0] * 12
            for m, a in zip(snake, alloc):
                full[m] = a
            possible.add(tuple(full))
        assert all(tuple(int(x) for x in row) in possible for row in per_draw)
        # E[n_m] = q_m: the frequency of the rounded-up cell is the fractional part of the quota
        frac = q - np.floor(q)
        up = (per_draw > np.floor(q) + 0.5).mean(0)
        se = np.sqrt(frac * (1 - frac) / R)
        assert (np.abs(up - frac) <= 4.5 * se + 1e-9).all(), (up, frac)


def test_snake_order():
    assert snake_order((4, 3)).tolist() == ref_snake_2d(4, 3)
    assert snake_order((5,)).tolist() == [0, 1, 2, 3, 4]
    grid = (3, 2, 4)
    order = snake_order(grid).numpy()
    assert sorted(order.tolist()) == list(range(24))
    steps = np.abs(np.diff(np.stack(np.unravel_index(order, grid)), axis=1)).sum(0)
    assert (steps == 1).all()  # consecutive cells are face neighbours


# ---------------------------------------------------------------------------------------------- validity
def _random_valid(B, K, spatial, seed):
    rng = np.random.default_rng(seed)
    dens = rng.uniform(0.0, 1.0, size=(B, K) + (1,) * len(spatial))
    v = rng.uniform(size=(B, K) + tuple(spatial)) < dens
    v[0, 0] = False  # an empty class
    if K > 1:
        v[-1, 1] = False
        v[-1, 1].flat[[3, 7, 11]] = True  # a class smaller than n
    return torch.from_numpy(v)


@pytest.mark.parametrize("name", ["ns", "sg", "sag"])
@pytest.mark.parametrize("spatial", [(13, 17), (6, 9, 7)])
def test_validity_no_duplicates_counts_and_padding(name, spatial):
    valid = _random_valid(5, 3, spatial, seed=len(spatial))
    n = 20
    res = SAMPLER_FACTORIES[name]()(valid, n, _gen(1))
    B, K = valid.shape[:2]
    assert res.index.shape == (B, K, n) and res.index.dtype == torch.long
    assert res.count.shape == (B, K) and res.partner.shape == (B, K, n)
    vflat = valid.reshape(B, K, -1).numpy()
    for b in range(B):
        for k in range(K):
            nv = int(vflat[b, k].sum())
            c = int(res.count[b, k])
            assert c == min(n, nv)
            s = res.index[b, k, :c].numpy()
            assert len(np.unique(s)) == c
            assert vflat[b, k, s].all()
            assert (res.index[b, k, c:] == 0).all()
            assert (res.partner[b, k, c:] == -1).all()
            if nv <= n:  # fewer valid pixels than requested: all of them, once each
                assert set(s.tolist()) == set(np.flatnonzero(vflat[b, k]).tolist())
    assert res.count[0, 0] == 0 and res.count[-1, 1] == 3
    assert torch.equal(res.mask, torch.arange(n) < res.count[..., None])
    if name != "sag":
        assert (res.partner == -1).all()


@pytest.mark.parametrize("name", ["ns", "sg", "sag"])
def test_pooled_batch(name):
    valid = _random_valid(4, 2, (12, 10), seed=7)
    L = 120
    n = 50
    res = SAMPLER_FACTORIES[name]()(valid, n, _gen(2), pool_batch=True)
    assert res.pooled and res.index.shape == (1, 2, n)
    vflat = valid.reshape(4, 2, L).numpy()
    for k in range(2):
        allv = np.concatenate([np.flatnonzero(vflat[b, k]) + b * L for b in range(4)])
        c = int(res.count[0, k])
        assert c == min(n, len(allv))
        s = res.index[0, k, :c].numpy()
        assert len(np.unique(s)) == c and np.isin(s, allv).all()
    # the (image, cell) pairs are the strata: each gets the floor or ceiling of its proportional quota
    if name != "ns":
        cell, _ = np_cells((12, 10), (4, 4))
        strata = np.concatenate([b * 16 + cell[np.flatnonzero(vflat[b, 0])] for b in range(4)])
        counts = np.bincount(strata, minlength=64)
        q = n * counts / counts.sum()
        s = res.index[0, 0, :res.count[0, 0]].numpy()
        got = np.bincount((s // L) * 16 + cell[s % L], minlength=64)
        assert got.sum() == n
        assert (got >= np.floor(q) - 1e-9).all() and (got <= np.ceil(q) + 1e-9).all()


def test_empty_input_and_zero_n():
    for name in SAMPLER_FACTORIES:
        s = SAMPLER_FACTORIES[name]()
        res = s(torch.zeros(2, 3, 8, 8, dtype=torch.bool), 16, _gen())
        assert (res.count == 0).all() and (res.index == 0).all() and (res.partner == -1).all()
        res = s(torch.ones(2, 3, 8, 8, dtype=torch.bool), 0, _gen())
        assert res.index.shape == (2, 3, 0) and (res.count == 0).all()


def test_seeding():
    valid = _random_valid(3, 2, (16, 16), seed=4)
    for name, make in SAMPLER_FACTORIES.items():
        a = make()(valid, 12, _gen(123))
        b = make()(valid, 12, _gen(123))
        c = make()(valid, 12, _gen(124))
        assert torch.equal(a.index, b.index) and torch.equal(a.partner, b.partner) and torch.equal(a.count, b.count)
        assert not torch.equal(a.index, c.index)
        g = _gen(5)
        assert not torch.equal(make()(valid, 12, g).index, make()(valid, 12, g).index)  # the generator advances


# ---------------------------------------------------------------------------------------------- antithetic
@pytest.mark.parametrize("spatial,grid", [((16, 16), 4), ((15, 13), (4, 3)), ((8, 7, 6), 2)])
def test_sag_partners_are_mirrored_through_their_cell_centre(spatial, grid):
    rng = np.random.default_rng(11)
    B = 6
    v = rng.uniform(size=(B, 2) + spatial) < 0.75
    v[:, 1] = True  # a full mask: every pixel but odd-cell centres has a valid mirror
    valid = torch.from_numpy(v)
    cell, mirror = np_cells(spatial, grid if isinstance(grid, tuple) else (grid,) * len(spatial))
    res = SAGSampler(grid=grid)(valid, 40, _gen(9))
    idx, par = res.index.numpy(), res.partner.numpy()
    vflat = v.reshape(B, 2, -1)
    n_paired = 0
    for b in range(B):
        for k in range(2):
            c = int(res.count[b, k])
            unpaired_with_valid_mirror = np.zeros(int(cell.max()) + 1, dtype=int)
            for j in range(c):
                p = idx[b, k, j]
                if par[b, k, j] >= 0:
                    q = idx[b, k, par[b, k, j]]
                    assert q == mirror[p] and q != p and cell[q] == cell[p]
                    assert par[b, k, par[b, k, j]] == j
                    assert vflat[b, k, q]
                    n_paired += 1
                elif vflat[b, k, mirror[p]] and mirror[p] != p:
                    unpaired_with_valid_mirror[cell[p]] += 1
            # a pixel with a valid mirror goes unpaired only as the one parity draw of its cell
            assert unpaired_with_valid_mirror.max(initial=0) <= 1
    assert n_paired > B * 40  # most samples are in pairs


def test_sag_linear_function_on_full_mask_has_zero_variance():
    """Every cell of a 32 x 32 image with a 4 x 4 grid has 64 pixels; n = 32 gives each cell one antithetic pair,
    whose mean is the cell centre value for any linear h, so the estimate is exactly H on every draw."""
    H = W = 32
    yy, xx = np.meshgrid(np.arange(H), np.arange(W), indexing="ij")
    h = (0.3 * yy - 1.7 * xx + 2.0).reshape(-1).astype(np.float64)
    res = SAGSampler(grid=4)(torch.ones(200, 1, H, W, dtype=torch.bool), 32, _gen(0))
    assert (res.partner[:, 0] >= 0).all()
    est = estimates(res, h)
    np.testing.assert_allclose(est, h.mean(), rtol=0, atol=1e-9)
    sg = estimates(SGSampler(grid=4)(torch.ones(200, 1, H, W, dtype=torch.bool), 32, _gen(0)), h)
    assert sg.std() > 0.1  # SG alone does not cancel the within-cell slope


# ---------------------------------------------------------------------------------------------- unbiasedness
R_UNBIASED = 2000


def _structured_case():
    H = W = 32
    mask = disk((H, W), (13, 18), 12) & ~disk((H, W), (10, 22), 4)  # an off-centre ring-ish blob
    yy, xx = np.meshgrid(np.arange(H), np.arange(W), indexing="ij")
    smooth = np.exp(-((yy - 6) ** 2 + (xx - 25) ** 2) / 120.0) + 0.02 * yy
    rough = np.random.default_rng(5).normal(size=(H, W))
    return mask, smooth.reshape(-1), rough.reshape(-1)


@pytest.mark.parametrize("name", ["ns", "sg", "sag"])
def test_unbiased_sample_mean_and_uniform_inclusion(name):
    mask, smooth, rough = _structured_case()
    n = 21  # not a divisor of anything: the quotas need rounding
    res = SAMPLER_FACTORIES[name]()(repeat_mask(mask, R_UNBIASED), n, _gen(42))
    assert (res.count == n).all()
    v = mask.reshape(-1)
    for h in (smooth, rough):
        assert_unbiased(estimates(res, h), h[v].mean())
    # every valid pixel is included with probability n / N: z-scores of the inclusion counts
    freq = np.bincount(res.index[:, 0].numpy().reshape(-1), minlength=v.size)
    p = n / v.sum()
    z = (freq[v] - R_UNBIASED * p) / math.sqrt(R_UNBIASED * p * (1 - p))
    assert np.abs(z).max() < 5.0 and abs(np.mean(z ** 2) - 1) < 0.35, (np.abs(z).max(), np.mean(z ** 2))
    assert freq[~v].sum() == 0


def test_unbiasedness_check_can_fail():
    """The same check rejects a biased allocation: 16 equal cells with quota 1/2 each under largest remainder
    (ties to the lower index) never sample the lower half of the image."""
    H = W = 16
    yy = np.repeat(np.arange(H), W).astype(np.float64)
    res = SGSampler(grid=4, allocation="largest_remainder")(torch.ones(400, 1, H, W, dtype=torch.bool), 8, _gen(0))
    with pytest.raises(AssertionError):
        assert_unbiased(estimates(res, yy), yy.mean())
    res = SGSampler(grid=4)(torch.ones(400, 1, H, W, dtype=torch.bool), 8, _gen(0))
    assert_unbiased(estimates(res, yy), yy.mean())


# ---------------------------------------------------------------------------------------------- variance
R_VAR = 2000


def _var(name, mask, h, n, seed):
    est = estimates(SAMPLER_FACTORIES[name]()(repeat_mask(mask, R_VAR), n, _gen(seed)), h)
    return est.var(ddof=1)


def _gradient_case():
    """Full 24 x 24 mask (36 pixels per cell of the 4 x 4 grid), a smooth non-linear function of position."""
    H = W = 24
    yy, xx = np.meshgrid(np.arange(H), np.arange(W), indexing="ij")
    h = np.sin(yy / 7.0) + 0.06 * xx + 0.003 * (xx - 8) ** 2
    return np.ones((H, W), dtype=bool), h.reshape(-1)


def test_ns_and_sg_variances_match_sampling_formulas():
    """Full 24 x 24 mask, 4 x 4 grid (36 pixels per cell), n = 32: exactly 2 draws per cell, no rounding, so
    Var_NS = (1 - n/N) S^2 / n and Var_SG = sum_m W_m^2 (1 - n_m/N_m) S_m^2 / n_m (sampling without replacement)."""
    mask, h = _gradient_case()
    n, N = 32, mask.size
    cell, _ = np_cells(mask.shape, (4, 4))
    var_ns_ref = (1 - n / N) * h.var(ddof=1) / n
    var_sg_ref = sum((1 / 16) ** 2 * (1 - 2 / 36) * h[cell == m].var(ddof=1) / 2 for m in range(16))
    tol = 5 * math.sqrt(2 / (R_VAR - 1))  # relative standard error of a sample variance, ~5 SE
    assert abs(_var("ns", mask, h, n, 1) / var_ns_ref - 1) < tol
    assert abs(_var("sg", mask, h, n, 2) / var_sg_ref - 1) < tol
    assert var_sg_ref < var_ns_ref


@pytest.mark.parametrize("case", ["gradient_full", "blob"])
def test_variance_ordering_sag_le_sg_le_ns_on_structured_images(case):
    if case == "gradient_full":
        mask, h = _gradient_case()
        n = 48  # 3 per cell: one antithetic pair and one parity draw
    else:
        mask, h, _ = _structured_case()
        n = 40
    v_ns, v_sg, v_sag = (_var(s, mask, h, n, seed) for s, seed in (("ns", 10), ("sg", 11), ("sag", 12)))
    # margin: each empirical variance has ~3.2% relative SE at R = 2000; demand a clear 25% gap
    assert v_sg < 0.75 * v_ns, (v_ns, v_sg)
    assert v_sag < 0.75 * v_sg, (v_sg, v_sag)


# ---------------------------------------------------------------------------------------------- helpers/API
def test_gather_matches_manual_indexing():
    valid = _random_valid(3, 2, (9, 11), seed=8)
    feats = torch.randn(3, 5, 9, 11)
    res = SGSampler(grid=3)(valid, 7, _gen(1))
    out = res.gather(feats)
    assert out.shape == (3, 2, 7, 5)
    f = feats.reshape(3, 5, -1)
    for b in range(3):
        for k in range(2):
            for j in range(7):
                assert torch.equal(out[b, k, j], f[b, :, res.index[b, k, j]])
    pooled = SAGSampler(grid=3)(valid, 7, _gen(1), pool_batch=True)
    out = pooled.gather(feats)
    assert out.shape == (1, 2, 7, 5)
    for k in range(2):
        for j in range(int(pooled.count[0, k])):
            i = int(pooled.index[0, k, j])
            assert torch.equal(out[0, k, j], f[i // 99, :, i % 99])


def test_class_masks_build_sampler_and_argument_checks():
    labels = torch.tensor([[[0, 1], [2, 1]], [[2, 2], [0, 0]]])
    m = class_masks(labels, [1, 2])
    assert m.shape == (2, 2, 2, 2) and m.dtype == torch.bool
    assert m[0, 0].tolist() == [[False, True], [False, True]] and m[1, 1].tolist() == [[True, True], [False, False]]
    assert isinstance(build_sampler("SG", grid=2), SGSampler) and isinstance(build_sampler("ns"), NSSampler)
    assert build_sampler("sag").antithetic
    with pytest.raises(ValueError):
        build_sampler("uniform")
    s = SGSampler()
    with pytest.raises(ValueError):
        s(torch.ones(2, 4, 4), 3)  # not bool
    with pytest.raises(ValueError):
        s(torch.ones(2, 4, dtype=torch.bool), 3)  # no spatial axis
    for bad in (-1, 2.0, True):
        with pytest.raises(ValueError):
            s(torch.ones(1, 1, 4, 4, dtype=torch.bool), bad)
    assert s(torch.ones(1, 1, 4, 4, dtype=torch.bool), np.int64(3)).count.item() == 3
    with pytest.raises(ValueError):
        SGSampler(grid=(2, 2, 2))(torch.ones(1, 1, 4, 4, dtype=torch.bool), 3)
    with pytest.raises(ValueError):
        SGSampler(allocation="round")
