"""Pixel samplers for pixel-level contrastive losses: NS, SG and SAG of ARCO (You et al., NeurIPS 2023, §3.3).

A pixel contrastive loss is an average over pixels of a class, ``H = 1/|P| sum_{p in P} h(p)``, estimated from a
few sampled pixels ``D``: ``H_hat = 1/|D| sum_{p in D} h(p)``. The samplers here only choose ``D``; they know
nothing about features or losses (in the style of pytorch-metric-learning's miners), so a loss takes a
:class:`PixelSample` and gathers its features with one ``gather`` (:meth:`PixelSample.gather`).

* :class:`NSSampler` - naive sampling: uniform, without replacement, over the valid pixels of (image, class).
* :class:`SGSampler` - stratified group sampling: a regular grid of cells over the image (the paper's spatial
  version, "partition the image ... into grids with the same size", not the authors' code, which stratifies the
  list of candidate indices instead of image coordinates), samples allocated to
  the cells proportionally to each cell's number of valid pixels, uniform without replacement inside each cell,
  independent across cells.
* :class:`SAGSampler` - stratified antithetic group sampling: as SG, but inside each cell the pixels are drawn in
  antithetic pairs ``p`` and ``2 c - p`` mirrored through the cell centre ``c``, both valid.

Input (common interface, :meth:`PixelSampler.sample`)
------------------------------------------------------
``valid``: BoolTensor ``(B, K, *S)`` with ``S = (H, W)`` (2D) or ``(D, H, W)`` (3D; any number >= 1 of spatial
axes works); ``valid[b, k]`` is the set ``P`` of pixels of image ``b`` eligible as samples of class ``k`` (e.g. a
ground-truth or confident pseudo-label mask; build it from a label map with :func:`class_masks`). Classes may
overlap; each (image, class) is sampled independently. ``n_per_class``: the number ``n`` of pixels wanted per
(image, class) (or per class over the whole batch with ``pool_batch=True``). ``generator``: an optional
``torch.Generator`` on ``valid.device`` (``None`` uses torch's global RNG); the same generator state gives the
same sample.

Output (:class:`PixelSample`)
-----------------------------
``index``: LongTensor ``(B, K, n)`` of flat pixel indices into ``prod(S)`` (row-major, i.e. into
``x.flatten(2)`` of a ``(B, C, *S)`` map); only the first ``count[b, k]`` slots are samples, the remaining slots
hold 0 (a valid index, so a gather never fails) and are masked by ``mask`` (``(B, K, n)`` bool). ``count``:
LongTensor ``(B, K)``, ``min(n, |P|)``. ``partner``: LongTensor ``(B, K, n)``, for SAG the slot of the antithetic
partner of each slot (``-1`` for unpaired samples, padding, and for NS/SG). With ``pool_batch=True`` the leading
dimension is 1 and the indices are flat into ``B * prod(S)`` (image-major: ``b * prod(S) + pixel``).

Behaviour common to the three samplers
--------------------------------------
* Never a pixel outside ``valid``; never the same pixel twice in one (image, class) (sampling without
  replacement, so ``count = min(n, |P|)``).
* Fewer valid pixels than requested (``|P| <= n``): all of them are returned, once each (``count = |P|``).
* Empty class (``|P| = 0``): ``count = 0``, all slots padding; never an error.
* Unbiasedness: whenever ``count = n``, every valid pixel has the same inclusion probability ``n / |P|`` under all
  three samplers, so the plain sample mean ``H_hat`` is an exactly unbiased estimator of ``H`` for every ``h``
  (and equals ``H`` when all pixels are returned). For SG/SAG this needs exactly proportional allocation in
  expectation, which the default ``allocation="systematic"`` rounding gives (see :func:`allocate_systematic`,
  applied along the snake order of the cells, :func:`snake_order`, so that the rounded-up cells are spread
  evenly over the image and the rounding adds little variance); the deterministic ``"largest_remainder"`` rule
  keeps every cell within one sample of its proportional share but is then only approximately unbiased (badly
  so when many cells have a fractional quota below one).
* Variance: SG with proportional allocation has variance no larger than NS (paper Thm 3.2; with sampling without
  replacement up to finite-population terms of order ``1/|P_m|``, and up to the small extra variance of the
  randomised rounding), strictly smaller when the cell means of ``h`` differ. SAG is at most about twice SG
  (Lemma 3.1: the mean of a pair never varies more than one pixel, so a pair costs at most a factor 2) and much
  smaller when ``h`` is smooth (close to linear) inside the cells, because a pair's mean
  ``(h(p) + h(2c - p)) / 2`` cancels the linear part; it is larger than SG for ``h`` symmetric about the cell
  centres. Pairs need two samples in a cell: with ``n`` below about twice the number of cells holding the class,
  most cells get one sample and SAG is no better than SG.

Grid
----
``grid`` is the number of cells per spatial axis (an int for all axes, or one int per axis); default 4, i.e. 4 x 4
cells in 2D and 4 x 4 x 4 in 3D (the cut count of the authors' code). Along an axis of length ``s`` split into
``g`` cells, pixel ``x`` lies in cell ``floor(x g / s)``; cell ``i`` spans ``[ceil(i s / g), ceil((i+1) s / g))``,
so cell lengths differ by at most one. With ``g > s`` some cells are empty (harmless).

Cost: one ``nonzero`` of ``valid`` (a host sync on GPU) and one sort of the valid pixels, ``O(P log P)`` for
``P = valid.sum()``; memory ``O(P)`` (plus the ``(B, K, n)`` outputs). "Pixel" reads "voxel" in 3D.
"""
from __future__ import annotations

