"""nnUNetTrainerUnsupCon: SimCLR pre-training of the encoder (no meta-labels), then supervised nnU-Net training."""
from nnunet_contrastive.components.heads import GlobalProjectionHead
from nnunet_contrastive.framework.stages import LoaderSpec, Stage, Use
from nnunet_contrastive.terms import MetaLabelContrastTerm, SupervisedTerm
from nnunet_contrastive.trainers.staged import nnUNetTrainerStaged


class nnUNetTrainerUnsupCon(nnUNetTrainerStaged):
    """Stage 1 SimCLR (the other view = the only positive, no self-pacing) on every image of the fold; stage 2
    Dice+CE on labeled cases only (one view, no teacher)."""

    pretrain_epochs = 100
    pretrain_volumes = None
    temperature = 0.07
    head_dim = 256
    head_grid = 2

    @classmethod
    def declare_stages(cls) -> list:
        return [Stage("pretrain", cls.pretrain_epochs,
                      LoaderSpec(sampling="partition", labeled=0, unlabeled="partition", images_of_labeled=True,
                                 views=2, volumes=cls.pretrain_volumes),
                      trains=("encoder", "simclr"), terms=(Use("simclr"),), pretraining=True),
                Stage("supervised", None, LoaderSpec(labeled="batch"), terms=(Use("sup", rows="labeled"),))]

    def build_terms(self) -> dict:
        head = GlobalProjectionHead.for_network(self.network, out_dim=self.head_dim, grid_size=self.head_grid)
        return {"sup": SupervisedTerm(),
                "simclr": MetaLabelContrastTerm(head, temperature=self.temperature, self_paced=False)}
