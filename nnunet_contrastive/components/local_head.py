"""Local projection head g_2 and the region grid of Chaitanya et al.'s local contrastive loss (NeurIPS 2020, §3.3).

Head (the paper's g_2: two 1x1 convolutions, batch norm and ReLU after the first): on a decoder feature map
(B, C, *spatial) -> 1x1 conv (C -> hidden) -> BatchNorm -> ReLU -> 1x1 conv (hidden -> out_dim) -> (B, out_dim,
*spatial). Defaults hidden = out_dim = C, as in the authors' code (C = 64 at l = 3 for their U-Net).

Regions (:func:`region_grid`, :meth:`LocalProjectionHead.regions`): the paper divides the feature map into A regions
of K x K (A = 13, K = 3 in its experiments; the authors' code picks 13 windows and their negatives from hand-written
index tables for a 192 x 192 input, which is not a spec). We use a REGULAR GRID OF WINDOWS, per spatial axis of
length L:
  * window size K_eff = min(K, L);
  * g_eff = min(g, L // K_eff) windows (g = ``grid`` per axis, 4 by default: 16 regions in 2D, about the paper's 13);
  * top-left corners ``round(i * (L - K_eff) / (g_eff - 1))`` for i = 0..g_eff-1 (0 when g_eff = 1): the first window
    touches the start of the axis, the last one its end, evenly spread in between. Since g_eff <= L // K_eff the
    spacing is >= K_eff, so windows NEVER overlap (a negative region shares no pixel with its anchor region).
The regions are the Cartesian product over the axes (row-major order), g_eff_y * g_eff_x of them in 2D. A region's
representation f(u, v) in R^{out_dim} is the mean of the head's output over its window (the paper: f(u, v) in R^C).
The authors' code (``wgt_en=1``) instead flattens each K x K x C window and maps it with an extra dense layer that
the paper does not describe (methods.md §B.5); we do not add it.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["region_grid", "region_starts", "LocalProjectionHead", "decoder_stage_channels"]

_NORMS = {2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
_CONVS = {2: nn.Conv2d, 3: nn.Conv3d}
_POOLS = {2: F.avg_pool2d, 3: F.avg_pool3d}


def region_starts(length: int, size: int, grid: int) -> tuple[list[int], int]:
    """Window corners along one axis of ``length``: (starts, effective window size); see the module doc."""
    if length < 1 or size < 1 or grid < 1:
        raise ValueError(f"length, size and grid must be >= 1, got {length}, {size}, {grid}")
    k = min(size, length)
    g = min(grid, length // k)
    if g == 1:
        return [0], k
    return [int(round(i * (length - k) / (g - 1))) for i in range(g)], k


def region_grid(spatial: Sequence[int], size: int = 3, grid: int = 4) -> tuple[list[list[int]], list[int]]:
    """Per axis of ``spatial``: the window corners and the effective window size."""
    starts, sizes = [], []
    for length in spatial:
        s, k = region_starts(int(length), size, grid)
        starts.append(s)
        sizes.append(k)
    return starts, sizes


def decoder_stage_channels(network: nn.Module, stage: int) -> int:
    """Output channels of ``decoder.stages[stage]`` (0 next to the bottleneck) of an nnU-Net U-Net: the encoder's
    channels one level above, ``encoder.output_channels[-(stage + 2)]`` (dynamic_network_architectures'
    UNetDecoder); falls back to the stage's last conv layer."""
    from nnunet_contrastive.components.heads import unwrap_network
    from nnunet_contrastive.components.taps import decoder_of

    net = unwrap_network(network)
    dec = decoder_of(net)
    if not 0 <= stage < len(dec.stages):
        raise ValueError(f"decoder stage {stage} out of range: the network has {len(dec.stages)} decoder stages")
    ch = getattr(net.encoder, "output_channels", None)
    if isinstance(ch, (list, tuple)) and len(ch) >= stage + 2:
        return int(ch[-(stage + 2)])
    convs = [m for m in dec.stages[stage].modules() if isinstance(m, (nn.Conv2d, nn.Conv3d))]
    if not convs:
        raise ValueError(f"cannot find the output channels of decoder stage {stage}")
    return int(convs[-1].out_channels)


class LocalProjectionHead(nn.Module):
    """g_2 over a decoder feature map plus the region pooling. ``forward(features) -> (B, out_dim, *spatial)``;
    ``regions(features) -> (B, A, out_dim)``."""

    def __init__(self, in_channels: int, spatial_dims: int = 2, out_dim: Optional[int] = None,
                 hidden_dim: Optional[int] = None, region_size: int = 3, grid: int = 4):
        super().__init__()
        if spatial_dims not in _CONVS:
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}")
        if not isinstance(in_channels, int) or in_channels < 1:
            raise ValueError(f"in_channels must be a positive int, got {in_channels!r}")
        out_dim = in_channels if out_dim is None else out_dim
        hidden_dim = in_channels if hidden_dim is None else hidden_dim
        conv, norm = _CONVS[spatial_dims], _NORMS[spatial_dims]
        self.in_channels, self.spatial_dims, self.out_dim, self.hidden_dim = in_channels, spatial_dims, out_dim, \
            hidden_dim
        self.region_size, self.grid = int(region_size), int(grid)
        self.net = nn.Sequential(conv(in_channels, hidden_dim, 1, bias=False), norm(hidden_dim), nn.ReLU(inplace=True),
                                 conv(hidden_dim, out_dim, 1, bias=False))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if features.dim() != self.spatial_dims + 2 or features.shape[1] != self.in_channels:
            raise ValueError(f"expected (B, {self.in_channels}, {self.spatial_dims} spatial dims), got "
                             f"{tuple(features.shape)}")
        return self.net(features)

    def pool_regions(self, maps: torch.Tensor) -> torch.Tensor:
        """(B, D, *spatial) -> (B, A, D): the mean over each window of the regular grid (module doc)."""
        starts, sizes = region_grid(maps.shape[2:], self.region_size, self.grid)
        pooled = _POOLS[self.spatial_dims](maps, kernel_size=tuple(sizes), stride=1)  # mean of every window
        idx = [torch.as_tensor(s, device=maps.device) for s in starts]
        for axis, ix in enumerate(idx):
            pooled = pooled.index_select(2 + axis, ix)
        return pooled.flatten(2).transpose(1, 2)

    def regions(self, features: torch.Tensor) -> torch.Tensor:
        return self.pool_regions(self.forward(features))

    def num_regions(self, spatial: Sequence[int]) -> int:
        starts, _ = region_grid(spatial, self.region_size, self.grid)
        n = 1
        for s in starts:
            n *= len(s)
        return n

    def extra_repr(self) -> str:
        return (f"in_channels={self.in_channels}, hidden={self.hidden_dim}, out_dim={self.out_dim}, "
                f"region_size={self.region_size}, grid={self.grid}")

    @classmethod
    def for_decoder_stage(cls, network: nn.Module, stage: int, **kwargs) -> "LocalProjectionHead":
        """A head for the output of ``decoder.stages[stage]`` of ``network``, on the network's device."""
        from nnunet_contrastive.components.heads import unwrap_network

        net = unwrap_network(network)
        conv_op = getattr(net.encoder, "conv_op", None)
        dims = 3 if isinstance(conv_op, type) and issubclass(conv_op, nn.Conv3d) else 2
        head = cls(decoder_stage_channels(net, stage), spatial_dims=dims, **kwargs)
        ref = next(iter(net.parameters()), None)
        return head if ref is None else head.to(ref.device)
