"""nnUNetTrainerMeanTeacher: the Mean Teacher baseline (Tarvainen & Valpola 2017) on nnU-Net, no contrastive loss.

It is nnUNetTrainerSPConSemiOnly without the meta-label contrast (same batches, ramp and teacher). Measured on ACDC
with one labeled patient (CPU tier, README Results), seeds 0-3: test +0.061, -0.007, -0.001, +0.075 over FewLabels
(+0.032 +- 0.042, interval over seeds including 0; the RV lost at seeds 1-2), validation 0.454 against SemiOnly's
0.450; over seeds 0-7 (4-7 decided before they ran) +0.014 +- 0.037, interval over seeds [-0.017, +0.044]. Three
labeled patients, seeds 0-4: +0.059, +0.028, +0.005, +0.011, -0.007 (+0.019 +- 0.026, interval over seeds
[-0.013, +0.051]), validation 0.714 against FewLabels' 0.715.

The CutMix variants keep its batches, ramp and teacher and replace the consistency on the unlabeled rows by the
consistency on CutMix-pasted pairs of them (French et al. 2020; terms.mean_teacher.CutMixConsistencyTerm). ACDC,
one labeled patient, seed 0: CutMix validation 0.585 against Mean Teacher's 0.594 (test 0.599 / 0.597); CutMixHard
collapses (validation 0.264, test 0.198). Neither is kept.
"""
from nnunet_contrastive.framework.schedules import SigmoidRampup
from nnunet_contrastive.framework.stages import Stage, Use
from nnunet_contrastive.terms import CutMixConsistencyTerm, MeanTeacherTerm, SupervisedTerm
from nnunet_contrastive.terms.mean_teacher import confident_cross_entropy
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


class nnUNetTrainerMeanTeacherCutMix(nnUNetTrainerMeanTeacher):
    """The student sees unlabeled slices with half of another pasted in; softmax-MSE to the teacher's pasted pair."""

    cutmix_area = 0.5

    def build_terms(self) -> dict:
        return {"sup": SupervisedTerm(shared_pass=False), "mt": CutMixConsistencyTerm(self.cutmix_area)}


class nnUNetTrainerMeanTeacherCutMixHard(nnUNetTrainerMeanTeacherCutMix):
    """CutMix with cross-entropy on the teacher's hard labels where it is >= 95 % confident (FixMatch's loss)."""

    min_confidence = 0.95

    def build_terms(self) -> dict:
        return {"sup": SupervisedTerm(shared_pass=False),
                "mt": CutMixConsistencyTerm(self.cutmix_area, confident_cross_entropy(self.min_confidence))}
