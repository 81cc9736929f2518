"""nnUNetTrainerSPCon: self-paced contrastive learning with meta-labels (Peng et al., NeurIPS 2021) in nnU-Net.

Stage 1 (epochs [0, pretrain_epochs)): the encoder of nnU-Net's network and a projection head are trained with
the self-paced supervised contrastive loss over the dataset's meta-labels, L = sum_k lambda_k L^k_SP-con (Eq. 3,
14), on two independently augmented views of every slice, with volume x partition batches drawn from all training
cases of the fold, labeled and unlabeled (images only). The decoder gets no gradient.

Stage 2 (the remaining epochs): L = L_sup + lambda_reg * L_MT + lambda_sp * L_SP-con (Eq. 15). L_sup is nnU-Net's
Dice + CE with deep supervision on the labeled rows of a mixed batch; L_MT the softmax-MSE between the student's
output on view 1 (randomly flipped, flipped back) and an EMA teacher's output on view 2 (same spatial transform,
independent intensity transforms) on the unlabeled rows, weighted with a sigmoid ramp-up; L_SP-con the same
contrastive loss on the unlabeled rows' two views.

Self-paced gamma (Eq. 16) runs from gamma_start to gamma_end within each stage; both are given as multiples of
the largest possible pair loss (Proposition 2, `pair_loss_bounds`) for the actual batch and temperature, so the
defaults hold for any batch size. The defaults (1, 0.1, 0.1 for partition, patient, phase; 0.15 -> 1.8 etc.)
correspond to the authors' multi-meta-label ACDC run (gamma 5 -> 60, 3.5 -> 50, 2 -> 50 at 30 samples and
temperature 0.07).

Declared on the staged framework (trainers/staged.py): two stages, three loss terms ("sup": nnU-Net's Dice+CE,
"mt": Mean Teacher, "sp": the self-paced meta-label contrast with its projection head). Fixed against the first
version: stage 2 compares the bottleneck of view 1 flipped BACK with view 2 (the student's random flip used to leave
the two views mirrored against each other for the 2x2-grid head); the teacher is re-synced with the pre-trained
student when stage 2 starts and its EMA decay fits the stage length; gamma and the Mean-Teacher ramp step every
iteration.

nnU-Net's network stays `self.network` (stock predictor, `-pretrained_weights`); the projection head and the
teacher live beside it and are saved under the checkpoint key `nnunet_contrastive`. `checkpoint_teacher.pth`
(nnU-Net format, teacher weights) is written at the end: `nnUNetv2_predict ... -chk checkpoint_teacher.pth`.
"""
from __future__ import annotations

from nnunet_contrastive.components.heads import GlobalProjectionHead
from nnunet_contrastive.framework.schedules import SigmoidRampup
from nnunet_contrastive.framework.stages import LoaderSpec, Stage, Use
from nnunet_contrastive.terms import MeanTeacherTerm, MetaLabelContrastTerm, SupervisedTerm
from nnunet_contrastive.terms.meta_contrast import stage_progress
from nnunet_contrastive.terms.pseudo_label import class_balanced_mean
from nnunet_contrastive.trainers.staged import PARTITION, MetaLabelError, nnUNetTrainerStaged

__all__ = ["nnUNetTrainerSPCon", "nnUNetTrainerSPConPretrain", "nnUNetTrainerSPConSemiOnly",
           "nnUNetTrainerSPConSemiOnlyMoreUnlabeled", "nnUNetTrainerSPConSemiOnlyClassBalanced",
           "nnUNetTrainerSPConHard", "nnUNetTrainerSPConWarmup", "nnUNetTrainerSPConPaperBatch",
           "nnUNetTrainerSPConPosition", "nnUNetTrainerSPConPatient", "nnUNetTrainerSPConPhase", "MetaLabelError",
           "PARTITION"]