import math
import numbers
import operator
from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple, Type, Union

import torch

__all__ = [
    "PixelSample",
    "PixelSampler",
    "NSSampler",
    "SGSampler",
    "SAGSampler",
    "SAMPLERS",
    "build_sampler",
    "class_masks",
    "allocate_systematic",
    "allocate_largest_remainder",
    "snake_order",
]

GridSpec = Union[int, Sequence[int]]


# ---------------------------------------------------------------------------------------------- result
@dataclass(frozen=True)
class PixelSample:
    """Sampled pixels for every (image, class), padded to ``n`` slots.

    Attributes (``G = B`` per image, ``G = 1`` with ``pool_batch=True``):
        index: LongTensor ``(G, K, n)``, flat pixel indices into ``prod(S)`` (pooled: into ``B * prod(S)``,
            ``b * prod(S) + pixel``); padding slots hold 0.
        count: LongTensor ``(G, K)``, number of real samples; they occupy slots ``0 .. count - 1``.
        partner: LongTensor ``(G, K, n)``, slot of the antithetic partner (SAG), ``-1`` if unpaired or padding.
        pooled: whether the batch was pooled (``G = 1``).
    """

    index: torch.Tensor
    count: torch.Tensor
    partner: torch.Tensor
    pooled: bool = False

    @property
    def mask(self) -> torch.Tensor:
        """BoolTensor ``(G, K, n)``: True on real samples, False on padding."""
        n = self.index.shape[-1]
        return torch.arange(n, device=self.index.device) < self.count.unsqueeze(-1)

    def gather(self, features: torch.Tensor) -> torch.Tensor:
        """Features of the sampled pixels.

        Args:
            features: ``(B, C, *S)`` map (same ``B`` and ``S`` as the ``valid`` mask that was sampled).

        Returns:
            ``(G, K, n, C)``; padding slots hold the features of pixel 0 (select with :attr:`mask`).
        """
        G, K, n = self.index.shape
        B, C = features.shape[:2]
        flat = features.reshape(B, C, -1)
        if self.pooled:
            flat = flat.transpose(0, 1).reshape(1, C, -1)  # (1, C, B * L), image-major
        elif G != B:
            raise ValueError(f"features have batch size {B}, the sample has {G} images")
        idx = self.index.reshape(G, 1, K * n).expand(G, C, K * n)
        return flat.gather(2, idx).reshape(G, C, K, n).permute(0, 2, 3, 1)


# ---------------------------------------------------------------------------------------------- helpers
def class_masks(labels: torch.Tensor, classes: Sequence[int]) -> torch.Tensor:
    """``(B, *S)`` integer label map -> BoolTensor ``(B, K, *S)``, ``out[:, j] = labels == classes[j]``."""
    cls = torch.as_tensor(list(classes), device=labels.device, dtype=labels.dtype)
    shape = (1, -1) + (1,) * (labels.dim() - 1)
    return labels.unsqueeze(1) == cls.reshape(shape)


