"""nnUNetTrainerGlobalLocal: global and local contrastive pre-training (Chaitanya et al., NeurIPS 2020) in nnU-Net.

Three stages on the staged framework (trainers/staged.py), all inside one ``nnUNetv2_train``:

1. ``global`` (``global_epochs``): nnU-Net's encoder + the global head g_1 (``GlobalProjectionHead`` on the bottleneck,
   grid-pooled, hidden 3200 -> 128 as in the paper's appendix) with the global contrastive loss, strategy
   ``global_strategy`` (default G^D; G^D- and G^R as variants). Batches of m volumes x S partitions x 1 slice
   (``num_partitions`` = S = 4 as in the paper, m = ``pretrain_volumes`` or max(2, batch_size // S)) from EVERY
   training image of the fold, labeled and unlabeled (images only), two independently augmented views of each
   (nnU-Net's augmentation run twice). G^R samples its images at random instead (the paper's random strategy).
2. ``local`` (``local_epochs``): the encoder is FROZEN (no gradient, no weight decay, no momentum: its weights are
   bit-identical across the stage); the first l = ``local_decoder_blocks`` decoder stages (``decoder.0`` .. next to
   the bottleneck) + the local head g_2 are trained with the local contrastive loss on the output of decoder stage
   l - 1, read through the framework's decoder taps. l is CLAMPED to the network's number of decoder stages (logged):
   an nnU-Net plan with 3 decoder stages trains all 3 for l = 3, 4 or 5. Strategy ``local_strategy`` (default L^R,
   L^D as a variant). Two views with the SAME spatial transform and independent intensity transforms (share_spatial),
   so regions correspond pixel for pixel. L^R samples random slices; L^D volume x partition batches. Regions: a
   regular grid of ``local_grid`` x ``local_grid`` non-overlapping windows of ``local_region_size`` pixels per axis,
   clamped to the feature map (nnunet_contrastive.components.local_head).
3. ``supervised`` (the rest of nnU-Net's ``num_epochs``): nnU-Net's own training on the labeled cases of the fold
   (Dice + CE with deep supervision, nnU-Net's augmentation), whole network, fresh poly LR and momentum.

Heads live beside ``self.network`` (checkpoint key ``nnunet_contrastive``), so the stock predictor and
``-pretrained_weights`` work; ``nnUNetTrainerGlobalLocalPretrain`` stops after stage 2 for that purpose.

Stage lengths: the paper trains each of its three stages for 10^4 iterations; we keep that 1 : 1 : 1 ratio in
nnU-Net epochs: 333 + 333 of nnU-Net's 1000, the supervised stage takes the remaining 334. Short runs:
``nnUNet_contrastive_stage_epochs=a,b,c`` or ``nnUNet_contrastive_pretrain_epochs`` (both pre-training stages).

Deviations, all deliberate: nnU-Net's network, SGD (momentum 0.99, poly LR restarted per stage) and augmentation
instead of the paper's U-Net, Adam 1e-3 and crop + brightness/contrast; the two views are two augmented images (the
paper's G^D- also uses the untransformed image as a third member). Not reproduced from the authors' code
(methods.md §B.5): the G^R branch is live (theirs is commented out, loss 0); G^D batches have no all-zero image rows
(every row is a real slice of the loader's volume x partition batch); the partition count is ``num_partitions``
everywhere, never a hard-coded 4 (their G^D- excludes every 4th row); partitions cover every slice
(``ceil(p n / S)`` bounds: the last n mod S slices are sampled like any other, theirs never are); regions are a
regular grid with all other regions as negatives (not hand-picked tables of 5, or 4 in L^D); all anchors of both
views enter L^D; the loss is normalised per pair term, not per image count; no extra dense layer on flattened
regions (``wgt_en``).
"""
from __future__ import annotations

from dataclasses import replace

from nnunet_contrastive.components.heads import GlobalProjectionHead
from nnunet_contrastive.components.local_head import LocalProjectionHead
from nnunet_contrastive.components.taps import decoder_of
from nnunet_contrastive.framework.stages import LoaderSpec, Stage, Use
from nnunet_contrastive.terms import SupervisedTerm
from nnunet_contrastive.terms.global_local import GlobalContrastTerm, LocalContrastTerm
from nnunet_contrastive.trainers.staged import PARTITION, nnUNetTrainerStaged

__all__ = ["nnUNetTrainerGlobalLocal", "nnUNetTrainerGlobalLocalGR", "nnUNetTrainerGlobalLocalGDminus",
           "nnUNetTrainerGlobalLocalLD", "nnUNetTrainerGlobalLocalGlobalOnly", "nnUNetTrainerGlobalLocalPretrain"]


