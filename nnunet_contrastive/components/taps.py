"""Decoder taps: one forward pass of nnU-Net's U-Net that also returns the features of every decoder stage.

nnU-Net's ``PlainConvUNet`` / ``ResidualEncoderUNet`` (dynamic_network_architectures) compute
``skips = net.encoder(x)`` (``skips[-1]`` = bottleneck) and ``net.decoder(skips)``; the decoder's ``stages[s]``
(s = 0 next to the bottleneck, the last one at full resolution) produce the features from which ``seg_layers[s]``
predict. Forward hooks on ``decoder.stages`` record those outputs during the one decoder pass, so contrastive terms
read decoder features without a second pass and without touching the network's code or ``state_dict``.

Module groups (:func:`module_groups`): the decoder holds a reference to the encoder (``decoder.encoder``), so
``decoder.parameters()`` includes the encoder's; the groups here are disjoint by construction.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from nnunet_contrastive.components.heads import unwrap_network

__all__ = ["Features", "forward_with_taps", "decoder_of", "module_groups"]


@dataclass
class Features:
    """What one pass produced. skips: encoder outputs (``skips[-1]`` = bottleneck); decoder: outputs of
    ``decoder.stages`` in execution order (index 0 next to the bottleneck, -1 at full resolution), empty for an
    encoder-only pass; outputs: the network output (a list with deep supervision, highest resolution first, or a
    tensor), None for an encoder-only pass."""

    skips: list
    decoder: list = field(default_factory=list)
    outputs: Optional[object] = None

    @property
    def bottleneck(self) -> torch.Tensor:
        return self.skips[-1]

    @property
    def logits(self) -> torch.Tensor:
        """Full-resolution logits (B, C, *spatial)."""
        if self.outputs is None:
            raise ValueError("encoder-only pass: no logits")
        return self.outputs[0] if isinstance(self.outputs, (list, tuple)) else self.outputs

    @property
    def full(self) -> bool:
        return self.outputs is not None

    def select(self, rows: torch.Tensor) -> "Features":
        """The same features for a subset of the batch rows."""
        pick = lambda t: t[rows]  # noqa: E731
        out = None if self.outputs is None else (
            [pick(o) for o in self.outputs] if isinstance(self.outputs, (list, tuple)) else pick(self.outputs))
        return Features([pick(s) for s in self.skips], [pick(d) for d in self.decoder], out)

    def map(self, fn) -> "Features":
        """Apply ``fn`` to every tensor (e.g. flip back)."""
        out = None if self.outputs is None else (
            [fn(o) for o in self.outputs] if isinstance(self.outputs, (list, tuple)) else fn(self.outputs))
        return Features([fn(s) for s in self.skips], [fn(d) for d in self.decoder], out)


def decoder_of(network: nn.Module) -> nn.Module:
    net = unwrap_network(network)
    dec = getattr(net, "decoder", None)
    if dec is None or not hasattr(dec, "stages"):
        raise ValueError(f"{type(net).__name__} has no decoder with `stages`: expected an nnU-Net U-Net "
                         f"(PlainConvUNet, ResidualEncoderUNet, ...)")
    return dec


def forward_with_taps(network: nn.Module, x: torch.Tensor, skips: Optional[list] = None,
                      encoder_only: bool = False) -> Features:
    """Encoder (unless ``skips`` are given, e.g. from a cached encoder-only pass) and decoder with taps."""
    net = unwrap_network(network)
    if skips is None:
        skips = net.encoder(x)
        skips = list(skips) if isinstance(skips, (list, tuple)) else [skips]
    if encoder_only:
        return Features(skips=skips)
    dec = decoder_of(net)
    recorded: list = []
    hooks = [st.register_forward_hook(lambda _m, _i, out: recorded.append(out)) for st in dec.stages]
    try:
        outputs = dec(skips)
    finally:
        for h in hooks:
            h.remove()
    return Features(skips=skips, decoder=recorded, outputs=outputs)


def module_groups(network: nn.Module) -> dict[str, list[nn.Parameter]]:
    """Disjoint parameter groups of a U-Net: "encoder", "decoder" (everything else: transposed convs, stages,
    seg layers), and "decoder.<s>" for decoder stage s (its transposed conv, conv stage and seg layer)."""
    net = unwrap_network(network)
    enc_ids = {id(p) for p in net.encoder.parameters()}
    groups = {"encoder": list(net.encoder.parameters()),
              "decoder": [p for p in net.parameters() if id(p) not in enc_ids]}
    dec = decoder_of(net)
    for s in range(len(dec.stages)):
        params = []
        for mods in ("transpconvs", "stages", "seg_layers"):
            seq = getattr(dec, mods, None)
            if seq is not None and s < len(seq):
                params += [p for p in seq[s].parameters() if id(p) not in enc_ids]
        groups[f"decoder.{s}"] = params
    return groups
