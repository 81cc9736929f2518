"""nnU-Net trainers of nnunet-contrastive (installed as `nnunet_contrastive.trainers`).

nnU-Net finds them by name through `nnUNet_extTrainer` (see nnunet_contrastive._discovery). Every public trainer
class is exported here; `__all__` is what the trainer index re-exports.
"""
from nnunet_contrastive.trainers.base import nnUNetTrainerContrastiveBase
from nnunet_contrastive.trainers.few_labels import nnUNetTrainerFewLabels

__all__ = ["nnUNetTrainerContrastiveBase", "nnUNetTrainerFewLabels"]
