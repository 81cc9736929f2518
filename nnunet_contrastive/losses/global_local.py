"""Global and local contrastive losses of Chaitanya et al. (NeurIPS 2020) as mask builders over the one core.

Every strategy is a pair of relations over stacked embeddings (items): ``pos_rel[a, p]`` = (a, p) is a similar pair
(Lambda^+ / Omega^+) and ``neg_rel[a, k]`` = k is a dissimilar item of a (Lambda^- / Omega^-). The paper's loss of one
directed pair (Eq. 1 / Eq. 3) has its OWN denominator: the positive plus the negatives, and no other positive::

    l(a, p) = -log( e^{s_ap} / (e^{s_ap} + sum_{k in D(a, p)} e^{s_ak}) ),   D(a, p) = neg_rel[a] | neg_rel[p]

So each directed pair becomes one row of :func:`nnunet_contrastive.losses.core.info_nce` (pair expansion,
:func:`expand_pairs`): anchor = the embedding of ``a``, one positive key ``p``, valid keys = ``{p} u D(a, p)``. The
loss is the mean over all directed pair terms (:func:`pair_info_nce`). For the global strategies and L^R,
``neg_rel[p] == neg_rel[a]`` (the negatives depend on the anchor only); for L^D the negatives are the other regions
of the anchor's image AND of the positive's image (the paper: "the remaining local regions f_s^i(u', v') and
f_s^j(u', v')"). Normalisation: Eq. 4 (local) is exactly this mean; Eq. 2 (global) sums both directions of each
unordered pair and divides by the number of unordered pairs, i.e. twice this mean - we use the mean over directed
terms for both losses, one scale for every strategy. The authors' code divides by image counts instead
(methods.md §B.5: 8 G^D terms per anchor / 48); we do not.

Global strategies (items: ``[view 1 of rows 0..N-1 ; view 2 of rows 0..N-1]``, 2N items; ``partition`` (N,) ids):
  * ``"GR"`` (SimCLR, the paper's random strategy): positive = the other view of the same image; negatives = every
    item of every other image (2N - 2).
  * ``"GDminus"`` (G^D-): positive = the other view of the same image; negatives = items of OTHER partitions only
    (same-partition images of other volumes are neither positive nor negative).
  * ``"GD"`` (G^D): positives = every other item of the same partition (the other view, and both views of the same
    partition's images of other volumes); negatives = items of other partitions.
Local strategies (items: ``(view, row, region)`` in that order, index ``(v * N + i) * A + r``, 2NA items):
  * ``"LR"``: positive = the same region of the other view of the same image; negatives = the other regions of the
    same image in both views (Eq. 3, the paper's "all other local regions in both feature maps").
  * ``"LD"``: positives = the same region in the other view of the same image, and in the SAME view of the other
    images of the same partition (the paper's pairs (f_s^i, f_s^j) and (f~_s^i, f~_s^j)); negatives of a pair = the
    other regions of the anchor's image and of the positive's image, both views.

Not reproduced from the authors' code (methods.md §B.5): G^R is implemented (their branch is commented out, loss 0);
no all-zero image rows (the batch is the loader's volume x partition batch, every row a real slice); G^D- takes
the partition of every row from the batch (no hard-coded step of 4 partitions); every anchor of both views is used
in L^D (they use view 1 only) with all other regions as negatives (they use 4 hand-picked ones).

Public API: :data:`GLOBAL_STRATEGIES`, :data:`LOCAL_STRATEGIES`, :class:`PairMasks`, :func:`expand_pairs`,
:func:`global_relations`, :func:`local_relations`, :func:`global_pair_masks`, :func:`local_pair_masks`,
:func:`pair_info_nce`, :class:`PairLoss`, and the losses of a batch :func:`global_contrastive_loss`,
:func:`local_contrastive_loss` (L^D: one core call per partition, since images of different partitions never meet).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from nnunet_contrastive.losses.core import info_nce

__all__ = ["GLOBAL_STRATEGIES", "LOCAL_STRATEGIES", "PairMasks", "PairLoss", "expand_pairs", "global_relations",
           "local_relations", "global_pair_masks", "local_pair_masks", "pair_info_nce", "global_contrastive_loss",
           "local_contrastive_loss"]

GLOBAL_STRATEGIES = ("GR", "GDminus", "GD")
LOCAL_STRATEGIES = ("LR", "LD")


@dataclass(frozen=True)
class PairMasks:
    """One row per directed pair term over K stacked items.

    anchor: (P,) long, the anchor item of each term; positive: (P,) long, its positive item;
    pos: (P, K) bool, one True per row (at ``positive``); valid: (P, K) bool, the positive and the term's negatives;
    num_items: K (every item is an anchor when it has at least one positive)."""

    anchor: Tensor
    positive: Tensor
    pos: Tensor
    valid: Tensor
    num_items: int

    @property
    def num_terms(self) -> int:
        return int(self.anchor.numel())

    def positives_per_anchor(self) -> float:
        """Mean number of pair terms (positives) per item that has at least one."""
        n_anchors = int(torch.unique(self.anchor).numel())
        return self.num_terms / max(1, n_anchors)

    def negatives_per_term(self) -> float:
        """Mean number of negatives in a term's denominator."""
        if self.num_terms == 0:
            return 0.0
        return float((self.valid.sum(dim=1) - 1).double().mean())


