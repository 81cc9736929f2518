"""Pixel-to-class-mean contrast on ground truth and pseudo-labels (Chaitanya et al. 2021), as a loss term.

The head h_phi (:class:`PixelEmbeddingHead`: 1x1 conv -> BatchNorm -> ReLU -> 1x1 conv, 16-d, as the paper's
Sec. IV-C) sits on the LAST decoder stage of nnU-Net's U-Net (full resolution, read through the step context's
decoder taps), outside ``self.network``. Labels per row: ground truth (``batch["target"]``) on labeled rows, the
pseudo-label (``batch["pseudo_target"]``, written by the pseudo-label loader route) on unlabeled rows; the two are
never mixed (an unlabeled row's ``target`` is the loader's fill value, a labeled row's ``pseudo_target`` is -1).
With ``min_confidence > 0`` unlabeled pixels whose pseudo-label confidence (``batch["pseudo_confidence"]``) is
below it are left out (neither anchors nor part of a class mean).

Loss: :func:`nnunet_contrastive.losses.pixel_contrast.pixel_contrast_loss` (intra-image, or inter-image with a
random cyclic pairing of the rows drawn every step, Eq. 2's "two random samples"). The segmentation loss never sees
a pseudo-label (the paper's key finding, Table II): this term is the only reader of ``pseudo_target``.

Stats (prefix = the term's name): ``<name>_anchors_c<k>`` anchors of class k per step, ``<name>_images`` images
with anchors, and the trainer's pseudo-label round statistics (``pseudo_label_stats``) when it has them.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from nnunet_contrastive.components.samplers import NSSampler, PixelSampler
from nnunet_contrastive.losses.pixel_contrast import pixel_contrast_loss, random_partners
from nnunet_contrastive.terms.base import LossTerm
from nnunet_contrastive.terms.pseudo_label import batch_pseudo_labels

__all__ = ["PixelEmbeddingHead", "PixelContrastTerm"]


class PixelEmbeddingHead(nn.Module):
    """h_phi: two 1x1 convolutions (conv -> BatchNorm -> ReLU -> conv), ``out_dim`` = 16 by default; no
    normalisation of the output (the loss takes cosines). 2D (Conv2d) or 3D (Conv3d)."""

    def __init__(self, in_channels: int, out_dim: int = 16, hidden_dim: Optional[int] = None, spatial_dims: int = 2):
        super().__init__()
        conv, norm = (nn.Conv2d, nn.BatchNorm2d) if spatial_dims == 2 else (nn.Conv3d, nn.BatchNorm3d)
        hidden = hidden_dim or out_dim
        self.in_channels, self.out_dim, self.spatial_dims = int(in_channels), int(out_dim), spatial_dims
        self.net = nn.Sequential(conv(in_channels, hidden, 1, bias=False), norm(hidden), nn.ReLU(inplace=True),
                                 conv(hidden, out_dim, 1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    @classmethod
    def for_network(cls, network: nn.Module, out_dim: int = 16, hidden_dim: Optional[int] = None
                    ) -> "PixelEmbeddingHead":
        """A head for the last decoder stage of an nnU-Net U-Net (its channels: the input of the last seg layer)."""
        from nnunet_contrastive.components.taps import decoder_of

        seg = decoder_of(network).seg_layers[-1]
        dims = 3 if isinstance(seg, nn.Conv3d) else 2
        head = cls(seg.in_channels, out_dim, hidden_dim, dims)
        return head.to(seg.weight.device)


def _full_res(t):
    return t[0] if isinstance(t, (list, tuple)) else t


class PixelContrastTerm(LossTerm):
    """Args: head; classes (foreground label values); temperature (tau); n_per_class (anchors per class and
    image); inter (inter-image pairs, else intra); sampler (default NSSampler); min_confidence (0: off)."""

    def __init__(self, head: PixelEmbeddingHead, classes: Sequence[int], temperature: float = 0.1,
                 n_per_class: int = 3, inter: bool = True, sampler: Optional[PixelSampler] = None,
                 min_confidence: float = 0.0):
        super().__init__()
        self.head = head
        self.classes = [int(c) for c in classes]
        self.temperature, self.n_per_class, self.inter = float(temperature), int(n_per_class), bool(inter)
        self.sampler = sampler or NSSampler()
        self.min_confidence = float(min_confidence)

    def row_labels(self, ctx, rows: str) -> torch.Tensor:
        """(N, *S) labels of ``rows``: ground truth on labeled rows, pseudo-labels on unlabeled ones, -1 where a
        row has none (unlabeled rows without pseudo-labels) or the pseudo-label is not confident enough."""
        batch = ctx.batch
        gt = _full_res(batch["target"]).to(ctx.device)[:, 0].long()
        labeled = ctx.labeled.to(ctx.device)
        shape = (-1,) + (1,) * (gt.dim() - 1)
        if "pseudo_target" in batch:
            pl = batch_pseudo_labels(batch, ctx.device, self.min_confidence)
        else:
            pl = torch.full_like(gt, -1)
        lab = torch.where(labeled.view(shape), gt, pl)
        idx = ctx.rows(rows)
        return lab if idx is None else lab[idx]

    def forward(self, ctx, rows: str = "all"):
        n = ctx.num_rows(rows)
        if n == 0:
            return None
        feats = ctx.forward("student", 0, rows).decoder[-1]
        labels = self.row_labels(ctx, rows)
        if feats.shape[2:] != labels.shape[1:]:
            raise ValueError(f"the last decoder stage {tuple(feats.shape)} is not at the labels' resolution "
                             f"{tuple(labels.shape)}")
        emb = self.head(feats)
        partners = random_partners(n, device=emb.device) if self.inter else None
        out = pixel_contrast_loss(emb, labels, self.classes, sampler=self.sampler, n_per_class=self.n_per_class,
                                  partners=partners, temperature=self.temperature)
        stats = {f"{self.name}_anchors_c{c}": out.anchors_per_class[i].detach()
                 for i, c in enumerate(self.classes)}
        stats[f"{self.name}_images"] = float(out.num_images)
        trainer_stats = getattr(ctx.trainer, "pseudo_label_stats", None)
        if trainer_stats:
            stats.update(trainer_stats)
        return out.loss, stats
