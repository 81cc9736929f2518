"""Global projection head on the bottleneck of nnU-Net's encoder (Peng et al., NeurIPS 2021, §4.2).

The paper projects the encoder output to a 256-d vector with an MLP with one hidden layer and a LeakyReLU,
then L2-normalises it. The authors' head (methods.md §A.4) starts with a *global average pool*; we do not:
every stage of nnU-Net's ``PlainConvUNet`` / ``ResidualEncoderUNet`` ends in InstanceNorm -> LeakyReLU, so
each bottleneck channel is standardised over its spatial positions and its spatial mean is nearly the same
for every image (nnunet-internals.md §4). A head on top of such a pooled vector sees almost no signal.
We therefore pool to a small fixed grid (adaptive average pooling to ``grid_size`` cells per spatial axis,
2 by default), flatten, and apply the MLP. The grid keeps the coarse spatial layout, which InstanceNorm does
not remove, and the input size of the MLP no longer depends on the patch size.

Shapes (``B`` batch, ``C`` bottleneck channels, ``g`` grid size, ``n`` spatial dims = 2 or 3)::

    bottleneck (B, C, h, w) or (B, C, d, h, w)
      -> adaptive_avg_pool   (B, C, g, g[, g])
      -> flatten             (B, C * g**n)
      -> Linear -> LeakyReLU(0.01) -> Linear
      -> L2 normalise        (B, out_dim)        every row has unit Euclidean norm

Public API: :func:`unwrap_network`, :func:`encode`, :class:`GlobalProjectionHead`.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["unwrap_network", "encode", "GlobalProjectionHead"]

_POOL_FNS = {2: F.adaptive_avg_pool2d, 3: F.adaptive_avg_pool3d}
_CONV_DIMS = ((nn.Conv3d, 3), (nn.Conv2d, 2), (nn.Conv1d, 1))


def unwrap_network(network: nn.Module) -> nn.Module:
    """Return the plain module under ``torch.compile`` / DDP / DataParallel wrappers.

    Peels ``OptimizedModule._orig_mod`` (torch.compile) and ``DistributedDataParallel.module`` /
    ``DataParallel.module`` repeatedly, in any nesting order (nnU-Net compiles first, then wraps in DDP).
    A module without wrappers is returned unchanged.
    """
    if not isinstance(network, nn.Module):
        raise ValueError(f"expected a torch.nn.Module, got {type(network).__name__}")
    parallel_types = (nn.parallel.DistributedDataParallel, nn.DataParallel)
    net = network
    for _ in range(16):  # wrappers never nest deeper than a few levels; the bound only guards against cycles
        if isinstance(net, parallel_types):
            net = net.module
        elif hasattr(net, "_orig_mod") and isinstance(getattr(net, "_orig_mod"), nn.Module):
            net = net._orig_mod
        else:
            return net
    raise ValueError("could not unwrap the network: wrappers nested more than 16 levels deep")


def _get_encoder(network: nn.Module) -> nn.Module:
    net = unwrap_network(network)
    encoder = getattr(net, "encoder", None)
    if not isinstance(encoder, nn.Module):
        raise ValueError(
            f"{type(net).__name__} has no `encoder` submodule; expected an nnU-Net / dynamic_network_architectures "
            "U-Net (PlainConvUNet, ResidualEncoderUNet, ...)"
        )
    return encoder


def encode(network: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Bottleneck features of ``network`` for input ``x``.

    Calls ``unwrap_network(network).encoder(x)`` and returns the deepest output (``skips[-1]``; an encoder that
    returns a single tensor is accepted too). The wrappers' ``forward`` is bypassed: under ``torch.compile`` the
    encoder runs eagerly, and under DDP this call alone triggers no gradient all-reduce. Parameters still get
    their gradients, and DDP synchronises them when the same backward pass also goes through a DDP forward
    (e.g. the segmentation loss of the same step).

    Args:
        network: the segmentation network (possibly compiled / DDP-wrapped), with an ``encoder`` submodule.
        x: input batch, (B, C_in, H, W) for 2D or (B, C_in, D, H, W) for 3D networks.

    Returns:
        The bottleneck tensor, (B, C, h, w) or (B, C, d, h, w).
    """
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() not in (4, 5):
        raise ValueError(f"x must have shape (B, C, H, W) or (B, C, D, H, W); got {tuple(x.shape)}")
    encoder = _get_encoder(network)
    conv_op = getattr(encoder, "conv_op", None)
    if isinstance(conv_op, type):
        dim = next((d for t, d in _CONV_DIMS if issubclass(conv_op, t)), None)
        if dim is not None and x.dim() != dim + 2:
            raise ValueError(f"the encoder is {dim}D (conv_op {conv_op.__name__}) but x has shape {tuple(x.shape)}")
    out = encoder(x)
    if isinstance(out, (list, tuple)):
        if len(out) == 0:
            raise ValueError("the encoder returned an empty list of skips")
        out = out[-1]
    if not isinstance(out, torch.Tensor):
        raise ValueError(f"the encoder returned {type(out).__name__}, expected a tensor or a list of tensors")
    return out