def expand_pairs(pos_rel: Tensor, neg_rel: Tensor) -> PairMasks:
    """Pair expansion of (K, K) relations: a row per True entry (a, p) of ``pos_rel`` with the one positive p and
    the negatives ``neg_rel[a] | neg_rel[p]``. ``pos_rel`` must be irreflexive and disjoint from ``neg_rel``."""
    if pos_rel.shape != neg_rel.shape or pos_rel.ndim != 2 or pos_rel.shape[0] != pos_rel.shape[1]:
        raise ValueError(f"pos_rel and neg_rel must be square (K, K) of one shape, got {tuple(pos_rel.shape)} and "
                         f"{tuple(neg_rel.shape)}")
    pos_rel, neg_rel = pos_rel.bool(), neg_rel.bool()
    if bool(pos_rel.diagonal().any()):
        raise ValueError("an item cannot be its own positive")
    if bool((pos_rel & neg_rel).any()):
        raise ValueError("a pair is both positive and negative")
    k = pos_rel.shape[0]
    a_idx, p_idx = torch.nonzero(pos_rel, as_tuple=True)
    pos = torch.zeros((a_idx.numel(), k), dtype=torch.bool, device=pos_rel.device)
    pos[torch.arange(a_idx.numel(), device=pos_rel.device), p_idx] = True
    negs = neg_rel[a_idx] | neg_rel[p_idx]
    rows = torch.arange(a_idx.numel(), device=pos_rel.device)
    if bool(negs[rows, a_idx].any()):
        raise ValueError("neg_rel makes an anchor a negative of its own pair (via its positive's negatives)")
    valid = pos | negs
    return PairMasks(anchor=a_idx, positive=p_idx, pos=pos, valid=valid, num_items=k)


def _check_partition(partition: Optional[Tensor], n: int, strategy: str) -> Tensor:
    if partition is None:
        raise ValueError(f"strategy {strategy!r} needs the partition of every row (the 'partition' meta-label)")
    partition = torch.as_tensor(partition).reshape(-1)
    if partition.numel() != n:
        raise ValueError(f"partition must have one entry per row ({n}), got {partition.numel()}")
    if bool((partition < 0).any()):
        raise ValueError("partition ids must be >= 0 (a row without a partition cannot take part)")
    return partition


def global_relations(n: int, strategy: str, partition: Optional[Tensor] = None, device=None
                     ) -> tuple[Tensor, Tensor]:
    """(pos_rel, neg_rel), each (2N, 2N) bool, over ``[view 1 of the N rows ; view 2 of the N rows]``."""
    if strategy not in GLOBAL_STRATEGIES:
        raise ValueError(f"global strategy must be one of {GLOBAL_STRATEGIES}, got {strategy!r}")
    if n < 1:
        raise ValueError(f"need at least one row, got {n}")
    img = torch.arange(2 * n, device=device) % n
    same_img = img[:, None] == img[None, :]
    eye = torch.eye(2 * n, dtype=torch.bool, device=device)
    if strategy == "GR":
        return same_img & ~eye, ~same_img
    part = _check_partition(partition, n, strategy).to(device).repeat(2)
    same_part = part[:, None] == part[None, :]
    if strategy == "GDminus":
        return same_img & ~eye, ~same_part
    return same_part & ~eye, ~same_part  # GD


