"""Cross-entropy of the student on the stored pseudo-labels of unlabeled rows (self-training's own supervision).

Reads ``batch["pseudo_target"]`` (the pseudo-label route of the loader: nnU-Net's prediction of the previous round,
carried through the same augmentation as the image) and, with ``min_confidence > 0``, ``batch["pseudo_confidence"]``
(the prediction's largest softmax probability): pixels below it, and pixels without a pseudo-label (-1), are left
out. Loss = cross-entropy of the student's full-resolution logits over the kept pixels of the rows, reduced by
``reduction``: ``pixel_mean`` (every kept pixel weighs the same) or ``class_balanced_mean`` (the mean over the
pseudo-label classes present among the kept pixels of each class's mean, so confident background cannot outweigh
the few confident foreground pixels). 0 with a zero gradient when none is kept, so a stage never stops on a batch
of uncertain pixels.

Chaitanya et al. 2021 (Table II) found Dice/CE on pseudo-labels worse than the pixel contrast alone in their
setting, so nnUNetTrainerPLCon does not use this term; the variant nnUNetTrainerPLConSelfTrain adds it, to be
compared on validation (self-training with confidence-filtered pseudo-labels is the supervision of the unlabeled
rows in the frameworks ARCO and MONA build on).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from nnunet_contrastive.losses.core import class_averaged_mean
from nnunet_contrastive.terms.base import LossTerm

__all__ = ["PseudoLabelCETerm", "confident_pseudo_labels", "batch_pseudo_labels", "pixel_mean", "class_balanced_mean",
           "pseudo_label_cross_entropy"]


def confident_pseudo_labels(pseudo: torch.Tensor, confidence: torch.Tensor | None, min_confidence: float):
    """(N, *S) int64 pseudo-labels with -1 where ``confidence`` < ``min_confidence`` (``confidence`` may be None
    when ``min_confidence`` is 0)."""
    pseudo = pseudo.long()
    if min_confidence <= 0:
        return pseudo
    if confidence is None:
        raise KeyError("min_confidence > 0 needs the loader's pseudo_confidence (pseudo-label route with confidence)")
    return torch.where(confidence >= min_confidence, pseudo, torch.full_like(pseudo, -1))


def batch_pseudo_labels(batch: dict, device, min_confidence: float) -> torch.Tensor:
    """(N, *S) int64 pseudo-labels of every row of a batch of the pseudo-label route (-1: none, or below
    ``min_confidence``)."""
    conf = batch.get("pseudo_confidence")
    return confident_pseudo_labels(batch["pseudo_target"].to(device)[:, 0],
                                   None if conf is None else conf.to(device)[:, 0], min_confidence)


def pixel_mean(ce: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Mean of ``ce`` (n, *S) over the pixels with ``target`` (n, *S) >= 0 (0 when there are none)."""
    kept = (target >= 0).to(ce.dtype)
    return (ce * kept).sum() / kept.sum().clamp(min=1.0)


def class_balanced_mean(ce: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Mean over the classes present in ``target`` (n, *S; -1 ignored) of the mean of ``ce`` over that class's
    pixels (0 when no pixel is kept). Written without indexing by data, so no device synchronisation."""
    kept = (target >= 0).to(ce.dtype).flatten()
    return class_averaged_mean(ce.flatten(), target.clamp(min=0).flatten(), kept, num_classes)[0]


def pseudo_label_cross_entropy(logits: torch.Tensor, target: torch.Tensor, reduction=pixel_mean) -> torch.Tensor:
    """Cross-entropy of ``logits`` (n, C, *S) on ``target`` (n, *S; -1: left out), per pixel in float32, reduced by
    ``reduction(ce, target, num_classes)``. No indexing by data, so no device sync per step."""
    ce = F.cross_entropy(logits.float(), target.clamp(min=0), reduction="none")
    return reduction(ce, target, logits.shape[1])


class PseudoLabelCETerm(LossTerm):
    """Args: min_confidence (pixels whose pseudo-label confidence is below it are ignored; 0: every pixel);
    reduction (``pixel_mean`` or ``class_balanced_mean``, or any ``f(ce, target, num_classes) -> scalar``)."""

    def __init__(self, min_confidence: float = 0.0, reduction=pixel_mean):
        super().__init__()
        self.min_confidence = float(min_confidence)
        self.reduction = reduction

    def forward(self, ctx, rows: str = "unlabeled"):
        if ctx.num_rows(rows) == 0:
            return None
        batch = ctx.batch
        if "pseudo_target" not in batch:
            raise KeyError(f"{self.name}: the batch has no pseudo_target: the stage's loader must carry pseudo-labels "
                           f"(the trainer's loader_options must return a PseudoLabelSource)")
        idx = ctx.rows(rows)
        logits = ctx.forward("student", 0, rows).logits  # (n, C, *S), full resolution
        target = batch_pseudo_labels(batch, ctx.device, self.min_confidence)
        target = target if idx is None else target[idx]
        if target.shape != logits.shape[:1] + logits.shape[2:]:
            raise ValueError(f"{self.name}: pseudo-labels {tuple(target.shape)} do not match the logits "
                             f"{tuple(logits.shape)}")
        loss = pseudo_label_cross_entropy(logits, target, self.reduction)
        return loss, {f"{self.name}_kept": (target >= 0).float().mean().detach()}
