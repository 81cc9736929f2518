"""nnUNetTrainerMeanTeacher: the Mean Teacher baseline (Tarvainen & Valpola 2017) on nnU-Net, no contrastive loss."""
from nnunet_contrastive.framework.schedules import SigmoidRampup
from nnunet_contrastive.framework.stages import LoaderSpec, Stage, Use
from nnunet_contrastive.terms import MeanTeacherTerm, SupervisedTerm
from nnunet_contrastive.trainers.staged import nnUNetTrainerStaged


class nnUNetTrainerMeanTeacher(nnUNetTrainerStaged):
    """Dice+CE on labeled rows + softmax-MSE to an EMA teacher on unlabeled rows; no head, no meta-labels."""

    unlabeled_batch_ratio = 0.5
    lambda_reg = 1.0
    mt_rampup_fraction = 0.2

    @classmethod
    def declare_stages(cls) -> list:
        return [Stage("semi", None, LoaderSpec(labeled="batch", unlabeled=float(cls.unlabeled_batch_ratio), views=2,
                                               share_spatial=True),
                      terms=(Use("sup", rows="labeled"),
                             Use("mt", SigmoidRampup(cls.lambda_reg, cls.mt_rampup_fraction), rows="unlabeled")),
                      flip_student=True)]

    def build_terms(self) -> dict:
        return {"sup": SupervisedTerm(), "mt": MeanTeacherTerm()}