def local_relations(n: int, num_regions: int, strategy: str, partition: Optional[Tensor] = None, device=None
                    ) -> tuple[Tensor, Tensor]:
    """(pos_rel, neg_rel), each (2NA, 2NA) bool, over items ``(view, row, region)`` = ``(v * N + i) * A + r``.
    ``neg_rel[a]`` holds the anchor's own image's other regions (both views); :func:`expand_pairs` adds the
    positive's."""
    if strategy not in LOCAL_STRATEGIES:
        raise ValueError(f"local strategy must be one of {LOCAL_STRATEGIES}, got {strategy!r}")
    if n < 1 or num_regions < 1:
        raise ValueError(f"need at least one row and one region, got {n} rows, {num_regions} regions")
    idx = torch.arange(2 * n * num_regions, device=device)
    region = idx % num_regions
    img = (idx // num_regions) % n
    view = idx // (num_regions * n)
    same_img = img[:, None] == img[None, :]
    same_region = region[:, None] == region[None, :]
    same_view = view[:, None] == view[None, :]
    other_view_same_img = same_img & same_region & ~same_view
    neg = same_img & ~same_region
    if strategy == "LR":
        return other_view_same_img, neg
    part = _check_partition(partition, n, strategy).to(device)[img]
    same_part = part[:, None] == part[None, :]
    other_img_same_view = same_part & ~same_img & same_region & same_view
    return other_view_same_img | other_img_same_view, neg


def global_pair_masks(n: int, strategy: str, partition: Optional[Tensor] = None, device=None) -> PairMasks:
    return expand_pairs(*global_relations(n, strategy, partition, device))


def local_pair_masks(n: int, num_regions: int, strategy: str, partition: Optional[Tensor] = None, device=None
                     ) -> PairMasks:
    return expand_pairs(*local_relations(n, num_regions, strategy, partition, device))


@dataclass(frozen=True)
class PairLoss:
    """loss: mean over the pair terms (carries the gradient); num_terms; positives_per_anchor;
    negatives_per_term."""

    loss: Tensor
    num_terms: int
    positives_per_anchor: float
    negatives_per_term: float


def pair_info_nce(items: Tensor, masks: PairMasks, temperature: float = 0.1) -> PairLoss:
    """Mean of the directed pair terms of ``masks`` over the stacked embeddings ``items`` (K, D) on the core."""
    if items.ndim != 2 or items.shape[0] != masks.num_items:
        raise ValueError(f"items must be ({masks.num_items}, D), got {tuple(items.shape)}")
    out = info_nce(items[masks.anchor], items, masks.pos, masks.valid, temperature=temperature)
    return PairLoss(loss=out.loss, num_terms=masks.num_terms, positives_per_anchor=masks.positives_per_anchor(),
                    negatives_per_term=masks.negatives_per_term())


def _combine(parts: list) -> PairLoss:
    """Mean over the union of disjoint groups of terms (each group's loss is its own mean)."""
    parts = [p for p in parts if p.num_terms > 0]
    if not parts:
        raise ValueError("no pair term in the batch")
    total = sum(p.num_terms for p in parts)
    loss = sum(p.loss * (p.num_terms / total) for p in parts)
    n_anchor_weighted = sum(p.num_terms / p.positives_per_anchor for p in parts)
    return PairLoss(loss=loss, num_terms=total, positives_per_anchor=total / n_anchor_weighted,
                    negatives_per_term=sum(p.negatives_per_term * p.num_terms for p in parts) / total)


def global_contrastive_loss(z1: Tensor, z2: Tensor, strategy: str, partition: Optional[Tensor] = None,
                            temperature: float = 0.1) -> PairLoss:
    """Global loss of N rows: ``z1``, ``z2`` (N, D) embeddings of the two views (normalised by the core)."""
    if z1.shape != z2.shape or z1.ndim != 2:
        raise ValueError(f"z1 and z2 must both be (N, D), got {tuple(z1.shape)} and {tuple(z2.shape)}")
    masks = global_pair_masks(z1.shape[0], strategy, partition, device=z1.device)
    return pair_info_nce(torch.cat([z1, z2]), masks, temperature)


def local_contrastive_loss(f1: Tensor, f2: Tensor, strategy: str, partition: Optional[Tensor] = None,
                           temperature: float = 0.1) -> PairLoss:
    """Local loss of N rows: ``f1``, ``f2`` (N, A, D) region embeddings of the two (spatially aligned) views.
    L^D runs one core call per partition (its pairs never cross partitions), which keeps the pair-expanded masks
    at (sum over partitions of 2 m_s A terms x 2 m_s A items) instead of (2NA x 2NA) per term."""
    if f1.shape != f2.shape or f1.ndim != 3:
        raise ValueError(f"f1 and f2 must both be (N, A, D), got {tuple(f1.shape)} and {tuple(f2.shape)}")
    n, a, d = f1.shape
    if strategy == "LR" or strategy not in LOCAL_STRATEGIES:
        masks = local_pair_masks(n, a, strategy, partition, device=f1.device)
        return pair_info_nce(torch.cat([f1, f2]).reshape(2 * n * a, d), masks, temperature)
    partition = _check_partition(partition, n, strategy).to(f1.device)
    parts = []
    for p in torch.unique(partition).tolist():
        rows = torch.nonzero(partition == p).flatten()
        m = local_pair_masks(rows.numel(), a, strategy, partition[rows], device=f1.device)
        items = torch.cat([f1[rows], f2[rows]]).reshape(2 * rows.numel() * a, d)
        parts.append(pair_info_nce(items, m, temperature))
    return _combine(parts)
