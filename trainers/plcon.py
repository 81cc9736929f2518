"""nnUNetTrainerPLCon: pixel contrast on ground truth and pseudo-labels with self-training rounds
(Chaitanya et al. 2021, "Local contrastive loss with pseudo-label based self-training").

Stages (declared on the staged framework, trainers/staged.py):

* ``warmup``: nnU-Net's Dice+CE on the labeled cases only (the paper's Eq. 1), its own poly-LR segment, so the
  first pseudo-labels come from a converged supervised network (the authors train this baseline separately).
* ``round1`` ... ``round<R>`` (R = ``num_rounds``, 3 as in the paper): each starts by (re-)estimating the
  pseudo-labels of every unlabeled case of the fold (and of ``imagesUnlabeled``) with the current network through
  nnU-Net's own predictor (nnunet_contrastive.data.pseudo_labels: sliding window on the preprocessed images,
  stored per case in ``<fold>/pseudo_labels/round_<r>``, file-backed; an interrupted estimation resumes cleanly, a
  finished round is never recomputed). Batches: the plans' batch of labeled rows plus
  ``unlabeled_batch_ratio`` x batch unlabeled rows whose pseudo-labels travel through nnU-Net's augmentation as
  segmentations. Loss (Eq. 2): Dice+CE on the labeled rows (ground truth ONLY: the paper's key finding, Table II)
  + ``lambda_cont`` x the pixel contrast (Eq. 3-4; nnunet_contrastive.losses.pixel_contrast) on all rows, ground
  truth on labeled rows and pseudo-labels on unlabeled ones. The rounds share one poly-LR segment (no restart
  between rounds: the paper keeps one optimiser through the joint training); with ``rounds_restart_lr = False``
  there is no restart after the warm-up either: the whole run follows FewLabels' single poly-LR decay.

Lengths: ``warmup_fraction`` (1/4, the paper's 5000 of 20000 iterations) of the run's epochs
(``nnUNet_contrastive_epochs`` or nnU-Net's 1000), the rest split evenly over the rounds;
``nnUNet_contrastive_stage_epochs=W,R1,R2,R3`` sets them one by one.

Defaults (paper, Sec. IV-E): lambda_cont 0.1, tau 0.1, 3 anchors per class and image, 16-d embeddings from two
1x1 convolutions on the last decoder stage, inter-image matching (the paper's default experiment), uniform pixel
sampling (NSSampler, without replacement; the authors draw with replacement). Not reproduced from the authors'
code (methods.md C): the cumulative normalisation (we normalise once), dense-CRF post-processing of the
pseudo-labels (nnU-Net's own prediction is used as is), the fixed 10+10 contrastive batch of images with every
class present (our batches are nnU-Net's, and absent classes are left out).

Variant ``nnUNetTrainerPLConSelfTrain`` (``pseudo_label_ce_weight`` > 0) adds cross-entropy on the unlabeled rows'
pseudo-labels (confident pixels only; nnunet_contrastive.terms.pseudo_label), which the paper leaves out, as a
candidate to compare on validation. It trusts the round's pseudo-labels: measured, it gained on hippocampus with
one labeled volume (first pseudo-labels at 0.41-0.60 validation Dice) and collapsed to predicting background on
ACDC with one labeled patient (first pseudo-labels at 0.27, most confident pixels background). Watch
``plcon_val_dice`` in the log before relying on it (README, Results). ``nnUNetTrainerPLConSelfTrainBalanced``
averages that CE per pseudo-label class instead of per pixel; ``nnUNetTrainerPLConSelfTrainLongWarmup`` starts the
rounds after half of the run (FewLabels' validation curve at one labeled patient flattens after about 40 % of the
ACDC budget), so the first pseudo-labels come from a supervised network near its plateau. Measured on that ACDC run
(one seed): Balanced still fails (0.195 test Dice against FewLabels' 0.536), LongWarmup does not collapse (first
pseudo-labels 0.57) and ties FewLabels on validation; with three labeled patients (one seed) it loses to FewLabels
(test 0.569 against 0.629, validation 0.623 against 0.672) although its warm-up ends where FewLabels' validation
curve is already flat (README, Results). Two one-change candidates against that loss, same seed: ``…LowCE``
(pseudo-label CE weight 0.3) validation 0.665, test 0.599; ``…OneLR`` (``rounds_restart_lr = False``, FewLabels'
single LR decay) validation 0.654, test 0.600: both closer, neither above FewLabels. Without that CE
(``nnUNetTrainerPLConLongWarmup``, the paper's loss) validation 0.684, test 0.648: above FewLabels, one seed; over
seeds 0-3 +0.019 +- 0.027 on test, losing the RV at seed 1; with one labeled patient (seed 0) test 0.558 against
FewLabels' 0.536, validation 0.585 against 0.561. Two one-change candidates against that seed-1 loss,
run there first: ``nnUNetTrainerPLConLongWarmupConfident`` (``min_confidence`` 0.9, wrong RV pseudo-labels out of
the contrast) validation 0.612 and ``…OneLR`` (``rounds_restart_lr = False``) validation 0.598, both below
LongWarmup's 0.629 and FewLabels' 0.680: neither kept (README, Results). A third,
``nnUNetTrainerPLConLongWarmupTeacher`` (``pseudo_label_teacher``: rounds 2-3 estimate with an EMA teacher of the
rounds' network, synced at round 1's start, window ``ema_window_fraction`` of a round), made worse round-2
pseudo-labels than the network it averages (0.648 against 0.676; the network was still improving) and scored
validation 0.594: not kept either.

Observability (log, progress_contrastive.png): ``plcon_loss``, ``plcon_anchors_c<k>``, ``plcon_images``, and per
round ``plcon_round``, ``plcon_changed`` (fraction of unlabeled pixels whose pseudo-label changed at this
re-estimation) and ``plcon_val_dice`` (pseudo-label Dice against ground truth, pooled over the voxels of the fold's
validation cases; not nnU-Net's per-case mean Dice).
"""
from __future__ import annotations

