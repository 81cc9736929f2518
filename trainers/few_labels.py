"""nnUNetTrainerFewLabels: the lower bound every method is compared with."""
from nnunet_contrastive.trainers.base import nnUNetTrainerContrastiveBase


class nnUNetTrainerFewLabels(nnUNetTrainerContrastiveBase):
    """Stock nnU-Net training on the labeled cases of the fold only (all cases when no subset is selected)."""