def _ceil_div(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return -torch.div(-a, b, rounding_mode="floor")


def allocate_systematic(counts: torch.Tensor, n: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """Proportional allocation with systematic randomised rounding (exact integer arithmetic).

    Row ``g`` distributes ``n[g]`` samples over its cells with quotas ``q_m = n N_m / N`` (``N_m = counts[g, m]``,
    ``N = sum_m N_m``): with cumulative counts ``C_m = N_1 + ... + N_m`` and the offset ``U = offset[g]`` in
    ``[0, N)``, cell ``m`` gets ``ceil((n C_m - U) / N) - ceil((n C_{m-1} - U) / N)`` samples. Then every cell gets
    ``floor(q_m)`` or ``ceil(q_m)`` samples, the row total is exactly ``n``, and for ``U`` uniform on
    ``{0, ..., N - 1}`` the expected allocation is exactly ``q_m`` (what makes SG/SAG unbiased). Any run of
    consecutive columns also receives its summed quota up to one sample, so when the columns list the cells in an
    order where neighbours are spatial neighbours (the samplers use :func:`snake_order`), the rounding is
    spatially balanced.

    Args:
        counts: LongTensor ``(G, M)``, valid pixels per cell.
        n: LongTensor ``(G,)``, samples per row, ``0 <= n[g] <= sum(counts[g])``.
        offset: LongTensor ``(G,)``, ``0 <= offset[g] < max(1, sum(counts[g]))``.

    Returns:
        LongTensor ``(G, M)``.
    """
    total = counts.sum(1).clamp(min=1).unsqueeze(1)
    cum = counts.cumsum(1)
    bounds = _ceil_div(n.unsqueeze(1) * cum - offset.unsqueeze(1), total)
    return torch.diff(bounds, dim=1, prepend=torch.zeros_like(bounds[:, :1]))


def allocate_largest_remainder(counts: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """Proportional allocation with the largest-remainder (Hamilton) rule; deterministic.

    Every cell first gets ``floor(q_m)`` (``q_m = n N_m / N``); the ``n - sum floor(q_m)`` remaining samples go to
    the cells with the largest remainders ``q_m - floor(q_m)``, ties to the lower cell index. Row totals are
    exactly ``n``; each cell is within one of ``q_m``; the expectation is not exactly ``q_m``.

    Args:
        counts: LongTensor ``(G, M)``; n: LongTensor ``(G,)`` with ``0 <= n[g] <= sum(counts[g])``.

    Returns:
        LongTensor ``(G, M)``.
    """
    G, M = counts.shape
    total = counts.sum(1).clamp(min=1).unsqueeze(1)
    num = n.unsqueeze(1) * counts
    base = torch.div(num, total, rounding_mode="floor")
    rem = num - base * total
    deficit = n - base.sum(1)
    key = -rem * M + torch.arange(M, device=counts.device)  # larger remainder first, then lower index
    order = key.argsort(dim=1)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(M, device=counts.device).expand(G, M))
    return base + (rank < deficit.unsqueeze(1)).long()


def snake_order(grid: Sequence[int]) -> torch.Tensor:
    """Cells of a ``grid`` (cells per axis, row-major cell ids) in boustrophedon ("snake") order.

    Returns LongTensor ``(prod(grid),)``: the cell ids in visiting order. The last axis is walked forwards or
    backwards depending on the parity of the position reached along the outer axes, so consecutive cells are
    always face neighbours (2D 3 x 3: ``0 1 2 5 4 3 6 7 8``).
    """
    grid = tuple(grid)
    pos = torch.zeros(math.prod(grid), dtype=torch.long)
    ids = torch.arange(math.prod(grid))
    rest = ids
    for a, g in enumerate(grid):
        stride = math.prod(grid[a + 1:])
        i = torch.div(rest, stride, rounding_mode="floor")
        rest = rest - i * stride
        pos = pos * g + torch.where(pos % 2 == 0, i, g - 1 - i)
    return torch.empty_like(ids).scatter_(0, pos, ids)


def _grid_tuple(grid: GridSpec, ndim: int) -> Tuple[int, ...]:
    if isinstance(grid, int) and not isinstance(grid, bool):
        grid = (grid,) * ndim
    grid = tuple(operator.index(g) for g in grid)
    if len(grid) != ndim or any(g < 1 for g in grid):
        raise ValueError(f"grid must be a positive int or {ndim} positive ints, got {grid!r}")
    return grid


def _uniform_index(high: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
    """Uniform integers in ``[0, high)`` elementwise (0 where ``high <= 0``)."""
    u = torch.rand(high.shape, dtype=torch.float64, device=high.device, generator=generator)
    return torch.minimum((u * high.double()).long(), (high - 1).clamp(min=0))


# ---------------------------------------------------------------------------------------------- samplers
class PixelSampler:
    """Common interface: ``sampler(valid, n_per_class, generator=None, pool_batch=False) -> PixelSample``.

    Subclasses differ in the grid (NS: one cell), and in whether pixels are drawn in antithetic pairs (SAG).
    """

    name = "base"

    def __init__(self, grid: GridSpec = 4, allocation: str = "systematic", antithetic: bool = False):
        if allocation not in ("systematic", "largest_remainder"):
            raise ValueError(f"allocation must be 'systematic' or 'largest_remainder', got {allocation!r}")
        if not (isinstance(grid, int) and not isinstance(grid, bool)):
            grid = tuple(grid)
        self.grid = grid
        self.allocation = allocation
        self.antithetic = bool(antithetic)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(grid={self.grid!r}, allocation={self.allocation!r})"

    def __call__(self, valid: torch.Tensor, n_per_class: int, generator: Optional[torch.Generator] = None,
                 pool_batch: bool = False) -> PixelSample:
        return self.sample(valid, n_per_class, generator, pool_batch)

    def sample(self, valid: torch.Tensor, n_per_class: int, generator: Optional[torch.Generator] = None,
               pool_batch: bool = False) -> PixelSample:
        """Draw up to ``n_per_class`` valid pixels per (image, class).

        Args:
            valid: BoolTensor ``(B, K, *S)``, ``S`` = ``(H, W)`` or ``(D, H, W)``.
            n_per_class: samples wanted per (image, class); per class over the batch if ``pool_batch``.
            generator: ``torch.Generator`` on ``valid.device``, or None for the global RNG.
            pool_batch: sample each class from the valid pixels of all images together (the grid cells of all
                images are the strata; proportional allocation across images and cells).

        Returns:
            :class:`PixelSample` with ``index`` ``(B, K, n)`` (``(1, K, n)`` if pooled), see the module docstring.
        """
        if not isinstance(valid, torch.Tensor) or valid.dtype != torch.bool or valid.dim() < 3:
            raise ValueError("valid must be a BoolTensor of shape (B, K, *spatial)")
        if isinstance(n_per_class, bool) or not isinstance(n_per_class, numbers.Integral) or n_per_class < 0:
            raise ValueError(f"n_per_class must be a non-negative int, got {n_per_class!r}")
        return _draw(valid, int(n_per_class), _grid_tuple(self.grid, valid.dim() - 2), self.allocation, self.antithetic,
                     bool(pool_batch), generator)


class NSSampler(PixelSampler):
    """Naive sampling (NS): ``n`` pixels uniformly without replacement among the valid pixels of each
    (image, class) (or of each class over the batch with ``pool_batch``). ``partner`` is all -1."""

    name = "ns"

    def __init__(self):
        super().__init__(grid=1)

    def __repr__(self) -> str:
        return "NSSampler()"


class SGSampler(PixelSampler):
    """Stratified group sampling (SG, paper §3.3).

    The image is cut into ``grid`` cells per axis (default 4: 4 x 4 in 2D, 4 x 4 x 4 in 3D); cell ``m`` with
    ``N_m`` valid pixels of the class (``N`` in all) receives ``n_m`` samples, ``n_m`` in ``{floor(q_m),
    ceil(q_m)}`` with ``q_m = n N_m / N`` and ``sum n_m = n`` exactly. ``allocation="systematic"`` (default):
    randomised rounding with ``E[n_m] = q_m``, hence unbiased, along the snake order of the cells
    (:func:`allocate_systematic`, :func:`snake_order`); ``"largest_remainder"``: deterministic
    (:func:`allocate_largest_remainder`). Inside each cell the ``n_m`` pixels are uniform without replacement,
    independently of the other cells. ``partner`` is all -1.
    """

    name = "sg"

    def __init__(self, grid: GridSpec = 4, allocation: str = "systematic"):
        super().__init__(grid=grid, allocation=allocation)


class SAGSampler(PixelSampler):
    """Stratified antithetic group sampling (SAG, paper §3.3).

    Cells and the allocation ``n_m`` per cell are those of :class:`SGSampler`. The centre ``c`` of a cell is the
    centre of its box (the cell spanning ``[a, b)`` along an axis mirrors ``x`` to ``a + b - 1 - x``), so the mirror
    ``2c - p`` of a pixel of the cell is always in the cell. The valid pixels ``V_m`` of the cell split into

    * ``S_m``: pixels whose mirror is a *different* valid pixel (pairs ``{p, 2c - p}``; ``|S_m|`` even), and
    * ``A_m``: the others (mirror not valid, e.g. at the class border, or the pixel is its own mirror, the centre
      of an odd-sized cell).

    ``n_m`` is split into ``t_S`` samples for ``S_m`` and ``n_m - t_S`` for ``A_m`` with ``t_S`` the floor or
    ceiling of ``n_m |S_m| / |V_m|``, randomised so that ``E[t_S | n_m] = n_m |S_m| / |V_m|`` (proportional
    allocation again). ``S_m`` is sampled as ``floor(t_S / 2)`` distinct pairs, uniform over the pairs, both
    members taken; if ``t_S`` is odd, one more pixel is drawn uniformly from the pixels of ``S_m`` not yet taken
    (a random member of a further pair) - the single unpaired draw that keeps the total exact. ``A_m`` is
    sampled uniformly without replacement: a pixel whose mirror is invalid is never paired with an invalid pixel
    nor forced onto another partner; it is an independent draw.

    Property that holds: every valid pixel still has inclusion probability exactly ``n / N`` (pairs are uniform
    over ``S_m``, the split and the cell allocation are proportional in expectation), so the sample mean is
    exactly unbiased, as for SG; antithetic symmetry holds for every slot with ``partner >= 0``. The variance is
    at most that of SG up to the paper's factor 2 (Lemma 3.1) and is much smaller for ``h`` smooth in the cells.
    With ``allocation="largest_remainder"`` only the cell allocation becomes deterministic; the split stays
    randomised. A cell needs ``n_m >= 2`` for a pair: choose ``n`` of at least about twice the number of cells
    that hold the class (default grid: 32 in 2D), else SAG behaves like SG.
    """

    name = "sag"

    def __init__(self, grid: GridSpec = 4, allocation: str = "systematic"):
        super().__init__(grid=grid, allocation=allocation, antithetic=True)


SAMPLERS: Dict[str, Type[PixelSampler]] = {"ns": NSSampler, "sg": SGSampler, "sag": SAGSampler}


def build_sampler(name: str, **kwargs) -> PixelSampler:
    """``build_sampler("ns" | "sg" | "sag", **kwargs)`` -> sampler instance (kwargs: ``grid``, ``allocation``;
    none for NS)."""
    try:
        cls = SAMPLERS[name.lower()]
    except KeyError:
        raise ValueError(f"unknown sampler {name!r}; choose one of {sorted(SAMPLERS)}") from None
    return cls(**kwargs)


# ---------------------------------------------------------------------------------------------- core
def _draw(valid: torch.Tensor, n: int, grid: Tuple[int, ...], allocation: str, antithetic: bool,
          pool_batch: bool, generator: Optional[torch.Generator]) -> PixelSample:
    """Vectorised over the batch and classes; one sort of the valid pixels does all the per-stratum draws.

    Stratum of a valid pixel = (group, cell[, paired/unpaired]); group = (image, class), or class if pooled, in
    which case the cell id includes the image. The valid pixels are put in a uniformly random order within each
    stratum (antithetic pairs: random order of pairs, members adjacent) and the first ``alloc`` of each stratum
    are taken.
    """
    device = valid.device
    B, K = valid.shape[:2]
    spatial = tuple(valid.shape[2:])
    L = math.prod(spatial)
    M = math.prod(grid)
    flat = valid.reshape(B, K, L)
    G = 1 if pool_batch else B
    n_groups = G * K

    b_idx, k_idx, pix = flat.nonzero(as_tuple=True)  # sorted by (b, k, pix)
    P = pix.numel()

    # cell of each pixel (and the mirror through its cell centre, for SAG)
    cell = torch.zeros_like(pix)
    mirror = torch.zeros_like(pix)
    rest = pix
    strides = [math.prod(spatial[a + 1:]) for a in range(len(spatial))]
    for s, g, st in zip(spatial, grid, strides):
        x = torch.div(rest, st, rounding_mode="floor")
        rest = rest - x * st
        i = torch.div(x * g, s, rounding_mode="floor")
        cell = cell * g + i
        if antithetic:
            lo = torch.div(i * s + g - 1, g, rounding_mode="floor")
            hi = torch.div((i + 1) * s + g - 1, g, rounding_mode="floor")
            mirror = mirror + (lo + hi - 1 - x) * st
    if pool_batch:
        group = k_idx
        cell = b_idx * M + cell
        M_eff = B * M
    else:
        group = b_idx * K + k_idx
        M_eff = M

    # allocation over cells
    stratum = group * M_eff + cell
    counts = torch.bincount(stratum, minlength=n_groups * M_eff).reshape(n_groups, M_eff)
    totals = counts.sum(1)
    n_g = totals.clamp(max=n)
    if allocation == "systematic":
        # systematic rounding along the snake order of the cells (neighbours in the order are neighbours in
        # space), so the rounded-up cells are spread evenly over the image (see allocate_systematic)
        snake = snake_order(grid).to(device)
        if pool_batch:
            snake = (torch.arange(B, device=device).unsqueeze(1) * M + snake).reshape(-1)
        cell_order = snake.expand(n_groups, M_eff)
        alloc_perm = allocate_systematic(counts.gather(1, cell_order), n_g, _uniform_index(totals, generator))
        alloc = torch.empty_like(alloc_perm).scatter_(1, cell_order, alloc_perm)
    else:
        alloc = allocate_largest_remainder(counts, n_g)
    alloc = alloc.reshape(-1)

    # random order within strata: composite sort key (stratum, random key, member)
    perm = torch.randperm(P, device=device, generator=generator) if P else pix.new_zeros(0)
    if antithetic:
        paired = (mirror != pix) & flat[b_idx, k_idx, mirror]
        rep = torch.minimum(pix, mirror)
        lin = (b_idx * K + k_idx) * L
        rep_pos = torch.searchsorted(lin + pix, lin + rep)  # position of the pair's representative
        key = torch.where(paired, perm[rep_pos.clamp(max=max(P - 1, 0))], perm)
        member = (paired & (pix != rep)).long()
        sub = stratum * 2 + (~paired).long()  # sub-stratum: 2m = S_m (pairs), 2m + 1 = A_m
        n_sub = n_groups * M_eff * 2
        # split n_m between S_m and A_m: t_S = floor((n_m |S_m| + U) / |V_m|), U uniform in [0, |V_m|)
        sub_counts = torch.bincount(sub, minlength=n_sub).reshape(-1, 2)
        v = sub_counts.sum(1)
        u = _uniform_index(v, generator)
        t_s = torch.div(alloc * sub_counts[:, 0] + u, v.clamp(min=1), rounding_mode="floor")
        sub_alloc = torch.stack([t_s, alloc - t_s], 1).reshape(-1)
        coin = torch.randint(0, 2, (n_sub,), device=device, generator=generator)
    else:
        key, member, sub, n_sub, sub_alloc = perm, torch.zeros_like(pix), stratum, n_groups * M_eff, alloc
        sub_counts = counts.reshape(-1)

    order = torch.argsort((sub * max(P, 1) + key) * 2 + member)
    sub_o = sub[order]
    start = sub_counts.reshape(-1).cumsum(0) - sub_counts.reshape(-1)
    rank = torch.arange(P, device=device) - start[sub_o]
    t = sub_alloc[sub_o]
    if antithetic:
        is_pair_stratum = (sub_o % 2) == 0
        n_in_pairs = torch.where(is_pair_stratum, t - t % 2, t)
        extra = is_pair_stratum & (t % 2 == 1) & (rank == n_in_pairs + coin[sub_o])
        in_pair = is_pair_stratum & (rank < n_in_pairs)
        sel = (rank < n_in_pairs) | extra
    else:
        sel = rank < t
        in_pair = torch.zeros_like(sel)

    # assemble the padded output
    sel_order = order[sel]
    g_sel = group[sel_order]
    out_idx = pix[sel_order] + (b_idx[sel_order] * L if pool_batch else 0)
    count = torch.bincount(g_sel, minlength=n_groups)
    g_start = count.cumsum(0) - count
    slot = torch.arange(g_sel.numel(), device=device) - g_start[g_sel]
    index = torch.zeros(n_groups, n, dtype=torch.long, device=device)
    index[g_sel, slot] = out_idx
    partner = torch.full((n_groups, n), -1, dtype=torch.long, device=device)
    ip = in_pair[sel]
    partner[g_sel[ip], slot[ip]] = slot[ip] + 1 - 2 * (rank[sel][ip] % 2)
    return PixelSample(index=index.reshape(G, K, n), count=count.reshape(G, K),
                       partner=partner.reshape(G, K, n), pooled=pool_batch)
