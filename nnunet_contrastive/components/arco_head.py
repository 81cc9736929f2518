"""Multi-scale dense projection head over nnU-Net's decoder taps (ARCO's representation, You et al. 2023).

The authors' ``FeatureExtractor`` upsamples every decoder map to full resolution, concatenates them (with 1x1
convolutions and residuals) and projects to a 496-d pixel embedding; a further linear map (``q_representation``)
is applied on the student side only (methods.md §D.1). Here, for the decoder stage outputs ``d_s`` that
:mod:`nnunet_contrastive.components.taps` records (``taps``: which stages, default all)::

    h(p) = sum_s  up_s( W_s d_s )(p) + b        W_s: 1x1 conv of stage s to ``hidden`` channels, at its own scale
    z(p) = W_out  LeakyReLU(h(p))                ``out_dim`` channels; L2 normalisation happens in the loss

A 1x1 convolution commutes with (bi/tri)linear upsampling (both are linear and the interpolation weights sum to
one), so ``sum_s up(W_s d_s)`` equals a 1x1 convolution of the concatenated upsampled maps, at the cost of the
low-resolution maps. The embedding is therefore computed either for the whole image (:meth:`forward`, used for the
teacher: class means need every valid pixel) or only at given pixels (:meth:`at`, used for the student's sampled
anchors: ``grid_sample`` at the pixel centres reproduces ``F.interpolate(..., align_corners=False)`` exactly),
so the gradient-carrying student side never materialises a full-resolution embedding map.

The student-only predictor (the authors' ``q_representation``) is not part of this head: it lives in
:class:`nnunet_contrastive.terms.arco.ARCOContrastTerm`, so that the EMA teacher copies exactly this head.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MultiScaleDenseHead"]

_CONV = {2: nn.Conv2d, 3: nn.Conv3d}
_MODE = {2: "bilinear", 3: "trilinear"}


class MultiScaleDenseHead(nn.Module):
    """Args: in_channels (channels of the tapped decoder stages, in tap order), spatial_dims (2 / 3), hidden,
    out_dim, taps (indices into ``Features.decoder``; stored for the caller), negative_slope."""

    def __init__(self, in_channels: Sequence[int], spatial_dims: int = 2, hidden: int = 128, out_dim: int = 64,
                 taps: Optional[Sequence[int]] = None, negative_slope: float = 0.01):
        super().__init__()
        if spatial_dims not in _CONV:
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}")
        self.in_channels = [int(c) for c in in_channels]
        if not self.in_channels:
            raise ValueError("the head needs at least one decoder tap")
        self.spatial_dims, self.hidden, self.out_dim = spatial_dims, int(hidden), int(out_dim)
        self.taps = list(range(len(self.in_channels))) if taps is None else [int(t) for t in taps]
        if len(self.taps) != len(self.in_channels):
            raise ValueError(f"{len(self.taps)} taps for {len(self.in_channels)} channel counts")
        conv = _CONV[spatial_dims]
        self.reduce = nn.ModuleList([conv(c, self.hidden, 1, bias=False) for c in self.in_channels])
        self.bias = nn.Parameter(torch.zeros(self.hidden))
        self.act = nn.LeakyReLU(negative_slope)
        self.out = nn.Linear(self.hidden, self.out_dim)

    @classmethod
    def for_network(cls, network: nn.Module, hidden: int = 128, out_dim: int = 64,
                    taps: Optional[Sequence[int]] = None) -> "MultiScaleDenseHead":
        """Head for an nnU-Net U-Net: channels of ``decoder.stages`` (from ``encoder.output_channels``) and the
        dimensionality of ``encoder.conv_op``; ``taps`` default: every decoder stage."""
        from nnunet_contrastive.components.heads import unwrap_network

        net = unwrap_network(network)
        enc_ch = list(net.encoder.output_channels)
        dec_ch = enc_ch[:-1][::-1]  # decoder stage s outputs the channels of skip -(s + 2)
        n = len(dec_ch)
        taps = list(range(n)) if taps is None else [t % n for t in taps]
        dims = 3 if issubclass(net.encoder.conv_op, nn.Conv3d) else 2
        head = cls([dec_ch[t] for t in taps], dims, hidden, out_dim, taps)
        ref = next(net.parameters())
        return head.to(device=ref.device, dtype=ref.dtype)

    def select(self, decoder: Sequence[torch.Tensor]) -> list:
        """The tapped maps out of ``Features.decoder``."""
        return [decoder[t] for t in self.taps]

    def _reduced(self, maps: Sequence[torch.Tensor]) -> list:
        if len(maps) != len(self.reduce):
            raise ValueError(f"expected {len(self.reduce)} maps, got {len(maps)}")
        return [r(m) for r, m in zip(self.reduce, maps)]

    def _project(self, h: torch.Tensor) -> torch.Tensor:
        """(..., hidden) -> (..., out_dim)."""
        return self.out(self.act(h + self.bias))

    def forward(self, maps: Sequence[torch.Tensor], size: Sequence[int]) -> torch.Tensor:
        """Embedding map ``(B, out_dim, *size)`` from the tapped maps (any resolutions)."""
        size = tuple(int(s) for s in size)
        h = 0
        for m in self._reduced(maps):
            h = h + (m if tuple(m.shape[2:]) == size else
                     F.interpolate(m, size=size, mode=_MODE[self.spatial_dims], align_corners=False))
        z = self._project(torch.movedim(h, 1, -1))
        return torch.movedim(z, -1, 1)

    def at(self, maps: Sequence[torch.Tensor], size: Sequence[int], index: torch.Tensor) -> torch.Tensor:
        """Embeddings at flat pixel indices: equal to ``forward(maps, size).flatten(2)`` gathered there.

        Args:
            index: long ``(P,)`` flat indices into ``B * prod(size)`` (image-major, as a pooled
                :class:`~nnunet_contrastive.components.samplers.PixelSample`).
        Returns:
            ``(P, out_dim)``.
        """
        size = tuple(int(s) for s in size)
        L = 1
        for s in size:
            L *= s
        b = torch.div(index, L, rounding_mode="floor")
        rest = index - b * L
        coords = []
        for a in range(len(size)):
            stride = 1
            for s in size[a + 1:]:
                stride *= s
            x = torch.div(rest, stride, rounding_mode="floor")
            rest = rest - x * stride
            coords.append(x)
        h = 0
        for m in self._reduced(maps):
            if tuple(m.shape[2:]) == size:
                flat = m.flatten(2)  # (B, hidden, L)
                h = h + flat[b, :, index - b * L]
                continue
            # normalised coordinates of the pixel centres of the output grid (align_corners=False), x-axis first
            g = [((2 * c.to(m.dtype) + 1) / s - 1) for c, s in zip(coords, size)][::-1]
            grid = torch.stack(g, -1).view(1, -1, *([1] * (self.spatial_dims - 1)), self.spatial_dims)
            # one image at a time would loop; instead sample every image's map at every point and pick the own
            # image: points are few (anchors), so the (B, hidden, P) intermediate is small
            sampled = F.grid_sample(m, grid.expand(m.shape[0], *grid.shape[1:]), mode="bilinear",
                                    padding_mode="border", align_corners=False)
            sampled = sampled.reshape(m.shape[0], self.hidden, -1)  # (B, hidden, P)
            h = h + sampled[b, :, torch.arange(index.numel(), device=index.device)]
        if isinstance(h, int):
            raise ValueError("no maps")
        return self._project(h)

    def extra_repr(self) -> str:
        return f"taps={self.taps}, in_channels={self.in_channels}, hidden={self.hidden}, out_dim={self.out_dim}"
