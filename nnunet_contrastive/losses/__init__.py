"""Contrastive losses. Public API: the self-paced supervised contrastive loss of Peng et al. (NeurIPS 2021).

The slow per-meta-label reference used by benchmarks lives in :mod:`nnunet_contrastive.losses.reference` and is not
re-exported here.
"""
from .supcon import (
    DEFAULT_TEMPERATURE,
    WEIGHTING_MODES,
    SelfPacedSupConLoss,
    SupConOutput,
    pair_loss_matrix,
    self_paced_weights,
    supcon_loss,
)

__all__ = [
    "DEFAULT_TEMPERATURE",
    "WEIGHTING_MODES",
    "SelfPacedSupConLoss",
    "SupConOutput",
    "pair_loss_matrix",
    "self_paced_weights",
    "supcon_loss",
]
