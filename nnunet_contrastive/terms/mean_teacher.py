"""Mean Teacher consistency (Tarvainen & Valpola 2017): softmax-MSE between the student on view 1 and the EMA
teacher on view 2 of the same rows (same spatial transform: the stage's loader shares it).

``reduction`` None (default) is the paper's mean over every pixel and class. A function ``f(err, teacher_class,
num_classes) -> scalar`` reduces the per-pixel errors instead (components.teacher.softmax_squared_error), e.g.
terms.pseudo_label's ``class_balanced_mean``: the mean over the teacher's classes present in the rows of each
class's mean error, so a small structure (ACDC's right ventricle) weighs as much as the background it borders.

``CutMixConsistencyTerm`` is the same teacher with a strong perturbation (French et al. 2020): the student sees
each unlabeled row with a box of another unlabeled row pasted in, and must predict what the teacher predicts on
the two unmixed rows, pasted with the same box (components.cutmix). Its ``loss`` compares the student's logits with
those pasted teacher logits: softmax-MSE by default, or ``confident_cross_entropy`` (the teacher's hard labels,
FixMatch's loss).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from nnunet_contrastive.components.cutmix import area_range, box_masks, partners, paste
from nnunet_contrastive.components.teacher import mean_teacher_consistency, softmax_squared_error
from nnunet_contrastive.terms.base import LossTerm
from nnunet_contrastive.terms.pseudo_label import confident_pseudo_labels, pseudo_label_cross_entropy

__all__ = ["MeanTeacherTerm", "CutMixConsistencyTerm", "confident_cross_entropy"]


class MeanTeacherTerm(LossTerm):
    """Full-resolution outputs only (the consistency target is the prediction, not the auxiliary scales).
    Args: reduction (None: mean over pixels and classes; or ``f(err, teacher_class, num_classes) -> scalar``)."""

    uses_teacher = True

    def __init__(self, reduction=None):
        super().__init__()
        self.reduction = reduction

    def forward(self, ctx, rows: str = "unlabeled"):
        if ctx.num_rows(rows) == 0:
            return None
        student = ctx.forward("student", 0, rows).logits
        teacher = ctx.forward("teacher", 1, rows).logits
        if self.reduction is None:
            return mean_teacher_consistency(student, teacher), {}
        err, teacher_class = softmax_squared_error(student, teacher)
        return self.reduction(err, teacher_class, student.shape[1]), {}


def confident_cross_entropy(min_confidence: float = 0.95):
    """A CutMix ``loss``: cross-entropy of the student's logits (n, C, *S) on the teacher's argmax, over the pixels
    where the teacher's largest softmax probability is >= ``min_confidence`` (0 with a zero gradient when none)."""
    if not 0.0 <= float(min_confidence) < 1.0:
        raise ValueError(f"min_confidence must be in [0, 1), got {min_confidence}")

    def loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        conf, hard = F.softmax(teacher.detach().float(), dim=1).max(dim=1)
        return pseudo_label_cross_entropy(student, confident_pseudo_labels(hard, conf, float(min_confidence)))

    return loss


class CutMixConsistencyTerm(LossTerm):
    """Mean Teacher on CutMix-pasted rows (module docstring). Needs >= 2 rows (None otherwise).
    Args: area (box fraction of the slice, or a (low, high) range); loss (``f(student_logits, teacher_logits) ->
    scalar``, both (n, C, *S) full resolution; None: softmax-MSE, the Mean Teacher's)."""

    uses_teacher = True

    def __init__(self, area=0.5, loss=None):
        super().__init__()
        area_range(area)  # checks ``area`` now, not at the first step
        self.area = area
        self.loss = mean_teacher_consistency if loss is None else loss

    def forward(self, ctx, rows: str = "unlabeled"):
        n = ctx.num_rows(rows)
        if n < 2:
            return None
        idx = ctx.rows(rows)
        teacher = ctx.forward("teacher", 1, rows).logits
        x = ctx.input(0)
        x = x if idx is None else x[idx]
        masks = box_masks(n, x.shape[2:], self.area)
        partner = partners(n, x.device)
        student = ctx.forward_input("student", paste(x, masks, partner)).logits
        target = paste(teacher.detach(), masks, partner)
        return self.loss(student, target), {}
