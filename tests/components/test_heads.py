"""Tests for nnunet_contrastive.components.heads on real (tiny) dynamic_network_architectures networks built the way
nnU-Net builds them (nnunetv2.utilities.get_network_from_plans with plans-style arch kwargs)."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
from nnunet_contrastive.components.heads import GlobalProjectionHead, encode, unwrap_network

FEATURES = [4, 8, 16, 32]


def build_unet(dim=2, arch="PlainConvUNet", features=FEATURES, deep_supervision=True):
    """Tiny nnU-Net-style network: InstanceNorm(affine) -> LeakyReLU, stride-2 downsampling, He init."""
    n = len(features)
    kwargs = {
        "n_stages": n,
        "features_per_stage": list(features),
        "conv_op": f"torch.nn.modules.conv.Conv{dim}d",
        "kernel_sizes": [[3] * dim] * n,
        "strides": [[1] * dim] + [[2] * dim] * (n - 1),
        "n_conv_per_stage_decoder": [1] * (n - 1),
        "conv_bias": True,
        "norm_op": f"torch.nn.modules.instancenorm.InstanceNorm{dim}d",
        "norm_op_kwargs": {"eps": 1e-05, "affine": True},
        "dropout_op": None,
        "dropout_op_kwargs": None,
        "nonlin": "torch.nn.LeakyReLU",
        "nonlin_kwargs": {"inplace": True},
    }
    if arch == "PlainConvUNet":
        kwargs["n_conv_per_stage"] = [2] * n
    else:
        kwargs["n_blocks_per_stage"] = [1] * n
    return get_network_from_plans(
        f"dynamic_network_architectures.architectures.unet.{arch}", kwargs,
        ["conv_op", "norm_op", "dropout_op", "nonlin"], input_channels=1, output_channels=3,
        allow_init=True, deep_supervision=deep_supervision)


@pytest.fixture(scope="module")
def net2d():
    torch.manual_seed(0)
    return build_unet(2)


def test_for_network_shapes_and_unit_norm(net2d):
    head = GlobalProjectionHead.for_network(net2d)
    assert (head.in_channels, head.spatial_dims, head.out_dim) == (FEATURES[-1], 2, 256)
    assert head.grid_size == (2, 2) and head.in_features == FEATURES[-1] * 4
    x = torch.randn(5, 1, 32, 32)
    bottleneck = encode(net2d, x)
    assert bottleneck.shape == (5, FEATURES[-1], 4, 4)
    z = head(bottleneck)
    assert z.shape == (5, 256)
    torch.testing.assert_close(z.norm(dim=1), torch.ones(5))
    # the MLP is Linear -> LeakyReLU(0.01) -> Linear, as in the paper / authors' head
    lin1, act, lin2 = head.mlp
    assert isinstance(lin1, nn.Linear) and isinstance(lin2, nn.Linear) and act.negative_slope == 0.01
    # independent reference: pool / flatten / MLP / normalise by hand
    ref = F.adaptive_avg_pool2d(bottleneck, 2).reshape(5, -1)
    ref = lin2(F.leaky_relu(lin1(ref), 0.01))
    ref = ref / ref.norm(dim=1, keepdim=True)
    torch.testing.assert_close(z, ref)


def test_configurable_sizes(net2d):
    head = GlobalProjectionHead.for_network(net2d, out_dim=16, hidden_dim=7, grid_size=3)
    assert head.mlp[0].in_features == FEATURES[-1] * 9 and head.mlp[0].out_features == 7
    assert head(torch.randn(2, FEATURES[-1], 4, 4)).shape == (2, 16)
    # grid larger than the bottleneck still works (adaptive pooling repeats)
    assert head(torch.randn(2, FEATURES[-1], 2, 2)).shape == (2, 16)


def test_encode_is_bottleneck_and_grad_reaches_encoder_only(net2d):
    net2d.zero_grad(set_to_none=True)
    x = torch.randn(4, 1, 32, 32)
    b = encode(net2d, x)
    torch.testing.assert_close(b, net2d.encoder(x)[-1])
    head = GlobalProjectionHead.for_network(net2d)
    z = head(b)
    loss = (z[0] * z[1]).sum() - (z[2] * z[3]).sum()
    loss.backward()
    first_conv = net2d.encoder.stages[0][0].convs[0].conv
    deepest_conv = net2d.encoder.stages[-1][0].convs[-1].conv
    for p in (first_conv.weight, deepest_conv.weight, head.mlp[0].weight):
        assert p.grad is not None and p.grad.abs().sum() > 0
    # (UNetDecoder keeps a reference to the encoder: named_parameters() lists shared ones under "encoder.")
    decoder_only = [p for n, p in net2d.named_parameters() if n.startswith("decoder.")]
    assert decoder_only and all(p.grad is None for p in decoder_only)
    net2d.zero_grad(set_to_none=True)


def test_instance_norm_bottleneck_makes_gap_degenerate_grid_is_not(net2d):
    torch.manual_seed(1)
    x = torch.randn(16, 1, 32, 32)  # 16 different random images
    with torch.no_grad():
        b = encode(net2d, x)
    within_image_std = b.std(dim=(2, 3)).mean()            # spatial spread inside one image
    gap_std = b.mean(dim=(2, 3)).std(dim=0).mean()          # across images, plain global average pooling
    grid_std = F.adaptive_avg_pool2d(b, 2).flatten(1).std(dim=0).mean()
    # InstanceNorm->LeakyReLU: the per-channel spatial mean barely changes between images
    assert gap_std < 0.1 * within_image_std
    assert grid_std > 4 * gap_std
    # the head's own pooling equals the grid pooling
    head = GlobalProjectionHead.for_network(net2d)
    torch.testing.assert_close(head.pool(b), F.adaptive_avg_pool2d(b, 2).flatten(1))
    # and its embeddings differ across images: clearly non-zero per-dimension spread, not all-equal rows
    with torch.no_grad():
        z = head(b)
    assert z.std(dim=0).mean() > 1e-2
    cos = z @ z.T
    off_diag = cos[~torch.eye(16, dtype=torch.bool)]
    assert off_diag.max() < 0.9999


def test_3d_and_residual_encoder():
    torch.manual_seed(0)
    net3d = build_unet(3, features=[2, 4, 8])
    head = GlobalProjectionHead.for_network(net3d, out_dim=8)
    assert (head.in_channels, head.spatial_dims, head.in_features) == (8, 3, 64)
    z = head(encode(net3d, torch.randn(2, 1, 8, 8, 8)))
    assert z.shape == (2, 8)
    torch.testing.assert_close(z.norm(dim=1), torch.ones(2))

    res = build_unet(2, arch="ResidualEncoderUNet", features=[4, 8, 12])
    head = GlobalProjectionHead.for_network(res)
    assert head.in_channels == 12 and head.spatial_dims == 2
    assert head(encode(res, torch.randn(2, 1, 16, 16))).shape == (2, 256)


class _NoMetaNet(nn.Module):
    """An encoder without `output_channels` / `conv_op`: forces the dry-run path."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Conv2d(2, 6, 3, padding=1), nn.BatchNorm2d(6), nn.LeakyReLU(),
                                     nn.Conv2d(6, 5, 3, stride=2, padding=1))
        self.decoder = nn.Identity()


