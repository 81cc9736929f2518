"""nnUNetTrainerARCO: ARCO (You et al., NeurIPS 2023) - semi-supervised training with a pixel contrast whose pixels
are drawn by stratified group sampling (SG; SAG and naive sampling NS as variants).

One stage (nnU-Net's whole schedule), batches of the plans' batch size of labeled rows plus
``unlabeled_batch_ratio`` x batch size unlabeled rows, two views sharing the spatial transform (independent
intensity augmentation); the student sees view 1 (randomly flipped, flipped back), the EMA teacher view 2::

    L = Dice+CE (labeled rows, nnU-Net's loss with deep supervision)
      + lambda_unsup    x confidence-weighted pseudo-label CE from the teacher (unlabeled rows)
      + lambda_contrast x ARCO pixel contrast (all rows: labels on labeled rows, teacher pseudo-labels on
                          unlabeled rows; anchors and negatives drawn by the sampler)

Defaults from the authors' 2D trainer (methods.md §D.2, §D.4) where the paper is silent: temperature 0.5,
delta_p 0.3, alpha_t 20 -> 0, L_unsup confidence 0.97 and weight 1, contrast weight 0.01, EMA decay 0.99
(capped by the framework to 5% of the stage for short runs), 4 x 4 grid, 256 anchors per class. The authors'
memory bank that stays empty and their gradient-free L_nn are not reproduced (nnunet_contrastive.losses.arco,
nnunet_contrastive.terms.arco say why); nor is the optional instance-discrimination pre-training (the issue asks
for it only if the benchmark shows it pays). Their cutmix / TPS-equivariance augmentations are replaced by
nnU-Net's augmentation (methods.md decisions: nnU-Net's pipeline is kept).

The projection head and its EMA copy live beside ``self.network`` (checkpoint key ``nnunet_contrastive``);
``checkpoint_teacher.pth`` holds the teacher network.
"""
from __future__ import annotations

from nnunet_contrastive.components.arco_head import MultiScaleDenseHead
from nnunet_contrastive.components.samplers import build_sampler
from nnunet_contrastive.framework.stages import Stage, Use
from nnunet_contrastive.terms import SupervisedTerm
from nnunet_contrastive.terms.arco import ARCOContrastTerm, ARCOPseudoLabelTerm
from nnunet_contrastive.trainers.staged import nnUNetTrainerStaged

__all__ = ["nnUNetTrainerARCO", "nnUNetTrainerARCOSAG", "nnUNetTrainerARCONS"]


class nnUNetTrainerARCO(nnUNetTrainerStaged):
    """Dice+CE + pseudo-label CE from an EMA teacher + ARCO pixel contrast with SG sampling."""

    sampler = "sg"
    sampler_grid = 4
    unlabeled_batch_ratio = 0.5
    lambda_contrast = 0.01
    lambda_unsup = 1.0
    temperature = 0.5
    n_anchors = 256            # per class, over the batch
    n_keys = 256               # negative keys per class drawn from each batch
    memory_size = 1024         # recent keys kept per class
    prob_threshold = 0.3       # delta_p
    entropy_percent = (20.0, 0.0)  # alpha_t at the start and the end of the stage
    pseudo_label_threshold = 0.97
    head_hidden = 128
    head_dim = 64
    head_taps = None           # decoder stages read by the head; None: all
    predictor = True
    ema_decay = 0.99

    @classmethod
    def declare_stages(cls) -> list:
        return [Stage("semi", None, cls.teacher_student_loader(),
                      trains=("network", "arco"),
                      terms=(Use("sup", rows="labeled"),
                             Use("arco", cls.lambda_contrast, rows="all"),  # before "unsup": one teacher pass
                             Use("unsup", cls.lambda_unsup, rows="unlabeled")),
                      flip_student=True)]

    def build_terms(self) -> dict:
        self.refuse_regions("ARCO contrasts classes")
        kwargs = {} if self.sampler == "ns" else {"grid": self.sampler_grid}
        head = MultiScaleDenseHead.for_network(self.network, hidden=self.head_hidden, out_dim=self.head_dim,
                                               taps=self.head_taps)
        arco = ARCOContrastTerm(head, self.label_manager.num_segmentation_heads, build_sampler(self.sampler, **kwargs),
                                n_anchors=self.n_anchors, n_keys=self.n_keys, memory_size=self.memory_size,
                                temperature=self.temperature, prob_threshold=self.prob_threshold,
                                entropy_percent=self.entropy_percent, predictor=self.predictor)
        return {"sup": SupervisedTerm(), "arco": arco, "unsup": ARCOPseudoLabelTerm(self.pseudo_label_threshold)}

    def on_train_start(self):
        super().on_train_start()
        self.print_to_log_file(f"ARCO: sampler {self.terms['arco'].sampler!r}, {self.n_anchors} anchors and "
                               f"{self.n_keys} keys per class, memory {self.memory_size} per class, temperature "
                               f"{self.temperature}, lambda_contrast {self.lambda_contrast}")


class nnUNetTrainerARCOSAG(nnUNetTrainerARCO):
    """ARCO with stratified antithetic group sampling (SAG)."""
    sampler = "sag"


class nnUNetTrainerARCONS(nnUNetTrainerARCO):
    """ARCO with naive (uniform) sampling: the baseline of the variance-reduction claim."""
    sampler = "ns"