class nnUNetTrainerSPCon(nnUNetTrainerStaged):
    """Self-paced meta-label contrastive pre-training, then Dice+CE + Mean Teacher + SP-con (Peng et al. 2021)."""

    # stages, in nnU-Net epochs (env nnUNet_contrastive_pretrain_epochs overrides pretrain_epochs)
    pretrain_epochs = 100
    pretrain_volumes = None  # m volumes x K partitions per stage-1 batch; None: max(2, batch_size // K)
    # meta-labels: used when the dataset has them; a `required` one that is missing stops the run at start
    meta_labels = (PARTITION, "patient", "phase")
    required_meta_labels = (PARTITION,)
    meta_label_weights = {PARTITION: 1.0, "patient": 0.1, "phase": 0.1}
    num_partitions = 3
    # loss (Eq. 2, 7, 16); gamma as multiples of the largest pair loss (Proposition 2)
    temperature = 0.07
    weighting = "linear"
    self_paced = True
    gamma_start = {PARTITION: 0.15, "patient": 0.11, "phase": 0.06}
    gamma_end = {PARTITION: 1.8, "patient": 1.5, "phase": 1.5}
    gamma_power = 0.5
    pace = staticmethod(stage_progress)  # gamma's clock (terms.meta_contrast): progress in the stage
    head_dim = 256
    head_grid = 2
    # stage 2 (Eq. 15): the plans' batch_size labeled rows (what stock nnU-Net trains on) PLUS
    # round(unlabeled_batch_ratio * batch_size) unlabeled rows (the authors: 5 labeled + 5 unlabeled per step)
    unlabeled_batch_ratio = 0.5
    lambda_sp = 0.1
    lambda_reg = 1.0
    mt_rampup_fraction = 0.2  # of stage 2
    mt_reduction = None  # L_MT over pixels: None the plain mean; or f(err, teacher_class, C) (terms.mean_teacher)
    semi_warmup = 0.0  # fraction of stage 2 over which the LR ramps up linearly from ~0 (protects the encoder)
    ema_decay = 0.999

    @classmethod
    def pretrain_stage(cls) -> Stage:
        """Encoder + head on the contrastive loss, volume x partition batches of every image, two views."""
        return Stage("pretrain", cls.pretrain_epochs,
                     LoaderSpec(sampling="partition", labeled=0, unlabeled="partition", images_of_labeled=True,
                                views=2, volumes=cls.pretrain_volumes),
                     trains=("encoder", "sp"), terms=(Use("sp"),), pretraining=True)

    @classmethod
    def semi_terms(cls, consistency_weight) -> tuple:
        """Stage 2's terms (Eq. 15); ``consistency_weight`` (a number or a ramp) weighs the teacher-student term of
        ``consistency_use`` (Mean Teacher here)."""
        return (Use("sup", rows="labeled"), cls.consistency_use(consistency_weight),
                Use("sp", cls.lambda_sp, rows="unlabeled"))

    @classmethod
    def consistency_use(cls, weight) -> Use:
        """Stage 2's teacher-student term with its weight (L_MT on the unlabeled rows); see ``consistency_term``."""
        return Use("mt", weight, rows="unlabeled")

    def consistency_term(self) -> dict:
        """The term ``consistency_use`` names, built: Mean Teacher's softmax-MSE."""
        return {"mt": MeanTeacherTerm(self.mt_reduction)}

    @classmethod
    def semi_stage(cls) -> Stage:
        """Dice+CE on labeled rows + Mean Teacher and SP-con on unlabeled rows (Eq. 15)."""
        return Stage("semi", None, cls.teacher_student_loader(), trains=("network", "sp"),
                     terms=cls.semi_terms(SigmoidRampup(cls.lambda_reg, cls.mt_rampup_fraction)),
                     resync_teacher=True, flip_student=True, warmup=cls.semi_warmup)

    @classmethod
    def declare_stages(cls) -> list:
        return [cls.pretrain_stage(), cls.semi_stage()]

    def build_terms(self) -> dict:
        head = GlobalProjectionHead.for_network(self.network, out_dim=self.head_dim, grid_size=self.head_grid)
        return {"sup": SupervisedTerm(), **self.consistency_term(),
                "sp": MetaLabelContrastTerm(head, temperature=self.temperature, weighting=self.weighting,
                                            label_weights=self.meta_label_weights, gamma_start=self.gamma_start,
                                            gamma_end=self.gamma_end, gamma_power=self.gamma_power,
                                            self_paced=self.self_paced, pace=self.pace)}

    def on_train_start(self):
        super().on_train_start()
        self.print_to_log_file(
            f"SPCon: meta-labels {self.active_meta_labels} weights "
            f"{[self.meta_label_weights.get(m, 1.0) for m in self.active_meta_labels]}; {self.weighting} weights, "
            f"temperature {self.temperature}")

    @classmethod
    def stage1_batch_rows(cls, batch_size: int, n_volumes: int | None = None) -> int:
        """Rows of a stage-1 batch (volume x partition), see ``partition_batch_rows``."""
        return cls.partition_batch_rows(batch_size, n_volumes, cls.pretrain_volumes)


# ---------------------------------------------------------------------------------------------------- variants
class nnUNetTrainerSPConPretrain(nnUNetTrainerSPCon):
    """Stage 1 only: its checkpoint initialises any trainer (stock nnUNetTrainer too) via -pretrained_weights."""

    @classmethod
    def declare_stages(cls) -> list:
        return [cls.pretrain_stage()]


class nnUNetTrainerSPConSemiOnly(nnUNetTrainerSPCon):
    """Stage 2 only, from scratch (or from -pretrained_weights of nnUNetTrainerSPConPretrain)."""
    pretrain_epochs = 0


class nnUNetTrainerSPConSemiOnlyMoreUnlabeled(nnUNetTrainerSPConSemiOnly):
    """Stage 2 only, with as many unlabeled rows per step as labeled ones (the authors' 5 + 5), not half as many."""
    unlabeled_batch_ratio = 1.0


class nnUNetTrainerSPConSemiOnlyClassBalanced(nnUNetTrainerSPConSemiOnly):
    """Stage 2 alone, Mean-Teacher error averaged per teacher class; ACDC N = 1 seed 0: collapses (README Results)."""
    mt_reduction = staticmethod(class_balanced_mean)


class nnUNetTrainerSPConHard(nnUNetTrainerSPCon):
    """Hard self-paced weights 1[l <= gamma] (Eq. 7) instead of linear ones."""
    weighting = "hard"


class nnUNetTrainerSPConWarmup(nnUNetTrainerSPCon):
    """Stage 2's LR ramps up over its first 10 %, so the pre-trained encoder is not thrown off at the switch."""
    semi_warmup = 0.1


class nnUNetTrainerSPConPaperBatch(nnUNetTrainerSPCon):
    """Stage-1 batches of the paper: 10 volumes x 3 partitions (x 2 views), whatever the plans' batch size."""
    pretrain_volumes = 10


class nnUNetTrainerSPConPosition(nnUNetTrainerSPCon):
    """Slice position (partition) as the only meta-label."""
    meta_labels = (PARTITION,)


class nnUNetTrainerSPConPatient(nnUNetTrainerSPCon):
    """Patient id as the only meta-label."""
    meta_labels, required_meta_labels = ("patient",), ("patient",)


class nnUNetTrainerSPConPhase(nnUNetTrainerSPCon):
    """Cardiac phase as the only meta-label; stops at start on datasets without a 'phase' column."""
    meta_labels, required_meta_labels = ("phase",), ("phase",)
