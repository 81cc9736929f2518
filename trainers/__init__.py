"""nnU-Net trainers of nnunet-contrastive (installed as `nnunet_contrastive.trainers`).

nnU-Net finds them by name through `nnUNet_extTrainer` (see nnunet_contrastive._discovery). Every public trainer
class is exported here; `__all__` is what the trainer index re-exports.
"""
from nnunet_contrastive.trainers.arco import nnUNetTrainerARCO, nnUNetTrainerARCONS, nnUNetTrainerARCOSAG
from nnunet_contrastive.trainers.base import nnUNetTrainerContrastiveBase
from nnunet_contrastive.trainers.copy_paste import nnUNetTrainerBCP
from nnunet_contrastive.trainers.composed import (nnUNetTrainerComposed, nnUNetTrainerComposedOneLR,
                                                  nnUNetTrainerSPConBCP)
from nnunet_contrastive.trainers.few_labels import nnUNetTrainerFewLabels
from nnunet_contrastive.trainers.global_local import (nnUNetTrainerGlobalLocal, nnUNetTrainerGlobalLocalGDminus,
                                                      nnUNetTrainerGlobalLocalGlobalOnly, nnUNetTrainerGlobalLocalGR,
                                                      nnUNetTrainerGlobalLocalLD, nnUNetTrainerGlobalLocalPretrain)
from nnunet_contrastive.trainers.mean_teacher import (nnUNetTrainerMeanTeacher, nnUNetTrainerMeanTeacherCutMix,
                                                      nnUNetTrainerMeanTeacherCutMixHard)
from nnunet_contrastive.trainers.plcon import (nnUNetTrainerPLCon, nnUNetTrainerPLConConfident,
                                               nnUNetTrainerPLConIntra, nnUNetTrainerPLConLongWarmup,
                                               nnUNetTrainerPLConLongWarmupConfident,
                                               nnUNetTrainerPLConLongWarmupOneLR, nnUNetTrainerPLConLongWarmupTeacher,
                                               nnUNetTrainerPLConLongWarmupMirrored, nnUNetTrainerPLConSelfTrain,
                                               nnUNetTrainerPLConSelfTrainBalanced,
                                               nnUNetTrainerPLConSelfTrainLongWarmup,
                                               nnUNetTrainerPLConSelfTrainLongWarmupLowCE,
                                               nnUNetTrainerPLConSelfTrainLongWarmupOneLR, nnUNetTrainerPLConSG)
from nnunet_contrastive.trainers.spcon import (nnUNetTrainerSPCon, nnUNetTrainerSPConHard,
                                               nnUNetTrainerSPConPatient, nnUNetTrainerSPConPhase,
                                               nnUNetTrainerSPConPaperBatch, nnUNetTrainerSPConPosition,
                                               nnUNetTrainerSPConPretrain, nnUNetTrainerSPConSemiOnly,
                                               nnUNetTrainerSPConSemiOnlyClassBalanced,
                                               nnUNetTrainerSPConSemiOnlyMoreUnlabeled, nnUNetTrainerSPConWarmup)
from nnunet_contrastive.trainers.staged import nnUNetTrainerStaged
from nnunet_contrastive.trainers.unsup_con import nnUNetTrainerUnsupCon

__all__ = [
    "nnUNetTrainerContrastiveBase",
    "nnUNetTrainerStaged",
    "nnUNetTrainerFewLabels",
    "nnUNetTrainerSPCon",
    "nnUNetTrainerSPConPretrain",
    "nnUNetTrainerSPConSemiOnly",
    "nnUNetTrainerSPConSemiOnlyMoreUnlabeled",
    "nnUNetTrainerSPConSemiOnlyClassBalanced",
    "nnUNetTrainerSPConHard",
    "nnUNetTrainerSPConWarmup",
    "nnUNetTrainerSPConPaperBatch",
    "nnUNetTrainerSPConPosition",
    "nnUNetTrainerSPConPatient",
    "nnUNetTrainerSPConPhase",
    "nnUNetTrainerMeanTeacher",
    "nnUNetTrainerMeanTeacherCutMix",
    "nnUNetTrainerMeanTeacherCutMixHard",
    "nnUNetTrainerBCP",
    "nnUNetTrainerUnsupCon",
    "nnUNetTrainerARCO",
    "nnUNetTrainerARCOSAG",
    "nnUNetTrainerARCONS",
    "nnUNetTrainerGlobalLocal",
    "nnUNetTrainerGlobalLocalPretrain",
    "nnUNetTrainerGlobalLocalGR",
    "nnUNetTrainerGlobalLocalGDminus",
    "nnUNetTrainerGlobalLocalLD",
    "nnUNetTrainerGlobalLocalGlobalOnly",
    "nnUNetTrainerPLCon",
    "nnUNetTrainerPLConIntra",
    "nnUNetTrainerPLConConfident",
    "nnUNetTrainerPLConSG",
    "nnUNetTrainerPLConLongWarmup",
    "nnUNetTrainerPLConLongWarmupConfident",
    "nnUNetTrainerPLConLongWarmupOneLR",
    "nnUNetTrainerPLConLongWarmupTeacher",
    "nnUNetTrainerPLConLongWarmupMirrored",
    "nnUNetTrainerPLConSelfTrain",
    "nnUNetTrainerPLConSelfTrainBalanced",
    "nnUNetTrainerPLConSelfTrainLongWarmup",
    "nnUNetTrainerPLConSelfTrainLongWarmupLowCE",
    "nnUNetTrainerPLConSelfTrainLongWarmupOneLR",
    "nnUNetTrainerComposed",
    "nnUNetTrainerComposedOneLR",
    "nnUNetTrainerSPConBCP",
]
