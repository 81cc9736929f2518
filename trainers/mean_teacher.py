"""nnUNetTrainerMeanTeacher: the Mean Teacher baseline (Tarvainen & Valpola 2017) on nnU-Net, no contrastive loss.

It is nnUNetTrainerSPConSemiOnly without the meta-label contrast (same batches, ramp and teacher). Measured on ACDC
with one labeled patient (CPU tier, README Results): seed 0 validation 0.594 against SemiOnly's 0.575 and test +0.061
over FewLabels; seed 1 test -0.007 (RV lost) where SemiOnly gains +0.050: over seeds 0-1 validation prefers SemiOnly.
"""
from nnunet_contrastive.framework.schedules import SigmoidRampup
from nnunet_contrastive.framework.stages import Stage, Use
from nnunet_contrastive.terms import MeanTeacherTerm, SupervisedTerm
from nnunet_contrastive.trainers.staged import nnUNetTrainerStaged


class nnUNetTrainerMeanTeacher(nnUNetTrainerStaged):
    """Dice+CE on labeled rows + softmax-MSE to an EMA teacher on unlabeled rows; no head, no meta-labels."""

    lambda_reg = 1.0
    mt_rampup_fraction = 0.2

    @classmethod
    def declare_stages(cls) -> list:
        return [Stage("semi", None, cls.teacher_student_loader(),
                      terms=(Use("sup", rows="labeled"),
                             Use("mt", SigmoidRampup(cls.lambda_reg, cls.mt_rampup_fraction), rows="unlabeled")),
                      flip_student=True)]

    def build_terms(self) -> dict:
        return {"sup": SupervisedTerm(), "mt": MeanTeacherTerm()}
