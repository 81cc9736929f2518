"""nnUNetTrainerMeanTeacher: the Mean Teacher baseline (Tarvainen & Valpola 2017) on nnU-Net, no contrastive loss."""
from nnunet_contrastive.trainers.spcon import nnUNetTrainerSPCon


class nnUNetTrainerMeanTeacher(nnUNetTrainerSPCon):
    """Dice+CE on labeled rows + softmax-MSE to an EMA teacher on unlabeled rows; no pre-training, no SP-con."""
    pretrain_epochs, lambda_sp, meta_labels, required_meta_labels = 0, 0.0, (), ()
