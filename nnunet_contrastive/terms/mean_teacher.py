"""Mean Teacher consistency (Tarvainen & Valpola 2017): softmax-MSE between the student on view 1 and the EMA
teacher on view 2 of the same rows (same spatial transform: the stage's loader shares it)."""
from __future__ import annotations

from nnunet_contrastive.components.teacher import mean_teacher_consistency
from nnunet_contrastive.terms.base import LossTerm

__all__ = ["MeanTeacherTerm"]


class MeanTeacherTerm(LossTerm):
    """Full-resolution outputs only (the consistency target is the prediction, not the auxiliary scales)."""

    uses_teacher = True

    def forward(self, ctx, rows: str = "unlabeled"):
        if ctx.num_rows(rows) == 0:
            return None
        student = ctx.forward("student", 0, rows).logits
        teacher = ctx.forward("teacher", 1, rows).logits
        return mean_teacher_consistency(student, teacher), {}
