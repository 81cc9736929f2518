"""ARCO's pixel contrast (You et al., NeurIPS 2023, Eq. E.2) as a mask and key builder over the contrastive core.

Per class ``c`` (background included, as in the authors' code):

* **anchors** ``a_i``: student embeddings of ``n`` pixels drawn by a pixel sampler (NS / SG / SAG,
  :mod:`nnunet_contrastive.components.samplers`) from the *anchor-valid* pixels of class ``c``
  (:func:`arco_valid_mask`);
* **positive**: the teacher's mean embedding ``mu_c`` over all anchor-valid pixels of class ``c`` (not sampled);
* **negatives**: teacher embeddings of pixels of the *other* classes, drawn by the same sampler from their
  anchor-valid pixels in this batch, plus a per-class memory of recent keys (:class:`ClassKeyMemory`).

With cosine similarities at temperature ``tau``::

    l_i   = -log( e^{cos(a_i, mu_c)/tau} / (e^{cos(a_i, mu_c)/tau} + sum_{k in N(c)} e^{cos(a_i, k)/tau}) )
    L_c   = mean of l_i over the anchors of class c            (the aggregation H of the paper's Eq. 3.1)
    loss  = mean of L_c over the classes that have anchors, a positive and at least one negative

One (A, K) similarity matrix and one masked log-sum-exp for every class at once: ``info_nce`` with
``pos_mask[i, j] = (j is the mean of class(i))`` and ``valid_mask[i, j] = pos | (j is a key of another class)``.

What differs from the authors' code (methods.md §D.2) and why:

* Negatives are teacher embeddings of *confident pixels of the other classes* (sampled from this batch with the
  same sampler, and a memory of recent ones). The authors' memory bank for class ``i`` enqueues pixels of label
  ``i`` that are *not* in the teacher's top ranks for ``i``: on the labeled part that set is provably empty and on
  the unlabeled part (K = 4) it needs ``i`` ranked last, so the bank is in practice its initial zero vector and
  every anchor is contrasted with one constant key. The paper's intent, "pushing apart those representations from
  other classes", is what is implemented.
* The negatives of an anchor are all keys of the other classes (one shared set per class), not 512 indices
  resampled per anchor from the bank: one similarity matrix, and the sampler is the only source of randomness.
* The loss is the per-class mean over anchors averaged over classes (as the authors' ``/ valid classes``), but
  classes are indexed by class id (the authors' loop indexes per-class lists by *valid position*, an inherited
  U2PL quirk).
* The samplers are the paper's spatial ones (grid cells over the image), drawn over the whole batch
  (``pool_batch=True``: the cells of all images are the strata), not the authors' index-list stratification.

Public API: :func:`arco_valid_mask`, :func:`class_means`, :func:`arco_contrast`, :class:`ARCOOutput`,
:class:`ClassKeyMemory`, :func:`entropy_percent_at`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn

from nnunet_contrastive.losses.core import class_averaged_mean, info_nce, masked_pixel_sums

__all__ = ["arco_valid_mask", "class_means", "arco_contrast", "ARCOOutput", "ClassKeyMemory", "entropy_percent_at",
           "ARCO_TEMPERATURE"]

#: the authors' temperature (``compute_contra_memobank_loss`` default)
ARCO_TEMPERATURE = 0.5


def entropy_percent_at(progress: float, start: float = 20.0, end: float = 0.0) -> float:
    """The authors' entropy percentile ``alpha_t = 20 (1 - t)`` (linear from ``start`` to ``end`` over the stage)."""
    p = min(max(float(progress), 0.0), 1.0)
    return float(start + (end - start) * p)


