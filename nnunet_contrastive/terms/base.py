"""The loss-term interface of the staged trainers (solo-learn's heads + mmselfsup's named losses, in one object).

A term is an ``nn.Module``: its child modules are its heads, which the trainer optimises (in the stages that list
the term's name in ``Stage.trains``, or any stage that trains "heads"), checkpoints under our checkpoint key, and,
for the names in ``ema_heads``, keeps an EMA copy of in the teacher (``ctx.teacher_head(term, name)``).

``forward(ctx, rows) -> (loss, stats) | None``: ``ctx`` is the step context (nnunet_contrastive.framework.context),
``rows`` "all" / "labeled" / "unlabeled" from the stage's ``Use``. ``loss`` is an unweighted scalar tensor (the
stage's ``Use.weight`` multiplies it); ``stats`` maps names to detached scalars (tensors are fine: they are averaged
once per epoch, no device sync per step), logged and plotted by name. ``None`` means "nothing to compute in this
batch" (e.g. no unlabeled row): the term adds nothing and logs nothing for that step. The trainer logs
``<name>_loss`` and ``<name>_weight`` itself; a term's own stats should start with its name.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

__all__ = ["LossTerm"]


class LossTerm(nn.Module):
    """Base class. ``uses_teacher``: the term reads the EMA teacher (the trainer then keeps and updates one)."""

    uses_teacher: bool = False
    ema_heads: tuple = ()

    def __init__(self):
        super().__init__()
        self.name = type(self).__name__

    def forward(self, ctx, rows: str = "all") -> Optional[tuple[torch.Tensor, dict]]:  # pragma: no cover
        raise NotImplementedError

    def on_stage_start(self, trainer, stage) -> None:
        """Called when a stage that uses this term starts or resumes."""
