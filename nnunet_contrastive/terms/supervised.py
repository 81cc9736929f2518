"""nnU-Net's supervised loss (Dice + CE with deep supervision, the trainer's ``self.loss``) on labeled rows."""
from __future__ import annotations

from nnunet_contrastive.terms.base import LossTerm

__all__ = ["SupervisedTerm"]


class SupervisedTerm(LossTerm):
    """``loss_fn(outputs[rows], target[rows])`` on the student's view-1 pass; ``loss_fn`` defaults to nnU-Net's loss
    (DeepSupervisionWrapper(DC_and_CE_loss)) of the trainer, so ignore labels and regions work as in nnU-Net.
    ``shared_pass`` True: that pass runs over all rows of the batch, so terms that read the student's view 1 on the
    other rows (Mean Teacher, contrasts) reuse it; False: over ``rows`` only, for stages whose other terms never
    read that pass (CutMix's student sees pasted rows instead), so no row is computed for nothing."""

    def __init__(self, loss_fn=None, shared_pass: bool = True):
        super().__init__()
        self.loss_fn = loss_fn  # None: the trainer's self.loss (built by nnU-Net after the optimizer)
        self.shared_pass = bool(shared_pass)

    def forward(self, ctx, rows: str = "labeled"):
        if ctx.num_rows(rows) == 0:
            return None
        f = ctx.forward("student", 0, "all" if self.shared_pass else rows)
        idx = ctx.rows(rows) if self.shared_pass else None
        out, target = f.outputs, ctx.target(rows)
        if isinstance(out, (list, tuple)):
            out = list(out) if idx is None else [o[idx] for o in out]
        elif idx is not None:
            out = out[idx]
        loss_fn = self.loss_fn if self.loss_fn is not None else ctx.trainer.loss
        return loss_fn(out, target), {}
