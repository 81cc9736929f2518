"""nnUNetTrainerComposed: the meta-label and pseudo-label methods in one run (Peng et al. 2021 + Chaitanya et al.
2021, on the staged framework, trainers/staged.py).

* ``warmup`` (the first ``warmup_fraction`` = 1/2 of the run): SPCon's stage 2 from scratch, i.e.
  nnUNetTrainerSPConSemiOnly: nnU-Net's Dice+CE on the plans' batch of labeled rows, Mean Teacher (softmax-MSE to
  an EMA teacher, sigmoid ramp-up over the first ``mt_rampup_fraction`` of the RUN) and the self-paced meta-label
  contrast (patient, phase, slice position; projection head on the bottleneck) on the unlabeled rows, two views
  sharing the spatial transform, the student's view randomly flipped.
* ``round1`` ... ``round3`` (the other half, split evenly): the same terms (Mean Teacher at full weight) plus
  PLCon's pixel contrast (``lambda_cont`` x pixel-to-class-mean contrast on the last decoder stage, ground truth on
  labeled rows, pseudo-labels on unlabeled ones), pseudo-labels re-estimated by nnU-Net's predictor with the
  student network at each round's start (trainers/plcon.py, ``PseudoLabelRounds``); round 1 restarts the poly LR,
  as nnUNetTrainerPLConLongWarmup does. The segmentation loss never sees a pseudo-label.

Why this composition: on ACDC with one labeled patient, the two parts were each above FewLabels at three of four
seeds but lost at different seeds (SPConSemiOnly at seed 2, PLConLongWarmup at seed 3; README, Results), and the
half-run warm-up is what kept PLCon's first pseudo-labels useful there. The self-paced gamma runs over the whole
run (``pace = training_progress``), not restarted at every round; the EMA teacher's decay fits each stage's
length. No label-free pre-training (SPCon's stage 1 did not pay back at this budget).

Measured (ACDC CPU tier, one labeled patient; README, Results): at seed 0 validation 0.540 against FewLabels' 0.561
(test 0.502 against 0.536); the variant ``nnUNetTrainerComposedOneLR`` (no round-1 LR restart) scored 0.579 there,
but over seeds 0-3 its test gain is -0.017 +- 0.032 and its validation mean 0.435 is below SPConSemiOnly's 0.450 and
PLConLongWarmup's 0.442: rejected on validation.

``nnUNetTrainerSPConBCP``: SPCon (trainers/spcon.py: meta-label pre-training, then Dice+CE + the self-paced
contrast) whose stage-2 teacher-student term is bidirectional copy-paste (trainers/copy_paste.py) instead of Mean
Teacher, by the mixin ``CopyPasteConsistency`` that overrides SPCon's ``consistency_use`` / ``consistency_term``.
Declared because BCP is the one stage-2 regulariser that moved ACDC N = 1 far above FewLabels (seed 0); not
measured yet.

``self.network`` stays nnU-Net's network (stock predictor); the projection head, the pixel head and the teacher
live under our checkpoint key; ``checkpoint_teacher.pth`` is written at the end; ``checkpoint_warmup_end.pth`` keeps
the end of the warm-up so variants that only change the rounds share it (benchmark ``--share-warmup``).
"""
from __future__ import annotations

from dataclasses import replace

from nnunet_contrastive.framework.schedules import SigmoidRampup
from nnunet_contrastive.terms.meta_contrast import training_progress
from nnunet_contrastive.trainers.copy_paste import CopyPasteConsistency
from nnunet_contrastive.trainers.plcon import PseudoLabelRounds
from nnunet_contrastive.trainers.spcon import nnUNetTrainerSPCon

__all__ = ["nnUNetTrainerComposed", "nnUNetTrainerComposedOneLR", "nnUNetTrainerSPConBCP"]


class nnUNetTrainerComposed(PseudoLabelRounds, nnUNetTrainerSPCon):
    """Mean Teacher + meta-label contrast from the start, + pixel contrast on pseudo-labels after half the run."""

    pretrain_epochs = 0
    warmup_fraction = 0.5
    pixel_temperature = 0.1  # the pixel contrast's tau (the meta-label contrast keeps SPCon's ``temperature``)
    pace = staticmethod(training_progress)
    stage_checkpoints = ("warmup",)
    warmup_attributes = ("embedding_dim", "head_dim", "head_grid", "temperature", "weighting", "self_paced",
                         "meta_labels", "required_meta_labels", "meta_label_weights", "gamma_start", "gamma_end",
                         "gamma_power", "pace", "ema_decay", "ema_window_fraction")

    @classmethod
    def declare_stages(cls) -> list:
        warm, lengths = cls.round_lengths()
        ramp = SigmoidRampup(cls.lambda_reg, min(1.0, cls.mt_rampup_fraction / cls.warmup_fraction))
        warmup = replace(cls.semi_stage(), name="warmup", epochs=warm, terms=cls.semi_terms(ramp))
        plcon, plce = cls.pixel_uses()
        # the pixel contrast first: its pass over all rows serves the other terms' labeled / unlabeled rows
        return [warmup] + cls.round_stages(lengths, cls.teacher_student_loader(), trains=("network", "sp"),
                                           terms=plcon + cls.semi_terms(cls.lambda_reg) + plce, flip_student=True)

    def build_terms(self) -> dict:
        return {**super().build_terms(), **self.pixel_terms(self.pixel_temperature)}


# ---------------------------------------------------------------------------------------------------- variants
class nnUNetTrainerComposedOneLR(nnUNetTrainerComposed):
    """The rounds continue the warm-up's poly-LR decay (no restart at round 1): SPConSemiOnly's schedule + pixel
    contrast."""
    rounds_restart_lr = False


class nnUNetTrainerSPConBCP(CopyPasteConsistency, nnUNetTrainerSPCon):
    """SPCon (meta-label pre-training, then Dice+CE + self-paced contrast) with BCP's copy-paste in place of Mean
    Teacher."""