import os

from nnunet_contrastive.components.samplers import build_sampler
from nnunet_contrastive.data.dataloading import unlabeled_folder_of
from nnunet_contrastive.data.pseudo_labels import PseudoLabelStore, estimate_round
from nnunet_contrastive.framework.stages import LoaderSpec, Stage, Use
from nnunet_contrastive.terms import SupervisedTerm
from nnunet_contrastive.terms.pixel_contrast import PixelContrastTerm, PixelEmbeddingHead
from nnunet_contrastive.terms.pseudo_label import PseudoLabelCETerm, class_balanced_mean, pixel_mean
from nnunet_contrastive.trainers.base import SCHEDULE_ENV
from nnunet_contrastive.trainers.staged import DEFAULT_NUM_EPOCHS, nnUNetTrainerStaged

__all__ = ["PseudoLabelRounds", "nnUNetTrainerPLCon", "nnUNetTrainerPLConIntra", "nnUNetTrainerPLConConfident",
           "nnUNetTrainerPLConSG",
           "nnUNetTrainerPLConLongWarmup", "nnUNetTrainerPLConLongWarmupConfident",
           "nnUNetTrainerPLConLongWarmupOneLR", "nnUNetTrainerPLConLongWarmupTeacher",
           "nnUNetTrainerPLConLongWarmupMirrored", "nnUNetTrainerPLConSelfTrain",
           "nnUNetTrainerPLConSelfTrainBalanced", "nnUNetTrainerPLConSelfTrainLongWarmup",
           "nnUNetTrainerPLConSelfTrainLongWarmupLowCE", "nnUNetTrainerPLConSelfTrainLongWarmupOneLR"]


