"""Pixel-to-class-mean contrast of Chaitanya et al. 2021 (Eq. 3-4), as a mask builder over the contrastive core.

For an image x with label map y (ground truth, or a pseudo-label), foreground classes c = 1..C (background is
never used), ``S_c(x)`` the pixels of class c and ``z(x)`` the pixel embeddings (B, D, H, W)::

    zbar_c(x) = 1/|S_c(x)| sum_{i in S_c(x)} z(x)_i                     class mean (raw embeddings, then cosine)
    l_i       = -log( e^{cos(z_i, zbar_c)/tau} / sum_{k in keys} e^{cos(z_i, zbar_k)/tau} )    Eq. 4 as -log softmax

* **intra** (``partners=None``): the keys of an anchor of image x are the class means of x (positive: its own
  class; the positive stays in the denominator, as in Eq. 4 and the authors' "negative list").
* **inter** (``partners[b] = b'``): the keys are the class means of x AND of x' (the second image of the pair);
  both class-c means are positives and ``l_i`` is the mean of the two ``-log p`` terms (the core divides by the
  number of positives). This is the paper's "means computed from within the same image as well as from different
  images" (the authors' ``local_loss_exp_no = 1`` adds both terms over one denominator of 2C means).

Anchors: ``n_per_class`` pixels per (image, foreground class), chosen by a pixel sampler
(:mod:`nnunet_contrastive.components.samplers`; uniform :class:`NSSampler` by default, without replacement, so a
class with fewer pixels gives all of them once; ARCO's SG/SAG samplers plug in).

Aggregation (Eq. 3, normalised ONCE)::

    L(x)  = 1/|C(x)| sum_{c in C(x)} 1/|A_c(x)| sum_{i in A_c(x)} l_i        C(x): classes of x with anchors
    L     = mean of L(x) over the images with at least one anchor

The authors divide by D = 2PC inside the loop over images (image b ends up divided by D^(B-b)); that is a bug and
not reproduced. Classes are averaged over those present in the image (Eq. 3's 1/C with the absent classes left out,
instead of counted as zeros), and images without any anchored class do not count (nnU-Net's patches often hold
no foreground; counting them would make the loss scale depend on that fraction). An anchor whose key set holds no
other class (intra: its class is the only one in the image) has ``l_i = log 1 = 0`` and no gradient: it is dropped
(not counted). Absent classes have no mean (never a NaN: they are left out of every denominator); with no anchor
at all the loss is an exact 0 that still belongs to the graph.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor

from nnunet_contrastive.components.samplers import NSSampler, PixelSample, PixelSampler, class_masks
from nnunet_contrastive.losses.core import info_nce, masked_pixel_sums

__all__ = ["PixelContrastOutput", "class_means", "pixel_contrast_masks", "pixel_contrast_loss", "random_partners"]


@dataclass(frozen=True)
class PixelContrastOutput:
    """loss: scalar with gradient. per_anchor: (A',) ``l_i`` of the kept anchors. anchor_image / anchor_class:
    (A',) their image and class index (into ``classes``). anchors_per_class: (K,) kept anchors per class.
    num_images: images that contributed. sample: the pixel sample used."""

    loss: Tensor
    per_anchor: Tensor
    anchor_image: Tensor
    anchor_class: Tensor
    anchors_per_class: Tensor
    num_images: int
    sample: PixelSample


def class_means(embeddings: Tensor, masks: Tensor) -> tuple[Tensor, Tensor]:
    """(B, D, *S) embeddings and (B, K, *S) bool masks -> ((B, K, D) class means, (B, K) pixel counts).
    An empty class has a zero mean (it is never used as a key). Float32 (float64 stays), autocast off
    (:func:`~nnunet_contrastive.losses.core.masked_pixel_sums`)."""
    sums, counts = masked_pixel_sums(embeddings, masks)
    return sums / counts.clamp(min=1).unsqueeze(-1).to(sums.dtype), counts


def random_partners(n: int, generator: Optional[torch.Generator] = None, device=None) -> Tensor:
    """A random cyclic pairing of n images (every image is the second image x' of exactly one pair; x' != x for
    n > 1): the images in a random order, each paired with the next one."""
    order = torch.randperm(n, generator=generator)
    partners = torch.empty(n, dtype=torch.long)
    partners[order] = order.roll(-1)
    return partners.to(device)


def pixel_contrast_masks(anchor_image: Tensor, anchor_class: Tensor, present: Tensor,
                         partners: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """Positive and valid masks (A, B*K) of anchors (image, class) against the class means of all images.

    Keys are the B*K class means in image-major order (key j = image j // K, class j % K). Valid: present means of
    the anchor's image (and of its partner, inter). Positive: the valid ones of the anchor's class."""
    b, k = present.shape
    key_img = torch.arange(b, device=present.device).repeat_interleave(k)
    key_cls = torch.arange(k, device=present.device).repeat(b)
    same = key_img.unsqueeze(0) == anchor_image.unsqueeze(1)
    if partners is not None:
        same = same | (key_img.unsqueeze(0) == partners[anchor_image].unsqueeze(1))
    valid = same & present.reshape(-1).unsqueeze(0)
    pos = valid & (key_cls.unsqueeze(0) == anchor_class.unsqueeze(1))
    return pos, valid


def pixel_contrast_loss(embeddings: Tensor, labels: Tensor, classes: Sequence[int], *,
                        sample: Optional[PixelSample] = None, sampler: Optional[PixelSampler] = None,
                        n_per_class: int = 3, partners: Optional[Tensor] = None, temperature: float = 0.1,
                        generator: Optional[torch.Generator] = None) -> PixelContrastOutput:
    """Pixel-to-class-mean contrast (module docstring).

    Args:
        embeddings: (B, D, *S) pixel embeddings (not normalised; the core normalises anchors and means once).
        labels: (B, *S) integer label maps; values not in ``classes`` (background, -1, ignore, low confidence)
            are neither anchors nor part of any class mean.
        classes: the foreground label values (K of them).
        sample: anchors already drawn on ``class_masks(labels, classes)``; else ``sampler`` (default NSSampler)
            draws ``n_per_class`` per (image, class) with ``generator``.
        partners: None for the intra-image loss, else (B,) long: the second image x' of each image (inter).
        temperature: tau.
    """
    if embeddings.shape[0] != labels.shape[0] or embeddings.shape[2:] != labels.shape[1:]:
        raise ValueError(f"embeddings (B, D, *S) {tuple(embeddings.shape)} and labels (B, *S) {tuple(labels.shape)} "
                         f"do not match")
    b = embeddings.shape[0]
    if partners is not None:
        partners = torch.as_tensor(partners, dtype=torch.long, device=embeddings.device)
        if partners.shape != (b,) or bool(((partners < 0) | (partners >= b)).any()):
            raise ValueError(f"partners must be (B,) = ({b},) image indices, got {partners.tolist()}")
    masks = class_masks(labels, classes)
    k = masks.shape[1]
    means, counts = class_means(embeddings, masks)
    present = counts > 0
    if sample is None:
        sample = (sampler or NSSampler()).sample(masks, n_per_class, generator=generator)
    anchors = sample.gather(embeddings)  # (B, K, n, D)
    n = anchors.shape[2]
    slot_ok = sample.mask  # (B, K, n)
    anchor_image = torch.arange(b, device=embeddings.device).view(b, 1, 1).expand(b, k, n)
    anchor_class = torch.arange(k, device=embeddings.device).view(1, k, 1).expand(b, k, n)
    ai, ac = anchor_image[slot_ok], anchor_class[slot_ok]
    pos, valid = pixel_contrast_masks(ai, ac, present, partners)
    keep = (valid & ~pos).any(-1)  # at least one other class among the keys
    ai, ac, pos, valid = ai[keep], ac[keep], pos[keep], valid[keep]
    anchors_per_class = torch.bincount(ac, minlength=k)
    if ai.numel() == 0:
        zero = embeddings.sum() * 0.0
        return PixelContrastOutput(zero, zero.reshape(1)[:0], ai, ac, anchors_per_class, 0, sample)
    a = anchors[slot_ok][keep]
    out = info_nce(a, means.reshape(b * k, -1), pos, valid, temperature=temperature)
    # one normalisation: mean over the anchors of (image, class), over the classes of an image, over images
    group = ai * k + ac
    per_group = torch.bincount(group, minlength=b * k).to(out.per_anchor.dtype)
    classes_per_image = (per_group.reshape(b, k) > 0).sum(1).to(out.per_anchor.dtype)
    num_images = int((classes_per_image > 0).sum())
    w = 1.0 / (per_group[group] * classes_per_image[ai] * num_images)
    loss = (out.per_anchor * w).sum()
    return PixelContrastOutput(loss, out.per_anchor, ai, ac, anchors_per_class, num_images, sample)
