"""SLOW reference for benchmarks only: the straightforward "one loss per meta-label" implementation.

:func:`per_label_loop_supcon` loops over the M meta-labels in Python and, for each one, recomputes the similarity
matrix, the log-softmax, the masks and the self-paced weights from scratch -- what a direct transcription of Eq. 2 /
Eq. 3 applied separately to each meta-label does. It computes the same value as
:func:`nnunet_contrastive.losses.supcon_loss` (same conventions: self-pair excluded, other view always positive,
weights from the detached pair loss on the numerator only, normalisation by |P(i)|, ``sum_k lambda_k L^k``), and
exists so that benchmarks can time the single-similarity-matrix implementation against it. Do not use it for
training. Inputs are assumed valid (no argument checking).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor

__all__ = ["per_label_loop_supcon"]


def per_label_loop_supcon(z1: Tensor, z2: Tensor, labels: Optional[Tensor] = None, *, temperature: float = 0.07,
                          gamma: Optional[Sequence[Optional[float]]] = None, weighting: str = "linear",
                          label_weights: Optional[Sequence[float]] = None) -> tuple:
    """Slow per-meta-label loop. z1, z2: (N, D); labels: (N,), (N, M) or None (SimCLR); gamma: None, a number or M
    values (None / inf = no pacing); weighting "hard" or "linear"/"soft". Returns ``(loss, [L^1, ..., L^M])``."""
    n = z1.shape[0]
    if labels is None:
        labels = torch.arange(n, device=z1.device)
    if labels.ndim == 1:
        labels = labels.unsqueeze(1)
    m = labels.shape[1]
    gammas = list(gamma) if isinstance(gamma, (list, tuple)) else [gamma] * m
    lambdas = [1.0] * m if label_weights is None else [float(v) for v in label_weights]
    dtype = torch.float64 if torch.float64 in (z1.dtype, z2.dtype) else torch.float32

    total = torch.zeros((), dtype=dtype, device=z1.device)
    per_label = []
    for k in range(m):
        with torch.autocast(device_type=z1.device.type, enabled=False):
            z = torch.nn.functional.normalize(torch.cat([z1, z2]).to(dtype), dim=1)
            logits = z @ z.T / temperature
            self_mask = torch.eye(2 * n, dtype=torch.bool, device=z.device)
            log_prob = logits - torch.logsumexp(logits.masked_fill(self_mask, -math.inf), dim=1, keepdim=True)
            y = torch.cat([labels[:, k], labels[:, k]])
            pos = (y[:, None] == y[None, :]) & ~self_mask
            g = gammas[k]
            if g is None or math.isinf(g):
                w = torch.ones_like(log_prob)
            elif weighting == "hard":
                w = (-log_prob.detach() <= g).to(dtype)
            else:
                w = torch.clamp(1 - (-log_prob.detach()) / g, min=0)
            term = torch.where(pos, w * log_prob, torch.zeros_like(log_prob)).sum(1) / pos.sum(1)
            loss_k = -term.mean()
        per_label.append(loss_k)
        total = total + lambdas[k] * loss_k
    return total, per_label
