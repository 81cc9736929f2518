"""nnUNetTrainerUnsupCon: SimCLR pre-training of the encoder (no meta-labels), then supervised nnU-Net training."""
from nnunet_contrastive.trainers.spcon import nnUNetTrainerSPCon


class nnUNetTrainerUnsupCon(nnUNetTrainerSPCon):
    """Stage 1 SimCLR (other view = only positive, no self-pacing); stage 2 Dice+CE on labeled cases only."""
    meta_labels, required_meta_labels, gamma_start, gamma_end = (), (), {}, {}
    lambda_sp, lambda_reg, unlabeled_batch_ratio = 0.0, 0.0, 0.0

    def _gammas(self, n):
        return [float("inf")]  # SimCLR: no self-paced weighting