def test_for_network_dry_run_fallback_restores_state():
    net = _NoMetaNet()
    net.train()
    bn = net.encoder[1]
    before = bn.running_mean.clone()
    head = GlobalProjectionHead.for_network(net)
    assert head.in_channels == 5 and head.spatial_dims == 2
    assert net.training and bn.training
    torch.testing.assert_close(bn.running_mean, before)  # dry run did not touch running stats
    head2 = GlobalProjectionHead.for_network(net, example_input=torch.zeros(1, 2, 8, 8))
    assert head2.in_channels == 5
    assert head(encode(net, torch.randn(3, 2, 8, 8))).shape == (3, 256)


def test_unwrap_compile_dataparallel_and_ddp(net2d, tmp_path):
    compiled = torch.compile(net2d)  # lazy: nothing is compiled until it is called
    assert compiled is not net2d and unwrap_network(compiled) is net2d
    dp = nn.DataParallel(compiled)
    assert unwrap_network(dp) is net2d
    assert GlobalProjectionHead.for_network(dp).in_channels == FEATURES[-1]
    x = torch.randn(2, 1, 32, 32)
    torch.testing.assert_close(encode(dp, x), net2d.encoder(x)[-1])

    import torch.distributed as dist
    if not dist.is_available():
        pytest.skip("torch.distributed not available")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        small = nn.Sequential(nn.Linear(2, 2))
        ddp = nn.parallel.DistributedDataParallel(torch.compile(small))
        assert unwrap_network(ddp) is small
    finally:
        dist.destroy_process_group()


def test_value_errors(net2d):
    head = GlobalProjectionHead(8, spatial_dims=2)
    with pytest.raises(ValueError, match="4-d"):
        head(torch.randn(2, 8, 4))
    with pytest.raises(ValueError, match="4-d"):
        head(torch.randn(2, 8, 4, 4, 4))
    with pytest.raises(ValueError, match="channels"):
        head(torch.randn(2, 7, 4, 4))
    with pytest.raises(ValueError):
        head("not a tensor")
    with pytest.raises(ValueError):
        head(torch.randn(0, 8, 4, 4))
    with pytest.raises(ValueError, match="spatial_dims"):
        GlobalProjectionHead(8, spatial_dims=1)
    with pytest.raises(ValueError, match="grid_size"):
        GlobalProjectionHead(8, grid_size=0)
    with pytest.raises(ValueError, match="grid_size"):
        GlobalProjectionHead(8, spatial_dims=3, grid_size=(2, 2))
    with pytest.raises(ValueError, match="in_channels"):
        GlobalProjectionHead(0)
    with pytest.raises(ValueError, match="encoder"):
        GlobalProjectionHead.for_network(nn.Linear(3, 3))
    with pytest.raises(ValueError, match="encoder"):
        encode(nn.Linear(3, 3), torch.randn(1, 1, 4, 4))
    with pytest.raises(ValueError, match="2D"):
        encode(net2d, torch.randn(1, 1, 8, 8, 8))
    with pytest.raises(ValueError):
        encode(net2d, torch.randn(1, 32, 32))
    with pytest.raises(ValueError):
        unwrap_network("net")
