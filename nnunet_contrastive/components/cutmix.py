"""CutMix for segmentation (French et al., BMVC 2020, "Semi-supervised semantic segmentation needs strong, varied
perturbations"): a box of one image pasted into another, and the same box of the teacher's prediction pasted into
the other's prediction, so the student must predict the mixed image as the teacher predicts its two sources.

Pure tensor functions: ``box_masks`` draws the boxes, ``paste`` mixes any per-pixel tensor (images, logits,
probabilities) with them; ``partners`` pairs each row with the next one (the last with the first). Masks are 0/1,
so pasting logits and then taking a softmax equals pasting softmax probabilities.

Boxes (our construction): the box covers the fraction ``area`` (a number, or a ``(low, high)`` range drawn
uniformly) of the slice or volume; its side fractions ``f_i = area ** (u_i / sum(u))`` with ``u_i ~ U(0, 1)``
lie in ``[area, 1]`` and multiply to ``area``, so a box may be wide and flat or square; its corner is uniform
among the positions where it fits. Sides are rounded to whole pixels (at least one).
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

__all__ = ["area_range", "box_masks", "paste", "partners"]

AreaLike = Union[float, Sequence[float]]


def area_range(area: AreaLike) -> tuple[float, float]:
    """``(low, high)`` of a box fraction or range; a clear error for anything outside (0, 1)."""
    low, high = (float(area), float(area)) if isinstance(area, (int, float)) else tuple(float(a) for a in area)
    if not 0.0 < low <= high < 1.0:
        raise ValueError(f"area must be a fraction in (0, 1) or a range (low, high) with 0 < low <= high < 1, "
                         f"got {area!r}")
    return low, high


def box_masks(n: int, spatial_shape: Sequence[int], area: AreaLike = 0.5,
              generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """(n, 1, *spatial_shape) float32 CPU masks, 1 inside one box per row, 0 elsewhere. Draws from ``generator``
    (default: torch's global CPU generator, which a checkpoint saves, so ``--c`` draws the same boxes)."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    shape = tuple(int(s) for s in spatial_shape)
    if len(shape) not in (2, 3) or min(shape) < 1:
        raise ValueError(f"spatial_shape must be 2 or 3 positive sizes, got {tuple(spatial_shape)}")
    low, high = area_range(area)
    d = len(shape)
    areas = low + (high - low) * torch.rand(n, generator=generator, dtype=torch.float64)
    u = torch.rand(n, d, generator=generator, dtype=torch.float64).clamp(min=1e-6)
    fractions = areas[:, None] ** (u / u.sum(dim=1, keepdim=True))
    corners = torch.rand(n, d, generator=generator, dtype=torch.float64)
    masks = torch.zeros((n, 1) + shape, dtype=torch.float32)
    for i in range(n):
        box = []
        for k, size in enumerate(shape):
            side = min(size, max(1, int(round(float(fractions[i, k]) * size))))
            start = int(float(corners[i, k]) * (size - side + 1))
            box.append(slice(start, start + side))
        masks[(i, 0) + tuple(box)] = 1.0
    return masks


def partners(n: int, device=None) -> torch.Tensor:
    """(n,) int64: row i is mixed with row i + 1 (the last with the first), so every row is pasted into another
    and none into itself when n >= 2."""
    if n < 2:
        raise ValueError(f"CutMix needs at least 2 rows to pair, got {n}")
    return torch.arange(n, device=device).roll(-1)


def paste(x: torch.Tensor, masks: torch.Tensor, partner: torch.Tensor) -> torch.Tensor:
    """``masks * x[partner] + (1 - masks) * x``: row i shows row ``partner[i]`` inside its box and itself outside.
    ``x`` (n, C, *S); ``masks`` (n, 1, *S) of 0/1 on any device (moved to ``x``'s device and dtype)."""
    if x.shape[0] != masks.shape[0] or x.shape[2:] != masks.shape[2:] or masks.shape[1] != 1:
        raise ValueError(f"masks {tuple(masks.shape)} do not fit the rows {tuple(x.shape)}: need (n, 1, *S)")
    m = masks.to(device=x.device, dtype=x.dtype)
    return m * x[partner] + (1 - m) * x