class GlobalProjectionHead(nn.Module):
    """Grid-pooled MLP projection head: bottleneck -> L2-normalised embedding.

    Args:
        in_channels: ``C``, channels of the bottleneck (``encoder.output_channels[-1]`` in nnU-Net).
        spatial_dims: 2 for (B, C, h, w) inputs, 3 for (B, C, d, h, w).
        out_dim: embedding size (256 in the paper, §4.2).
        hidden_dim: width of the single hidden layer. Default ``None`` means ``in_channels``, as in the authors'
            head where the hidden width equals the bottleneck width (256 -> 256 -> 256).
        grid_size: cells per spatial axis of the adaptive average pool (default :attr:`DEFAULT_GRID_SIZE`
            = 2). ``1`` is plain global average pooling, which is near-constant on nnU-Net's InstanceNorm ->
            LeakyReLU bottleneck; it is allowed only for comparison. A tuple gives one size per axis.
        negative_slope: LeakyReLU slope of the hidden layer (0.01, as in the authors' code).

    Forward: ``(B, C, h, w)`` / ``(B, C, d, h, w)`` -> ``(B, out_dim)`` with unit-norm rows.
    A spatial extent smaller than the grid is allowed (adaptive pooling then repeats values).
    """

    DEFAULT_GRID_SIZE: int = 2
    DEFAULT_OUT_DIM: int = 256

    def __init__(
        self,
        in_channels: int,
        spatial_dims: int = 2,
        out_dim: int = DEFAULT_OUT_DIM,
        hidden_dim: Optional[int] = None,
        grid_size: Union[int, Sequence[int], None] = None,
        negative_slope: float = 0.01,
    ):
        super().__init__()
        if not isinstance(in_channels, int) or in_channels < 1:
            raise ValueError(f"in_channels must be a positive int, got {in_channels!r}")
        if spatial_dims not in _POOL_FNS:
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}")
        if not isinstance(out_dim, int) or out_dim < 1:
            raise ValueError(f"out_dim must be a positive int, got {out_dim!r}")
        hidden_dim = in_channels if hidden_dim is None else hidden_dim
        if not isinstance(hidden_dim, int) or hidden_dim < 1:
            raise ValueError(f"hidden_dim must be a positive int, got {hidden_dim!r}")
        grid = self.DEFAULT_GRID_SIZE if grid_size is None else grid_size
        grid = (grid,) * spatial_dims if isinstance(grid, int) else tuple(grid)
        if len(grid) != spatial_dims or not all(isinstance(g, int) and g >= 1 for g in grid):
            raise ValueError(f"grid_size must be a positive int or {spatial_dims} positive ints, got {grid_size!r}")

        self.in_channels = in_channels
        self.spatial_dims = spatial_dims
        self.out_dim = out_dim
        self.hidden_dim = hidden_dim
        self.grid_size: Tuple[int, ...] = grid
        n_cells = 1
        for g in grid:
            n_cells *= g
        self.in_features = in_channels * n_cells
        self.mlp = nn.Sequential(
            nn.Linear(self.in_features, hidden_dim),
            nn.LeakyReLU(negative_slope),
            nn.Linear(hidden_dim, out_dim),
        )

    def pool(self, features: torch.Tensor) -> torch.Tensor:
        """Validate and grid-pool: (B, C, *spatial) -> (B, C * prod(grid_size)), before the MLP."""
        if not isinstance(features, torch.Tensor):
            raise ValueError(f"features must be a torch.Tensor, got {type(features).__name__}")
        expected_dim = 2 + self.spatial_dims
        if features.dim() != expected_dim:
            layout = "(B, C, h, w)" if self.spatial_dims == 2 else "(B, C, d, h, w)"
            raise ValueError(f"expected a {expected_dim}-d bottleneck {layout}, got shape {tuple(features.shape)}")
        if features.shape[1] != self.in_channels:
            raise ValueError(f"expected {self.in_channels} channels, got shape {tuple(features.shape)}")
        if features.shape[0] == 0 or any(s == 0 for s in features.shape[2:]):
            raise ValueError(f"empty bottleneck tensor, shape {tuple(features.shape)}")
        pooled = _POOL_FNS[self.spatial_dims](features, self.grid_size)
        return pooled.flatten(1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) or (B, C, d, h, w) -> (B, out_dim), L2-normalised along dim 1."""
        z = self.mlp(self.pool(features))
        return F.normalize(z, p=2, dim=1, eps=1e-12)

    def extra_repr(self) -> str:
        return (f"in_channels={self.in_channels}, spatial_dims={self.spatial_dims}, grid_size={self.grid_size}, "
                f"hidden_dim={self.hidden_dim}, out_dim={self.out_dim}")

    @classmethod
    def for_network(
        cls,
        network: nn.Module,
        out_dim: int = DEFAULT_OUT_DIM,
        hidden_dim: Optional[int] = None,
        grid_size: Union[int, Sequence[int], None] = None,
        negative_slope: float = 0.01,
        example_input: Optional[torch.Tensor] = None,
    ) -> "GlobalProjectionHead":
        """Build a head matching ``network``'s encoder, on the network's device and dtype.

        ``C`` and the dimensionality come from ``encoder.output_channels[-1]`` and ``encoder.conv_op`` (set by
        dynamic_network_architectures' PlainConvEncoder and ResidualEncoder). Otherwise they are found by a
        dry forward pass of the encoder, without gradients and in eval mode (training flags are restored), on
        ``example_input`` or, if none is given, on a zero tensor with the input channels of the encoder's first
        convolution and 64 voxels per axis (32 for 3D). Wrapped networks (DDP / torch.compile) are unwrapped.
        """
        encoder = _get_encoder(network)
        channels = getattr(encoder, "output_channels", None)
        conv_op = getattr(encoder, "conv_op", None)
        in_channels = spatial_dims = None
        if isinstance(channels, (list, tuple)) and len(channels) > 0 and isinstance(conv_op, type):
            spatial_dims = next((d for t, d in _CONV_DIMS if issubclass(conv_op, t)), None)
            in_channels = int(channels[-1])
        if in_channels is None or spatial_dims not in _POOL_FNS:
            in_channels, spatial_dims = cls._infer_by_dry_run(network, encoder, example_input)
        head = cls(in_channels, spatial_dims=spatial_dims, out_dim=out_dim, hidden_dim=hidden_dim,
                   grid_size=grid_size, negative_slope=negative_slope)
        ref = next(iter(encoder.parameters()), None)
        if ref is not None:
            head = head.to(device=ref.device, dtype=ref.dtype if ref.is_floating_point() else None)
        return head

    @staticmethod
    def _infer_by_dry_run(network: nn.Module, encoder: nn.Module,
                          example_input: Optional[torch.Tensor]) -> Tuple[int, int]:
        ref = next(iter(encoder.parameters()), None)
        if example_input is None:
            first_conv = next((m for m in encoder.modules() if isinstance(m, (nn.Conv2d, nn.Conv3d))), None)
            if first_conv is None:
                raise ValueError("cannot infer the bottleneck shape: the encoder has no conv layer and no "
                                 "example_input was given")
            dim = 3 if isinstance(first_conv, nn.Conv3d) else 2
            size = 32 if dim == 3 else 64
            example_input = torch.zeros((1, first_conv.in_channels) + (size,) * dim,
                                        device=first_conv.weight.device, dtype=first_conv.weight.dtype)
        elif ref is not None:
            example_input = example_input.to(ref.device)
        modes = {m: m.training for m in encoder.modules()}
        try:
            encoder.eval()
            with torch.no_grad():
                bottleneck = encode(network, example_input)
        finally:
            for m, mode in modes.items():
                m.training = mode
        if bottleneck.dim() not in (4, 5):
            raise ValueError(f"the encoder's bottleneck has shape {tuple(bottleneck.shape)}; expected 4-d or 5-d")
        return int(bottleneck.shape[1]), bottleneck.dim() - 2
