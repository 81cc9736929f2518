"""Loss terms of Chaitanya et al.'s global and local contrastive pre-training (NeurIPS 2020).

:class:`GlobalContrastTerm`: the student's bottleneck of both views -> global head g_1 (``GlobalProjectionHead``)
-> :func:`nnunet_contrastive.losses.global_local.global_contrastive_loss` with strategy G^R / G^D- / G^D over the
batch's slice partitions (the ``partition`` meta-label).

:class:`LocalContrastTerm`: the student's output of decoder stage ``l - 1`` (the l-th decoder block counted from the
bottleneck, read through the decoder taps) of both views -> local head g_2 and the regular region grid
(:class:`~nnunet_contrastive.components.local_head.LocalProjectionHead`) -> ``local_contrastive_loss`` with L^R / L^D.
The two views must be spatially aligned (the stage's loader shares the spatial transform): region r of view 1 and
region r of view 2 are the same pixels.

Stats per term (prefix: the term's name in the trainer): ``<name>_positives`` (mean positives per anchor, i.e. pair
terms per anchor), ``<name>_negatives`` (mean negatives in a term's denominator), ``<name>_progress`` (fraction of the
stage done); the local term also logs ``<name>_regions`` (regions per feature map). The trainer logs ``<name>_loss``.
"""
from __future__ import annotations

from typing import Optional

import torch

from nnunet_contrastive.components.heads import GlobalProjectionHead
from nnunet_contrastive.components.local_head import LocalProjectionHead
from nnunet_contrastive.data.meta_labels import PARTITION
from nnunet_contrastive.losses.global_local import (GLOBAL_STRATEGIES, LOCAL_STRATEGIES, global_contrastive_loss,
                                                    local_contrastive_loss)
from nnunet_contrastive.terms.base import LossTerm

__all__ = ["GlobalContrastTerm", "LocalContrastTerm", "partition_of"]


def partition_of(ctx, rows: str = "all") -> torch.Tensor:
    """(N,) slice-partition ids of ``rows`` from the batch's meta-labels (the trainer must use 'partition')."""
    labels = ctx.labels(rows)
    names = list(ctx.batch.get("contrastive_label_names", []))
    if labels is None or PARTITION not in names:
        raise ValueError(f"this strategy needs the '{PARTITION}' meta-label in the batch (the trainer's meta_labels "
                         f"must include it); the batch has {names}")
    return labels[:, names.index(PARTITION)]


class GlobalContrastTerm(LossTerm):
    """Global contrast on the bottleneck. Args: head (g_1), strategy ("GR", "GDminus", "GD"), temperature."""

    def __init__(self, head: GlobalProjectionHead, strategy: str = "GD", temperature: float = 0.1):
        super().__init__()
        if strategy not in GLOBAL_STRATEGIES:
            raise ValueError(f"global strategy must be one of {GLOBAL_STRATEGIES}, got {strategy!r}")
        self.head, self.strategy, self.temperature = head, strategy, float(temperature)

    def forward(self, ctx, rows: str = "all"):
        if ctx.num_rows(rows) < 2:
            return None
        f1, f2 = ctx.forward_views("student", (0, 1), rows, encoder_only=True)
        z1, z2 = self.head(f1.bottleneck), self.head(f2.bottleneck)
        part = None if self.strategy == "GR" else partition_of(ctx, rows)
        out = global_contrastive_loss(z1, z2, self.strategy, part, self.temperature)
        return out.loss, {f"{self.name}_positives": out.positives_per_anchor,
                          f"{self.name}_negatives": out.negatives_per_term, f"{self.name}_progress": ctx.progress}

    def extra_repr(self) -> str:
        return f"strategy={self.strategy}, temperature={self.temperature}"


class LocalContrastTerm(LossTerm):
    """Local contrast on the output of decoder stage ``decoder_stage`` (0 next to the bottleneck: l decoder blocks
    = stage l - 1). Args: head (g_2 + region grid), decoder_stage, strategy ("LR", "LD"), temperature."""

    def __init__(self, head: LocalProjectionHead, decoder_stage: int, strategy: str = "LR",
                 temperature: float = 0.1):
        super().__init__()
        if strategy not in LOCAL_STRATEGIES:
            raise ValueError(f"local strategy must be one of {LOCAL_STRATEGIES}, got {strategy!r}")
        if decoder_stage < 0:
            raise ValueError(f"decoder_stage must be >= 0, got {decoder_stage}")
        self.head, self.decoder_stage = head, int(decoder_stage)
        self.strategy, self.temperature = strategy, float(temperature)

    def region_features(self, f) -> torch.Tensor:
        if self.decoder_stage >= len(f.decoder):
            raise ValueError(f"decoder stage {self.decoder_stage} asked for, the network has {len(f.decoder)}")
        return self.head.regions(f.decoder[self.decoder_stage])

    def forward(self, ctx, rows: str = "all") -> Optional[tuple]:
        if ctx.num_rows(rows) < 1:
            return None
        f1, f2 = (self.region_features(f) for f in ctx.forward_views("student", (0, 1), rows))
        part = None if self.strategy == "LR" else partition_of(ctx, rows)
        out = local_contrastive_loss(f1, f2, self.strategy, part, self.temperature)
        return out.loss, {f"{self.name}_positives": out.positives_per_anchor,
                          f"{self.name}_negatives": out.negatives_per_term, f"{self.name}_regions": f1.shape[1],
                          f"{self.name}_progress": ctx.progress}

    def extra_repr(self) -> str:
        return f"decoder_stage={self.decoder_stage}, strategy={self.strategy}, temperature={self.temperature}"
