"""Decoder taps return the decoder stages' real outputs; module groups are disjoint and cover the network."""
import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet

from nnunet_contrastive.components.taps import forward_with_taps, module_groups


def _net(deep_supervision=True):
    torch.manual_seed(0)
    return PlainConvUNet(1, 3, (8, 16, 32), torch.nn.Conv2d, 3, (1, 2, 2), 2, 3, (2, 2), True,
                         torch.nn.InstanceNorm2d, {"eps": 1e-5, "affine": True}, None, None, torch.nn.LeakyReLU,
                         {"inplace": True}, deep_supervision=deep_supervision)


def test_taps_equal_the_decoder_stages_computed_by_hand_and_outputs_are_unchanged():
    net = _net().eval()
    x = torch.randn(2, 1, 16, 16)
    f = forward_with_taps(net, x)
    with torch.no_grad():  # the decoder's computation written out: transposed conv, concat skip, conv stage
        skips = net.encoder(x)
        lres, expected = skips[-1], []
        for s in range(len(net.decoder.stages)):
            h = net.decoder.stages[s](torch.cat((net.decoder.transpconvs[s](lres), skips[-(s + 2)]), 1))
            expected.append(h)
            lres = h
        stock = net(x)
    assert len(f.decoder) == len(expected) == 2
    for got, want in zip(f.decoder, expected):
        torch.testing.assert_close(got, want)
    assert f.decoder[-1].shape[-2:] == x.shape[-2:]
    for got, want in zip(f.outputs, stock):
        torch.testing.assert_close(got, want)
    torch.testing.assert_close(f.bottleneck, skips[-1])
    assert not net.decoder.stages[0]._forward_hooks  # hooks removed after the pass


def test_encoder_only_pass_and_reuse_of_skips():
    net = _net().eval()
    x = torch.randn(1, 1, 16, 16)
    enc = forward_with_taps(net, x, encoder_only=True)
    assert enc.outputs is None and enc.decoder == []
    full = forward_with_taps(net, x, skips=enc.skips)
    torch.testing.assert_close(full.logits, net(x)[0])


def test_module_groups_are_disjoint_and_complete():
    net = _net()
    g = module_groups(net)
    enc, dec = {id(p) for p in g["encoder"]}, {id(p) for p in g["decoder"]}
    assert not enc & dec and enc | dec == {id(p) for p in net.parameters()}
    stages = [{id(p) for p in g[f"decoder.{s}"]} for s in range(2)]
    assert all(s and s <= dec for s in stages) and not stages[0] & stages[1]