class PseudoLabelRounds:
    """Mixin of the staged trainers that end in pseudo-label rounds (nnUNetTrainerPLCon, nnUNetTrainerComposed): a
    warm-up of ``warmup_fraction`` of the run, then ``num_rounds`` stages named ``round<r>`` that each start by
    (re-)estimating the pseudo-labels of every unlabeled case with the current network (or its EMA teacher) and
    feed them to the loader; the pixel contrast ("plcon") on ground truth and pseudo-labels, and optionally the
    pseudo-label CE ("plce"), are added to the rounds' terms. Put it before the staged trainer in the bases."""

    warmup_fraction = 0.25
    num_rounds = 3
    lambda_cont = 0.1
    pixels_per_class = 3
    embedding_dim = 16
    inter_image = True
    min_confidence = 0.0  # > 0: unlabeled pixels below this pseudo-label confidence are left out of the contrast
    pixel_sampler = "ns"  # nnunet_contrastive.components.samplers: "ns", "sg", "sag"
    pseudo_label_mirroring = False  # test-time mirroring of the estimation (nnU-Net's predictor)
    pseudo_label_teacher = False  # True: rounds >= 2 estimate with an EMA teacher of the rounds' network
    pseudo_label_ce_weight = 0.0  # > 0: + weight x CE on the pseudo-labels of unlabeled rows (paper: none, Table II)
    pseudo_label_ce_confidence = 0.9  # pixels below this pseudo-label confidence are left out of that CE
    pseudo_label_ce_class_balanced = False  # True: that CE averages per-class means (terms.pseudo_label)
    rounds_restart_lr = True  # round 1 restarts the poly LR and momentum; False: one decay over the run (FewLabels')

    # ------------------------------------------------------------------ declarations
    @classmethod
    def planned_epochs(cls) -> int:
        raw = os.environ.get(SCHEDULE_ENV["num_epochs"])
        return int(raw) if raw else DEFAULT_NUM_EPOCHS

    @classmethod
    def round_lengths(cls) -> tuple:
        """(warm-up epochs, [epochs of each round]) of the planned run."""
        total = cls.planned_epochs()
        warm = max(1, int(round(total * cls.warmup_fraction)))
        rest = max(total - warm, 1)
        return warm, [rest // cls.num_rounds + (1 if i < rest % cls.num_rounds else 0) for i in range(cls.num_rounds)]

    @classmethod
    def pixel_uses(cls) -> tuple:
        """(the pixel contrast on all rows, the pseudo-label CE on unlabeled rows when it is on) as stage terms."""
        plcon = (Use("plcon", cls.lambda_cont, rows="all"),)
        plce = (Use("plce", cls.pseudo_label_ce_weight, rows="unlabeled"),) if cls.pseudo_label_ce_weight > 0 else ()
        return plcon, plce

    @classmethod
    def round_stages(cls, lengths, loader: LoaderSpec, trains: tuple, terms: tuple, flip_student: bool = False
                     ) -> list:
        """The rounds with ``terms`` (the pixel terms of ``pixel_uses`` among them); the pixel head trains with
        ``trains``; round 1 restarts the LR (``rounds_restart_lr``) and re-syncs the teacher when the pseudo-labels
        come from it."""
        return [Stage(f"round{i + 1}", n, loader, trains=tuple(trains) + ("plcon",), terms=tuple(terms),
                      fresh_lr=i == 0 and cls.rounds_restart_lr, fresh_momentum=i == 0 and cls.rounds_restart_lr,
                      resync_teacher=i == 0 and cls.pseudo_label_teacher, flip_student=flip_student)
                for i, n in enumerate(lengths)]

    def pixel_terms(self, temperature: float) -> dict:
        """The rounds' terms: "plcon" (pixel contrast, head on the last decoder stage) and "plce"."""
        self.refuse_regions("pseudo-labels are class labels")
        head = PixelEmbeddingHead.for_network(self.network, self.embedding_dim)
        return {"plcon": PixelContrastTerm(head, self.label_manager.foreground_labels, temperature,
                                           self.pixels_per_class, self.inter_image, build_sampler(self.pixel_sampler),
                                           self.min_confidence),
                "plce": PseudoLabelCETerm(self.pseudo_label_ce_confidence,
                                          class_balanced_mean if self.pseudo_label_ce_class_balanced else pixel_mean)}

    def updates_teacher(self, stage) -> bool:
        return super().updates_teacher(stage) or (self.pseudo_label_teacher and stage.name.startswith("round"))

    # ------------------------------------------------------------------ pseudo-labels
    @property
    def pseudo_label_store(self) -> PseudoLabelStore:
        return PseudoLabelStore(os.path.join(self.output_folder, "pseudo_labels"))

    def round_of_stage(self, index: int):
        name = self.plan.stages[index].name
        return int(name[len("round"):]) if name.startswith("round") else None

    def do_split(self):
        tr, val = super().do_split()
        self._last_split = (list(tr), list(val))
        return tr, val

    def unlabeled_cases(self) -> list:
        """[(nnU-Net dataset, case id)] of every unlabeled case the loaders draw from (read image-only)."""
        from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

        if self.dataset_class is None:
            self.dataset_class = infer_dataset_class(self.preprocessed_dataset_folder)
        cases = []
        if self.unlabeled_keys:
            ds = self.dataset_class(self.preprocessed_dataset_folder, list(self.unlabeled_keys))
            cases += [(ds, k) for k in self.unlabeled_keys]
        folder = unlabeled_folder_of(self)
        if os.path.isdir(folder):
            ds_u = self.dataset_class(folder)
            cases += [(ds_u, k) for k in ds_u.identifiers]
        return cases

    def ensure_pseudo_labels(self, r: int) -> dict:
        """The manifest of round r, estimating (or finishing) it first unless it is complete."""
        store = self.pseudo_label_store
        if not store.is_complete(r):
            if self.local_rank == 0:
                val = getattr(self, "_last_split", (None, []))[1]
                teacher = self.pseudo_label_teacher and self.teacher is not None and r > 1  # round 1: = network
                estimate_round(self, store, r, self.unlabeled_cases(), val, self.pseudo_label_mirroring,
                               log=self.print_to_log_file, network=self.teacher.module if teacher else None,
                               source="EMA teacher" if teacher else "network")
            if self.is_ddp:
                from torch import distributed as dist

                dist.barrier()
        else:
            self.print_to_log_file(f"Pseudo-labels round {r}: complete in {store.round_dir(r)}, not recomputed.")
        m = store.manifest(r)
        nan = float("nan")
        self.pseudo_label_stats = {
            "plcon_round": float(r),
            "plcon_changed": nan if m.get("changed_fraction") is None else float(m["changed_fraction"]),
            "plcon_val_dice": nan if m.get("val_dice_mean") is None else float(m["val_dice_mean"])}
        return m

    def loader_options(self, stage_index: int) -> dict:
        r = self.round_of_stage(stage_index)
        if r is None:
            self.pseudo_label_stats = {}
            return {}
        self.ensure_pseudo_labels(r)
        confidence = self.min_confidence > 0 or (self.pseudo_label_ce_weight > 0
                                                 and self.pseudo_label_ce_confidence > 0)
        return {"pseudo_labels": self.pseudo_label_store.source(r, confidence=confidence)}


class nnUNetTrainerPLCon(PseudoLabelRounds, nnUNetTrainerStaged):
    """Supervised warm-up, then R self-training rounds: Dice+CE on ground truth + lambda x pixel contrast on ground
    truth and pseudo-labels, pseudo-labels re-estimated by nnU-Net's predictor at every round (Chaitanya et al.)."""

    unlabeled_batch_ratio = 0.5  # unlabeled rows per batch, as a fraction of the plans' batch size (labeled rows)
    temperature = 0.1
    ema_window_fraction = 0.3  # that teacher averages over the last ~30 % of a round's iterations (capped by 0.999)
    stage_checkpoints = ("warmup",)  # checkpoint_warmup_end.pth: variants with equal warmup_key share the warm-up
    warmup_attributes = ("embedding_dim",)  # the pixel head is built (from the seeded generator) before the warm-up

    @classmethod
    def declare_stages(cls) -> list:
        warm, lengths = cls.round_lengths()
        plcon, plce = cls.pixel_uses()
        return [Stage("warmup", warm, LoaderSpec(labeled="batch"), terms=(Use("sup", rows="labeled"),))] + \
            cls.round_stages(lengths, LoaderSpec(labeled="batch", unlabeled=float(cls.unlabeled_batch_ratio)),
                             trains=("network",), terms=(Use("sup", rows="labeled"),) + plcon + plce)

    def build_terms(self) -> dict:
        return {"sup": SupervisedTerm(), **self.pixel_terms(self.temperature)}


# ---------------------------------------------------------------------------------------------------- variants
class nnUNetTrainerPLConIntra(nnUNetTrainerPLCon):
    """Intra-image matching: an anchor's class means come from its own image only."""
    inter_image = False


class nnUNetTrainerPLConConfident(nnUNetTrainerPLCon):
    """Only unlabeled pixels with pseudo-label confidence >= 0.9 enter the contrast (paper Table VII filters whole
    volumes by the Dice of two augmented predictions instead; here: per pixel, by the softmax confidence)."""
    min_confidence = 0.9


class nnUNetTrainerPLConSG(nnUNetTrainerPLCon):
    """Anchors drawn with ARCO's stratified group sampler (SG) instead of uniformly."""
    pixel_sampler = "sg"


class nnUNetTrainerPLConLongWarmup(nnUNetTrainerPLCon):
    """Half of the run as supervised warm-up, so round 1's pseudo-labels come from a more trained network."""
    warmup_fraction = 0.5


class nnUNetTrainerPLConLongWarmupConfident(nnUNetTrainerPLConLongWarmup):
    """The half-run warm-up, then only unlabeled pixels with pseudo-label confidence >= 0.9 enter the contrast."""
    min_confidence = 0.9


class nnUNetTrainerPLConLongWarmupOneLR(nnUNetTrainerPLConLongWarmup):
    """The half-run warm-up and rounds on FewLabels' single poly-LR decay (no restart at round 1)."""
    rounds_restart_lr = False


class nnUNetTrainerPLConLongWarmupTeacher(nnUNetTrainerPLConLongWarmup):
    """LongWarmup whose rounds 2-3 take their pseudo-labels from an EMA teacher, not the last step's network."""
    pseudo_label_teacher = True


class nnUNetTrainerPLConLongWarmupMirrored(nnUNetTrainerPLConLongWarmup):
    """LongWarmup whose pseudo-labels are estimated with test-time mirroring (nnU-Net's predictor, ~4x its cost)."""
    pseudo_label_mirroring = True


class nnUNetTrainerPLConSelfTrain(nnUNetTrainerPLCon):
    """Rounds add CE on the unlabeled rows' pseudo-labels (pixels with confidence >= 0.9), i.e. self-training."""
    pseudo_label_ce_weight = 1.0


class nnUNetTrainerPLConSelfTrainBalanced(nnUNetTrainerPLConSelfTrain):
    """Self-training whose pseudo-label CE averages per-class means, so confident background cannot dominate it."""
    pseudo_label_ce_class_balanced = True


class nnUNetTrainerPLConSelfTrainLongWarmup(nnUNetTrainerPLConSelfTrain):
    """Self-training after half of the run as supervised warm-up, so it starts from more useful pseudo-labels."""
    warmup_fraction = 0.5


class nnUNetTrainerPLConSelfTrainLongWarmupLowCE(nnUNetTrainerPLConSelfTrainLongWarmup):
    """Self-training after the half-run warm-up with the pseudo-label CE at weight 0.3 instead of 1."""
    pseudo_label_ce_weight = 0.3


class nnUNetTrainerPLConSelfTrainLongWarmupOneLR(nnUNetTrainerPLConSelfTrainLongWarmup):
    """Self-training after the half-run warm-up on FewLabels' single poly-LR decay (no restart at round 1)."""
    rounds_restart_lr = False
