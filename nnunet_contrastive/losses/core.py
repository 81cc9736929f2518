"""One contrastive core: InfoNCE over anchors and keys with masks, in the style of pytorch-metric-learning.

Every contrastive loss of this package is a *mask (and key) builder* over :func:`info_nce`: SupCon over meta-labels,
SimCLR, Chaitanya et al.'s global and local strategies, prototypes and ARCO's sampled negatives differ only in which
keys an anchor is compared with (``keys``), which keys are positives (``pos_mask``), which keys enter the softmax
denominator at all (``valid_mask``) and how the positive terms are weighted (``weight``, e.g. self-paced weights,
injected as a function of the detached pair loss, like lightly's ``DCLLoss(weight_fn=...)``).

With A anchors ``a_i`` and K keys ``k_j`` (rows L2-normalised unless ``normalize=False``), temperature ``tau``::

    s_ij      = a_i . k_j / tau                                     one (A, K) similarity matrix
    log p_ij  = s_ij - log sum_{l : valid_il} exp(s_il)             log-sum-exp over the valid keys only
    L_i       = - 1/|P(i)| sum_{j in P(i)} w_ij log p_ij            P(i) = {j : pos_ij}  (pos implies valid)
    loss      = mean of L_i over the anchors with |P(i)| >= 1

Masks may carry leading batch dimensions (``(..., A, K)``) that broadcast against the one matrix: M meta-labels
share one similarity matrix and one log-sum-exp (``pos_mask`` of shape (M, A, K) gives M losses).

Numerics: computed in float32 (float64 for float64 inputs) with autocast disabled, so float16/bfloat16 inputs under
AMP are safe; the weights are always detached (they never carry a gradient). A positive outside ``valid_mask`` is
an error, not a silent change of the denominator.

Public API: :func:`similarity`, :func:`masked_log_softmax`, :func:`info_nce_from_log_prob`, :func:`info_nce`,
:class:`InfoNCEOutput`, :class:`InfoNCELoss`, mask builders :func:`two_view_masks`, :func:`label_positive_mask`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor, nn

__all__ = ["similarity", "masked_log_softmax", "info_nce_from_log_prob", "info_nce", "InfoNCEOutput", "InfoNCELoss",
           "two_view_masks", "label_positive_mask", "class_averaged_mean", "WeightFn"]

#: ``weight_fn(pair_loss, pos_mask) -> weights``: pair_loss = -log p (detached, broadcast like pos_mask)
WeightFn = Callable[[Tensor, Tensor], Tensor]


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def masked_pixel_sums(features: Tensor, masks: Tensor) -> tuple[Tensor, Tensor]:
    """(B, D, *S) features and (B, K, *S) bool masks -> ((B, K, D) sums of the features over each mask's pixels,
    (B, K) pixel counts). Float32 (float64 stays) with autocast off: under CUDA AMP the einsum would run in float16,
    whose sums over a patch's pixels overflow to inf (ARCO's loss was NaN from the first step on a GPU)."""
    b, d = features.shape[:2]
    with torch.autocast(device_type=features.device.type, enabled=False):
        flat = features.reshape(b, d, -1).to(_compute_dtype(features))
        m = masks.reshape(b, masks.shape[1], -1)
        return torch.einsum("bkl,bdl->bkd", m.to(flat.dtype), flat), m.sum(-1)


def class_averaged_mean(values: Tensor, classes: Tensor, weights: Tensor,
                        num_classes: int) -> tuple[Tensor, Tensor, Tensor]:
    """Mean over the classes with weight of each class's weighted mean of ``values``.

    values, weights ``(N,)`` (same dtype), classes long ``(N,)`` in ``[0, num_classes)`` -> (scalar, per-class means
    ``(num_classes,)`` with 0 for a class without weight, bool ``(num_classes,)`` classes that have weight). The
    scalar is 0 (still differentiable) when no class has weight. No data-dependent indexing: no device sync."""
    counts = values.new_zeros(num_classes).index_add_(0, classes, weights)
    per_class = values.new_zeros(num_classes).index_add_(0, classes, values * weights) / counts.clamp(min=1)
    used = counts > 0
    return per_class.sum() / used.sum().clamp(min=1).to(per_class.dtype), per_class, used


def similarity(anchors: Tensor, keys: Tensor, temperature: float, normalize: bool = True) -> Tensor:
    """(A, D), (K, D) -> (A, K) ``a_i . k_j / tau`` in float32 (float64 for float64 inputs), autocast off."""
    if anchors.ndim != 2 or keys.ndim != 2 or anchors.shape[1] != keys.shape[1]:
        raise ValueError(f"anchors (A, D) and keys (K, D) must share D, got {tuple(anchors.shape)} and "
                         f"{tuple(keys.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    dtype = _compute_dtype(anchors, keys)
    with torch.autocast(device_type=anchors.device.type, enabled=False):
        a, k = anchors.to(dtype), keys.to(dtype)
        if normalize:
            a = nn.functional.normalize(a, p=2.0, dim=1)
            k = nn.functional.normalize(k, p=2.0, dim=1)
        return a @ k.T / temperature


def masked_log_softmax(logits: Tensor, valid_mask: Optional[Tensor] = None) -> Tensor:
    """Row-wise ``log p_ij = s_ij - logsumexp_{l valid} s_il``; (A, K) -> (A, K), or (..., A, K) with a batched mask.

    Entries outside ``valid_mask`` hold finite but meaningless values: mask them before use. A row without any
    valid key gives ``-inf`` denominators only where it is used, which :func:`info_nce_from_log_prob` never does
    (an anchor without positives is skipped).
    """
    with torch.autocast(device_type=logits.device.type, enabled=False):
        if valid_mask is None:
            return logits - torch.logsumexp(logits, dim=-1, keepdim=True)
        lse = torch.logsumexp(logits.masked_fill(~valid_mask, float("-inf")), dim=-1, keepdim=True)
        return logits - lse.masked_fill(torch.isinf(lse), 0.0)


@dataclass(frozen=True)
class InfoNCEOutput:
    """Result of :func:`info_nce`. ``...`` are the mask's leading dims (none for a plain (A, K) mask).

    loss: (...) mean over anchors with >= 1 positive, carries the gradient (0 with no such anchor).
    per_anchor: (..., A) ``L_i`` (0 for anchors without positives), carries the gradient.
    has_pos: (..., A) bool, anchors with at least one positive.
    log_prob: (..., A, K) ``log p_ij`` (masked entries meaningless), carries the gradient.
    weights: (..., A, K) detached weights on positives, 0 elsewhere.
    """

    loss: Tensor
    per_anchor: Tensor
    has_pos: Tensor
    log_prob: Tensor
    weights: Tensor


def info_nce_from_log_prob(log_prob: Tensor, pos_mask: Tensor, weight: Optional[Tensor] = None) -> InfoNCEOutput:
    """pytorch-metric-learning's ``_compute_loss`` step: the loss from ``log p`` and the positive mask.

    ``weight`` (broadcastable to ``pos_mask``) is detached here; ``None`` means 1 on every positive. Each anchor is
    normalised by its NUMBER of positives ``|P(i)|``, not by the sum of its weights.
    """
    pos = pos_mask.bool()
    dtype = log_prob.dtype
    w = pos.to(dtype) if weight is None else weight.detach().to(dtype) * pos
    zero = torch.zeros((), dtype=dtype, device=log_prob.device)
    weighted = torch.where(pos, w * log_prob, zero)  # where(): masked entries never reach the sum, even if inf
    num_pos = pos.sum(dim=-1)
    has_pos = num_pos > 0
    per_anchor = -weighted.sum(dim=-1) / num_pos.clamp(min=1).to(dtype)
    n_valid = has_pos.sum(dim=-1)
    loss = torch.where(n_valid > 0, per_anchor.sum(dim=-1) / n_valid.clamp(min=1).to(dtype), zero)
    return InfoNCEOutput(loss=loss, per_anchor=per_anchor, has_pos=has_pos, log_prob=log_prob, weights=w.detach())


def info_nce(anchors: Tensor, keys: Optional[Tensor], pos_mask: Tensor, valid_mask: Optional[Tensor] = None, *,
             weight: Optional[Tensor] = None, weight_fn: Optional[WeightFn] = None, temperature: float = 0.1,
             normalize: bool = True) -> InfoNCEOutput:
    """InfoNCE of A anchors against K keys (``keys=None``: the anchors themselves, K = A).

    Args:
        anchors: (A, D); keys: (K, D) or None.
        pos_mask: bool (A, K) or (..., A, K): the positives of each anchor. Must lie inside ``valid_mask``.
        valid_mask: bool, broadcastable to ``pos_mask``: keys in the softmax denominator (positives and
            negatives). None = every key. With ``keys=None`` pass ``~eye`` to keep an anchor out of its own
            denominator (see :func:`two_view_masks`).
        weight: detached per-pair weights on positives (broadcastable), or ``weight_fn(pair_loss, pos_mask)``
            computed from the detached ``-log p`` (e.g. self-paced weights). Not both.
        temperature: tau > 0. normalize: L2-normalise anchors and keys first.
    Returns:
        :class:`InfoNCEOutput`.
    """
    if weight is not None and weight_fn is not None:
        raise ValueError("pass weight or weight_fn, not both")
    keys = anchors if keys is None else keys
    logits = similarity(anchors, keys, temperature, normalize)
    a, k = logits.shape
    if pos_mask.shape[-2:] != (a, k):
        raise ValueError(f"pos_mask must end in (A, K) = {(a, k)}, got {tuple(pos_mask.shape)}")
    pos = pos_mask.bool()
    if valid_mask is not None:
        valid = valid_mask.bool()
        if bool((pos & ~valid).any()):
            raise ValueError("pos_mask marks a key as positive that valid_mask excludes from the denominator")
    else:
        valid = None
    with torch.autocast(device_type=logits.device.type, enabled=False):
        log_prob = masked_log_softmax(logits, valid)
        if log_prob.ndim < pos.ndim:
            log_prob = log_prob.expand(*pos.shape[:-2], a, k)
        if weight_fn is not None:
            weight = weight_fn((-log_prob).detach(), pos)
        return info_nce_from_log_prob(log_prob, pos, weight)


class InfoNCELoss(nn.Module):
    """Module form of :func:`info_nce` with a fixed temperature and an injected ``weight_fn``.

    ``forward(anchors (A, D), keys (K, D) | None, pos_mask (..., A, K), valid_mask=None) -> InfoNCEOutput``.

    Example::

        loss_fn = InfoNCELoss(temperature=0.1)
        pos, valid = two_view_masks(n)                 # SimCLR over 2n views
        out = loss_fn(torch.cat([z1, z2]), None, pos, valid)
        out.loss.backward()
    """

    def __init__(self, temperature: float = 0.1, weight_fn: Optional[WeightFn] = None, normalize: bool = True):
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature!r}")
        self.temperature, self.weight_fn, self.normalize = float(temperature), weight_fn, bool(normalize)

    def forward(self, anchors: Tensor, keys: Optional[Tensor], pos_mask: Tensor,
                valid_mask: Optional[Tensor] = None) -> InfoNCEOutput:
        return info_nce(anchors, keys, pos_mask, valid_mask, weight_fn=self.weight_fn, temperature=self.temperature,
                        normalize=self.normalize)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, weight_fn={getattr(self.weight_fn, '__name__', self.weight_fn)}"


# ---------------------------------------------------------------------------------------------------- mask builders
def two_view_masks(n: int, device=None) -> tuple[Tensor, Tensor]:
    """SimCLR masks over the 2n stacked views ``[z1; z2]``: positive = the other view of the same sample,
    valid = every view but the anchor itself. Returns (pos (2n, 2n), valid (2n, 2n))."""
    idx = torch.arange(2 * n, device=device)
    valid = idx.unsqueeze(1) != idx.unsqueeze(0)
    pos = (idx.unsqueeze(1) % n == idx.unsqueeze(0) % n) & valid
    return pos, valid


def label_positive_mask(labels: Tensor, views: int = 2) -> Tensor:
    """Positives from integer labels over ``views`` stacked copies of the batch.

    labels: (N,) or (N, M) integers (M label sets, e.g. meta-labels). Returns bool (M, V*N, V*N): same label,
    self excluded. The other views of a sample always share its labels, so they are positives too.
    """
    lab = labels.unsqueeze(1) if labels.ndim == 1 else labels
    lab = torch.cat([lab] * views, dim=0).T  # (M, V*N)
    eye = torch.eye(lab.shape[1], dtype=torch.bool, device=lab.device)
    return (lab.unsqueeze(2) == lab.unsqueeze(1)) & ~eye
