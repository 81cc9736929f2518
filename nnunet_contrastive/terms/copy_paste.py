"""Bidirectional copy-paste (Bai et al., CVPR 2023, "Bidirectional Copy-Paste for Semi-Supervised Medical Image
Segmentation"): each unlabeled row is mixed with labeled rows in both directions, so the student never trains on a
pseudo-labeled image alone; every mixed image carries real labels in one part and the teacher's in the other.

For unlabeled row ``u_j`` and box ``M_j`` (components.cutmix.box_masks; 1 inside the box):

- inward:  ``x = M u_j + (1 - M) l_a``, target ``M p_j + (1 - M) y_a`` (the unlabeled box in a labeled frame);
- outward: ``x = M l_b + (1 - M) u_j``, target ``M y_b + (1 - M) p_j`` (a labeled box in the unlabeled frame);

with ``a = j mod L``, ``b = (j + 1) mod L`` over the L labeled rows, ``p_j`` the EMA teacher's argmax on ``u_j``
and ``y`` the ground truth. The student's full-resolution logits on the 2U mixed rows are scored with
``weighted_dice_ce``: pixels of a pseudo-label weigh ``unlabeled_weight`` (the paper's alpha, 0.5), pixels of a
ground truth 1, nnU-Net's ignore label 0.

Our construction, not the authors' code: one box per unlabeled row from our CutMix boxes (any shape, given area)
rather than their fixed 2/3 x 2/3 square; the plain supervised loss on the labeled rows stays beside the term (the
authors train their self-training stage on mixed images only); the teacher is the stage's EMA teacher with a ramp
rather than a copy of a model pre-trained on mixed labeled images; the pseudo-labels are the teacher's argmax
without the authors' largest-connected-component filter.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
from nnunetv2.utilities.helpers import softmax_helper_dim1

from nnunet_contrastive.components.cutmix import area_range, box_masks
from nnunet_contrastive.terms.base import LossTerm

__all__ = ["BidirectionalCopyPasteTerm", "weighted_dice_ce"]


def weighted_dice_ce(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor, batch_dice: bool = True,
                     ddp: bool = False) -> torch.Tensor:
    """nnU-Net's Dice + CE with per-pixel weights. ``logits`` (n, C, *S); ``target`` (n, 1, *S) class ids in
    [0, C); ``weight`` (n, 1, *S) >= 0. CE: ``sum(w * ce) / #pixels`` (a weight-1 pixel counts as in nnU-Net's
    CE, a weight-0 pixel not at all); Dice: nnU-Net's soft Dice without background (smooth 1e-5) with ``weight``
    as its loss mask (weighted intersection and sums), returned negative as nnU-Net's."""
    if target.shape[0] != logits.shape[0] or target.shape[1] != 1 or target.shape[2:] != logits.shape[2:] \
            or weight.shape != target.shape:
        raise ValueError(f"target {tuple(target.shape)} and weight {tuple(weight.shape)} must be (n, 1, *S) for "
                         f"logits {tuple(logits.shape)}")
    logits = logits.float()
    ce = F.cross_entropy(logits, target[:, 0].long(), reduction="none")
    ce = (ce * weight[:, 0]).mean()
    dice = MemoryEfficientSoftDiceLoss(softmax_helper_dim1, batch_dice=batch_dice, do_bg=False, smooth=1e-5,
                                       ddp=ddp)(logits, target, loss_mask=weight.float())
    return ce + dice


class BidirectionalCopyPasteTerm(LossTerm):
    """Copy-paste between labeled and unlabeled rows in both directions (module docstring). ``rows`` is ignored:
    the term mixes the batch's labeled rows with its unlabeled ones (None when either is missing). Class labels
    only: the trainer refuses region-based datasets (``refuse_regions``).
    Args: area (box fraction, or a (low, high) range); unlabeled_weight (pseudo-label pixels' weight, > 0);
    batch_dice (Dice over the whole mixed batch, as nnU-Net's 2d default, or per row); ignore_label (the
    dataset's ignore label, whose pixels weigh 0, or None); ddp (batch Dice gathered over the DDP ranks, as
    nnU-Net's)."""

    uses_teacher = True

    def __init__(self, area=0.5, unlabeled_weight: float = 0.5, batch_dice: bool = True, ignore_label=None,
                 ddp: bool = False):
        super().__init__()
        area_range(area)  # checks ``area`` now, not at the first step
        if not float(unlabeled_weight) > 0.0:
            raise ValueError(f"unlabeled_weight must be > 0, got {unlabeled_weight}")
        self.area, self.unlabeled_weight, self.batch_dice = area, float(unlabeled_weight), bool(batch_dice)
        self.ignore_label, self.ddp = ignore_label, bool(ddp)

    def forward(self, ctx, rows: str = "all"):
        n_lab, n_unl = ctx.num_rows("labeled"), ctx.num_rows("unlabeled")
        if n_lab == 0 or n_unl == 0:
            return None
        x = ctx.input(0)
        x_lab, x_unl = x[ctx.rows("labeled")], x[ctx.rows("unlabeled")]
        y = ctx.target("labeled")
        y = (y[0] if isinstance(y, (list, tuple)) else y).long()
        valid = torch.ones_like(y, dtype=torch.float32)
        if self.ignore_label is not None:
            valid = (y != self.ignore_label).float()
            y = torch.where(y == self.ignore_label, torch.zeros_like(y), y)
        pseudo = ctx.forward("teacher", 0, "unlabeled").logits.detach().argmax(dim=1, keepdim=True)

        j = torch.arange(n_unl, device=x.device)
        a, b = j % n_lab, (j + 1) % n_lab
        m = box_masks(n_unl, x.shape[2:], self.area).to(x.device)
        inside = m.bool()
        alpha = torch.full_like(m, self.unlabeled_weight)
        mf = m.to(x.dtype)
        x_in = mf * x_unl + (1 - mf) * x_lab[a]
        x_out = mf * x_lab[b] + (1 - mf) * x_unl
        t_in, w_in = torch.where(inside, pseudo, y[a]), torch.where(inside, alpha, valid[a])
        t_out, w_out = torch.where(inside, y[b], pseudo), torch.where(inside, valid[b], alpha)

        student = ctx.forward_input("student", torch.cat([x_in, x_out])).logits
        loss = weighted_dice_ce(student, torch.cat([t_in, t_out]), torch.cat([w_in, w_out]), self.batch_dice,
                                ddp=self.ddp)
        return loss, {"bcp_pseudo_foreground": (pseudo > 0).float().mean()}
