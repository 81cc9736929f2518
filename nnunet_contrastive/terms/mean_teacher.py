"""Mean Teacher consistency (Tarvainen & Valpola 2017): softmax-MSE between the student on view 1 and the EMA
teacher on view 2 of the same rows (same spatial transform: the stage's loader shares it).

``reduction`` None (default) is the paper's mean over every pixel and class. A function ``f(err, teacher_class,
num_classes) -> scalar`` reduces the per-pixel errors instead (components.teacher.softmax_squared_error), e.g.
terms.pseudo_label's ``class_balanced_mean``: the mean over the teacher's classes present in the rows of each
class's mean error, so a small structure (ACDC's right ventricle) weighs as much as the background it borders.
"""
from __future__ import annotations

from nnunet_contrastive.components.teacher import mean_teacher_consistency, softmax_squared_error
from nnunet_contrastive.terms.base import LossTerm

__all__ = ["MeanTeacherTerm"]


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
