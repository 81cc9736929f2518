"""Self-paced supervised contrast over meta-labels (Peng et al., NeurIPS 2021), and SimCLR as its label-free case.

The term projects the student's bottleneck of both views (``GlobalProjectionHead``: grid-pooled MLP, L2-normalised)
and applies :func:`nnunet_contrastive.losses.supcon_loss` (the contrastive core with meta-label masks and
self-paced weights) to the rows it is given. Both views are read in the frame of the unflipped input (the step
context flips the student's features back), so view 1 and view 2 of a row are compared position by position.

Self-paced pace gamma (Eq. 16, power ``gamma_power``) runs from ``gamma_start`` to ``gamma_end`` as a function of
``pace(ctx)`` in [0, 1] (it steps every iteration): by default :func:`stage_progress`, over the stage; a trainer
whose contrast spans several stages passes :func:`training_progress` (over the run after the pre-training). Both
ends are multiples of the largest possible pair loss for the actual number of rows and temperature (Proposition 2,
``pair_loss_bounds``), so they do not depend on the batch size. ``self_paced=False`` gives plain SupCon (or SimCLR
without meta-labels).

Stats (per meta-label m, as named in the batch's ``contrastive_label_names``): ``sp_loss_<m>``, ``gamma_<m>``,
``w_mean_<m>`` (mean self-paced weight over positive pairs), ``w_nonzero_<m>`` (fraction of positive pairs with a
non-zero weight). The term's own prefix is its name in the trainer ("sp").
"""
from __future__ import annotations

from typing import Callable, Mapping, Optional

from nnunet_contrastive.components.heads import GlobalProjectionHead
from nnunet_contrastive.framework.schedules import gamma_at, pair_loss_bounds
from nnunet_contrastive.losses import supcon_loss
from nnunet_contrastive.terms.base import LossTerm

__all__ = ["MetaLabelContrastTerm", "stage_progress", "training_progress"]


def stage_progress(ctx) -> float:
    """The pace's clock: fractional progress in the current stage."""
    return ctx.progress


def training_progress(ctx) -> float:
    """The pace's clock: fractional progress through the stages after the pre-training (one pace over a warm-up and
    the stages after it)."""
    return ctx.training_progress


class MetaLabelContrastTerm(LossTerm):
    """Args: head (bottleneck -> embedding), temperature, weighting ("linear" / "hard"), label_weights and
    gamma_start / gamma_end (per meta-label name; missing names get ``default_*``), gamma_power, self_paced, pace
    (ctx -> progress in [0, 1] of the pace: :func:`stage_progress` or :func:`training_progress`)."""

    def __init__(self, head: GlobalProjectionHead, temperature: float = 0.07, weighting: str = "linear",
                 label_weights: Optional[Mapping[str, float]] = None,
                 gamma_start: Optional[Mapping[str, float]] = None, gamma_end: Optional[Mapping[str, float]] = None,
                 gamma_power: float = 0.5, self_paced: bool = True, default_gamma: tuple = (0.15, 1.5),
                 pace: Callable = stage_progress):
        super().__init__()
        self.head = head
        self.temperature, self.weighting, self.gamma_power = float(temperature), weighting, gamma_power
        self.label_weights = dict(label_weights or {})
        self.gamma_start, self.gamma_end = dict(gamma_start or {}), dict(gamma_end or {})
        self.self_paced, self.default_gamma, self.pace = bool(self_paced), default_gamma, pace

    def gammas(self, names, n: int, progress: float) -> Optional[list]:
        """Pace per meta-label for n rows at pace progress in [0, 1] (None: no pacing)."""
        if not self.self_paced or not names:
            return None
        upper = pair_loss_bounds(n, self.temperature).upper
        return [upper * gamma_at(progress, gamma_start=self.gamma_start.get(m, self.default_gamma[0]),
                                 gamma_end=self.gamma_end.get(m, self.default_gamma[1]), max_epoch=1,
                                 power=self.gamma_power) for m in names]

    def forward(self, ctx, rows: str = "all"):
        n = ctx.num_rows(rows)
        if n < 2:
            return None
        f1, f2 = ctx.forward_views("student", (0, 1), rows, encoder_only=True)
        z1, z2 = self.head(f1.bottleneck), self.head(f2.bottleneck)
        labels = ctx.labels(rows)
        names = list(ctx.batch.get("contrastive_label_names", [])) if labels is not None else []
        gammas = self.gammas(names, n, self.pace(ctx))
        out = supcon_loss(z1, z2, labels, temperature=self.temperature, gamma=gammas, weighting=self.weighting,
                          label_weights=[self.label_weights.get(m, 1.0) for m in names] or None, validate=False)
        stats = {}
        for k, m in enumerate(names):  # detached tensors: averaged once per epoch, no device sync per step
            stats[f"{self.name}_loss_{m}"] = out.per_label_loss[k].detach()
            stats[f"gamma_{m}"] = gammas[k] if gammas is not None else float("inf")
            stats[f"w_mean_{m}"] = out.mean_weight[k]
            stats[f"w_nonzero_{m}"] = out.frac_nonzero_weight[k]
        return out.loss, stats