def _percentile(values: Tensor, percent: float) -> Tensor:
    """NumPy's default ("linear") percentile of a 1-D tensor, without torch.quantile's 2**24 size limit."""
    v = values.flatten().sort().values
    pos = (v.numel() - 1) * min(max(percent, 0.0), 100.0) / 100.0
    lo = int(pos)
    hi = min(lo + 1, v.numel() - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


@torch.no_grad()
def arco_valid_mask(labels: Tensor, labeled: Tensor, teacher_prob: Tensor, student_prob: Tensor,
                    entropy_percent: float = 20.0, prob_threshold: float = 0.3) -> tuple[Tensor, dict]:
    """Anchor-valid pixels per class (the authors' "low-entropy, confident" selection).

    Pixel ``p`` of row ``b`` is valid for class ``c`` when

    * ``labels[b, p] == c`` - ground truth on labeled rows, the teacher's argmax (pseudo-label) on unlabeled rows;
    * ``teacher_prob[b, c, p] > prob_threshold`` (delta_p = 0.3);
    * labeled row, or the entropy of the student's prediction at ``p`` is at most the ``entropy_percent``-th
      percentile of that entropy over all pixels of the unlabeled rows (alpha_t, 20 -> 0 over training).

    Args:
        labels: long ``(B, *S)``; values outside ``[0, K)`` (ignore label, -1 of unlabeled rows) are never valid.
        labeled: bool ``(B,)``.
        teacher_prob, student_prob: ``(B, K, *S)`` softmax probabilities (detached).
    Returns:
        (bool ``(B, K, *S)``, stats: ``entropy_threshold`` and ``valid_fraction_unlabeled`` as floats/tensors).
    """
    K = teacher_prob.shape[1]
    labeled = labeled.to(labels.device).bool()
    cls = torch.arange(K, device=labels.device).view(1, K, *([1] * (labels.dim() - 1)))
    valid = (labels.unsqueeze(1) == cls) & (teacher_prob > prob_threshold)
    stats = {}
    if bool((~labeled).any()):
        p = student_prob.float()
        ent = -(p * torch.log(p + 1e-10)).sum(1)  # (B, *S)
        thr = _percentile(ent[~labeled], entropy_percent)
        row_ok = labeled.view(-1, *([1] * (ent.dim() - 1))) | (ent <= thr)
        valid &= row_ok.unsqueeze(1)
        stats["entropy_threshold"] = thr
        stats["valid_fraction_unlabeled"] = valid[~labeled].any(1).float().mean()
    return valid, stats


def class_means(features: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
    """Mean feature per class over the valid pixels of the whole batch.

    features ``(B, D, *S)``, valid bool ``(B, K, *S)`` -> (means ``(K, D)``, counts ``(K,)``); a class without
    valid pixels gets a zero mean (count 0). Float32, autocast off
    (:func:`~nnunet_contrastive.losses.core.masked_pixel_sums`: under CUDA AMP float16 sums overflowed)."""
    sums, counts = masked_pixel_sums(features.float(), valid)
    sums, counts = sums.sum(0), counts.sum(0).to(sums.dtype)
    return sums / counts.clamp(min=1).unsqueeze(1), counts


@dataclass(frozen=True)
class ARCOOutput:
    """loss: scalar (0 when no class qualifies, still differentiable); per_class: (K,) L_c (0 where unused);
    used: bool (K,) classes that entered the mean; per_anchor: (A,) l_i of the flattened anchors."""

    loss: Tensor
    per_class: Tensor
    used: Tensor
    per_anchor: Tensor


def arco_contrast(anchors: Tensor, anchor_mask: Tensor, means: Tensor, mean_ok: Tensor, keys: Tensor,
                  key_class: Tensor, temperature: float = ARCO_TEMPERATURE) -> ARCOOutput:
    """The ARCO pixel contrast over the contrastive core (see the module docstring).

    Args:
        anchors: ``(K, n, D)`` student embeddings, slot ``j`` of class ``c`` real where ``anchor_mask[c, j]``.
        anchor_mask: bool ``(K, n)``.
        means: ``(K, D)`` teacher class means (positives); ``mean_ok``: bool ``(K,)`` classes with a mean.
        keys: ``(N, D)`` teacher embeddings (negative candidates); ``key_class``: long ``(N,)`` their class
            (a key is a negative for every anchor of another class; ``-1`` marks an unused slot).
        temperature: tau.
    Returns:
        :class:`ARCOOutput`.
    """
    K, n, D = anchors.shape
    device = anchors.device
    flat = anchors.reshape(K * n, D)
    a_cls = torch.arange(K, device=device).repeat_interleave(n)
    keep = anchor_mask.reshape(-1) & mean_ok[a_cls]
    all_keys = torch.cat([means.to(flat.dtype), keys.to(flat.dtype)], 0)
    k_cls = torch.cat([torch.arange(K, device=device), key_class.to(device)])
    is_mean = torch.arange(all_keys.shape[0], device=device) < K
    pos = is_mean.unsqueeze(0) & (k_cls.unsqueeze(0) == a_cls.unsqueeze(1))
    neg = ~is_mean.unsqueeze(0) & (k_cls.unsqueeze(0) >= 0) & (k_cls.unsqueeze(0) != a_cls.unsqueeze(1))
    has_neg = neg.any(1)
    keep = keep & has_neg
    pos = pos & keep.unsqueeze(1)  # anchors left out have no positive: info_nce skips them
    out = info_nce(flat, all_keys, pos, pos | neg, temperature=temperature)
    per_anchor = out.per_anchor
    loss, per_class, used = class_averaged_mean(per_anchor, a_cls, keep.to(per_anchor.dtype), K)
    return ARCOOutput(loss=loss, per_class=per_class, used=used, per_anchor=per_anchor)


class ClassKeyMemory(nn.Module):
    """Per-class FIFO memory of recent teacher keys (detached), ``size`` slots per class.

    Buffers (checkpointed with the term, so ``--c`` resumes with the same memory): ``keys (K, size, D)``,
    ``filled (K,)``, ``ptr (K,)``. ``size = 0`` disables it. ``contents()`` returns (keys ``(N, D)``, class ``(N,)``)
    of the filled slots."""

    def __init__(self, num_classes: int, dim: int, size: int):
        super().__init__()
        self.num_classes, self.dim, self.size = int(num_classes), int(dim), int(size)
        self.register_buffer("keys", torch.zeros(self.num_classes, self.size, self.dim))
        self.register_buffer("filled", torch.zeros(self.num_classes, dtype=torch.long))
        self.register_buffer("ptr", torch.zeros(self.num_classes, dtype=torch.long))

    @torch.no_grad()
    def push(self, keys: Tensor, mask: Tensor) -> None:
        """keys ``(K, m, D)``, mask bool ``(K, m)``: enqueue the real keys of each class, oldest overwritten."""
        if self.size == 0:
            return
        for c in range(self.num_classes):
            new = keys[c][mask[c]].detach().to(self.keys.dtype)
            if new.shape[0] == 0:
                continue
            new = new[-self.size:]
            m = new.shape[0]
            slots = (self.ptr[c] + torch.arange(m, device=self.keys.device)) % self.size
            self.keys[c, slots] = new
            self.ptr[c] = (self.ptr[c] + m) % self.size
            self.filled[c] = torch.clamp(self.filled[c] + m, max=self.size)

    def contents(self) -> tuple[Tensor, Tensor]:
        if self.size == 0:
            return self.keys.new_zeros(0, self.dim), torch.zeros(0, dtype=torch.long, device=self.keys.device)
        slot_ok = torch.arange(self.size, device=self.keys.device).unsqueeze(0) < self.filled.unsqueeze(1)
        cls = torch.arange(self.num_classes, device=self.keys.device).unsqueeze(1).expand(-1, self.size)
        return self.keys[slot_ok], cls[slot_ok]

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, dim={self.dim}, size={self.size}"