class nnUNetTrainerGlobalLocal(nnUNetTrainerStaged):
    """Global (G^D) then local (L^R) contrastive pre-training, then supervised nnU-Net training (Chaitanya 2020)."""

    # strategies: global "GR" / "GDminus" / "GD"; local "LR" / "LD", or None for no local stage
    global_strategy = "GD"
    local_strategy = "LR"
    supervised = True  # False: stages 1-2 only (a checkpoint for -pretrained_weights)
    # stage lengths in nnU-Net epochs (the paper's 1 : 1 : 1; the supervised stage takes the rest of num_epochs)
    global_epochs = 333
    local_epochs = 333
    # batches: S partitions per volume (paper: 4), m volumes per batch (None: max(2, batch_size // S))
    meta_labels = (PARTITION,)
    required_meta_labels = (PARTITION,)
    num_partitions = 4
    pretrain_volumes = None
    temperature = 0.1  # the paper's tau for both losses
    # g_1: grid-pooled bottleneck -> 3200 -> 128 (paper appendix)
    global_head_hidden = 3200
    global_head_dim = 128
    global_head_grid = 2
    # local: l decoder blocks (clamped to the network), g_2 width (None: the decoder stage's channels), regions
    local_decoder_blocks = 3
    local_head_dim = None
    local_region_size = 3
    local_grid = 4

    # ------------------------------------------------------------------ stages
    @classmethod
    def _sampling(cls, strategy: str) -> dict:
        if strategy in ("GR", "LR"):  # the paper's random strategies: N random slices of all images
            return dict(sampling="random", labeled=0, unlabeled=1.0, images_of_labeled=True)
        return dict(sampling="partition", labeled=0, unlabeled="partition", images_of_labeled=True,
                    volumes=cls.pretrain_volumes)

    @classmethod
    def local_trains(cls) -> tuple:
        """Module groups of the local stage: decoder.0 .. decoder.<l-1> (clamped to the network at run time) and
        the local head."""
        return tuple(f"decoder.{s}" for s in range(cls.local_decoder_blocks)) + ("local",)

    @classmethod
    def declare_stages(cls) -> list:
        stages = [Stage("global", cls.global_epochs, LoaderSpec(views=2, **cls._sampling(cls.global_strategy)),
                        trains=("encoder", "global"), terms=(Use("global"),), pretraining=True)]
        if cls.local_strategy is not None:
            stages.append(Stage("local", cls.local_epochs,
                                LoaderSpec(views=2, share_spatial=True, **cls._sampling(cls.local_strategy)),
                                trains=cls.local_trains(), terms=(Use("local"),), pretraining=True))
        if cls.supervised:
            stages.append(Stage("supervised", None, LoaderSpec(labeled="batch"), trains=("network",),
                                terms=(Use("sup", rows="labeled"),)))
        return stages

    # ------------------------------------------------------------------ network-dependent pieces
    def local_blocks(self) -> int:
        """l clamped to the network's decoder stages."""
        return max(1, min(int(self.local_decoder_blocks), len(decoder_of(self.network).stages)))

    def trainable_groups(self, stage) -> dict:
        """The framework's groups; ``decoder.<s>`` beyond the network's decoder depth (l clamped) are empty."""
        n_dec = len(decoder_of(self.network).stages)
        beyond = [g for g in stage.trains if g.startswith("decoder.") and g[len("decoder."):].isdigit()
                  and int(g[len("decoder."):]) >= n_dec]
        groups = super().trainable_groups(replace(stage, trains=tuple(g for g in stage.trains if g not in beyond)))
        for g in beyond:
            groups[g] = []
        return groups

    def build_terms(self) -> dict:
        g1 = GlobalProjectionHead.for_network(self.network, out_dim=self.global_head_dim,
                                              hidden_dim=self.global_head_hidden, grid_size=self.global_head_grid)
        terms = {"sup": SupervisedTerm(),
                 "global": GlobalContrastTerm(g1, strategy=self.global_strategy, temperature=self.temperature)}
        if self.local_strategy is not None:
            l_eff = self.local_blocks()
            if l_eff != self.local_decoder_blocks:
                self.print_to_log_file(f"local stage: local_decoder_blocks={self.local_decoder_blocks} clamped to the "
                                       f"network's {l_eff} decoder stages")
            g2 = LocalProjectionHead.for_decoder_stage(self.network, l_eff - 1, out_dim=self.local_head_dim,
                                                       region_size=self.local_region_size, grid=self.local_grid)
            terms["local"] = LocalContrastTerm(g2, l_eff - 1, strategy=self.local_strategy,
                                               temperature=self.temperature)
        return terms

    def on_train_start(self):
        super().on_train_start()
        msg = f"GlobalLocal: global {self.global_strategy}"
        if self.local_strategy is not None:
            msg += (f", local {self.local_strategy} on decoder stage {self.local_blocks() - 1} (l = "
                    f"{self.local_blocks()}), {self.local_grid}x{self.local_grid} windows of {self.local_region_size}")
        self.print_to_log_file(msg + f", {self.num_partitions} partitions, temperature {self.temperature}")


# ---------------------------------------------------------------------------------------------------- variants
class nnUNetTrainerGlobalLocalGR(nnUNetTrainerGlobalLocal):
    """G^R (SimCLR on random slices) instead of G^D, then L^R and supervised training."""
    global_strategy = "GR"


class nnUNetTrainerGlobalLocalGDminus(nnUNetTrainerGlobalLocal):
    """G^D-: same-partition images of other volumes are left out of the negatives (not positives)."""
    global_strategy = "GDminus"


class nnUNetTrainerGlobalLocalLD(nnUNetTrainerGlobalLocal):
    """L^D: the same region of same-partition images of other volumes is also a positive."""
    local_strategy = "LD"


class nnUNetTrainerGlobalLocalGlobalOnly(nnUNetTrainerGlobalLocal):
    """G^D pre-training of the encoder only (no local stage), then supervised training."""
    local_strategy = None


class nnUNetTrainerGlobalLocalPretrain(nnUNetTrainerGlobalLocal):
    """Stages 1-2 only: its checkpoint initialises any trainer (stock nnUNetTrainer too) via -pretrained_weights."""
    supervised = False
