"""Loss terms of the staged trainers: small objects that own their heads, read features from the step context and
return ``(loss, stats)``. A stage lists the terms it sums (nnunet_contrastive.framework.stages.Use)."""
from nnunet_contrastive.terms.base import LossTerm
from nnunet_contrastive.terms.copy_paste import BidirectionalCopyPasteTerm
from nnunet_contrastive.terms.mean_teacher import CutMixConsistencyTerm, MeanTeacherTerm
from nnunet_contrastive.terms.meta_contrast import MetaLabelContrastTerm
from nnunet_contrastive.terms.supervised import SupervisedTerm

__all__ = ["LossTerm", "SupervisedTerm", "MeanTeacherTerm", "CutMixConsistencyTerm", "BidirectionalCopyPasteTerm",
           "MetaLabelContrastTerm"]
