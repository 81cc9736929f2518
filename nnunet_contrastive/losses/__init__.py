"""Contrastive losses: one InfoNCE core (`core`) and the losses built on it as mask/weight builders, e.g. the
self-paced supervised contrastive loss of Peng et al. (NeurIPS 2021).

The slow per-meta-label reference used by benchmarks lives in :mod:`nnunet_contrastive.losses.reference` and is not
re-exported here.
"""
from .core import InfoNCELoss, InfoNCEOutput, info_nce, label_positive_mask, two_view_masks
from .supcon import (
    DEFAULT_TEMPERATURE,
    WEIGHTING_MODES,
    SelfPacedSupConLoss,
    SelfPacedWeight,
    SupConOutput,
    pair_loss_matrix,
    self_paced_weights,
    supcon_loss,
)

__all__ = [
    "DEFAULT_TEMPERATURE",
    "WEIGHTING_MODES",
    "InfoNCELoss",
    "InfoNCEOutput",
    "SelfPacedSupConLoss",
    "SelfPacedWeight",
    "info_nce",
    "label_positive_mask",
    "two_view_masks",
    "SupConOutput",
    "pair_loss_matrix",
    "self_paced_weights",
    "supcon_loss",
]
