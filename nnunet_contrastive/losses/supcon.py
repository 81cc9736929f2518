"""Self-paced supervised contrastive loss over one or several meta-labels (Peng et al., NeurIPS 2021).

Notation (paper Sec. 3.1-3.2). A batch of N samples gives two views each, ``z1`` and ``z2`` of shape (N, D). They are
stacked into the 2N views ``z = [z1; z2]``; view ``i`` and view ``i + N`` (mod 2N) come from the same sample. With
``A(i) = {1..2N} \\ {i}`` (every view except the anchor itself),

    l_ij = -log p_ij,   p_ij = exp(z_i.z_j / tau) / sum_{a in A(i)} exp(z_i.z_a / tau)            (Eq. 2, 11)

For meta-label k, the positives of anchor i are ``P^k(i) = {j != i : y^k_j = y^k_i} U {other view of i}``. The
self-paced loss of meta-label k is (Eq. 3, with the closed-form weights of Eq. 7 and the regulariser dropped, as it
is constant w.r.t. the network once the weights are fixed, Eq. 5)

    L^k = 1/(2N) sum_i 1/|P^k(i)| sum_{j in P^k(i)} w^k_ij l_ij

and the loss over meta-labels is ``L = sum_k lambda_k L^k`` (Eq. 14). Without pacing (``gamma`` None or inf) every
``w = 1`` and ``L^k`` is the supervised contrastive loss of Eq. 2; with ``labels=None`` it is SimCLR (Eq. 1).

Implementation facts (documented behaviour, checked by the tests):

- ONE (2N, 2N) similarity matrix is computed per call and shared by all M meta-labels; the positive masks are a
  boolean (M, 2N, 2N) tensor, so the loss is vectorised over pairs and over meta-labels.
- ``log p`` comes from a log-sum-exp over the non-self entries (the diagonal is masked with -inf), never from the
  exponential of raw logits.
- The self-paced weights are computed from the DETACHED per-pair loss and carry no gradient (Eq. 5-7). ``hard``:
  ``w = 1[l <= gamma]`` (note ``<=``); ``linear``: ``w = max(1 - l / gamma, 0)``.
- The weights multiply only the numerator terms ``log p_ij``; the softmax denominator is unweighted, and each anchor
  is normalised by the NUMBER of positives ``|P(i)|``, not by the sum of weights (Eq. 3 and the authors' code). So the
  loss shrinks when pairs are down-weighted; no "gradient correction" rescaling is applied.
- Computation is done in float32 (float64 when an input is float64) with autocast disabled, so float16 / bfloat16
  inputs under autocast are safe; the returned loss is float32 (or float64).
- Inputs are L2-normalised inside by default (``normalize=True``). With ``normalize=False`` the inputs must already
  be unit-norm; this is checked (tolerance 1e-3) when ``validate=True``.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
from torch import Tensor, nn

from nnunet_contrastive.losses.core import info_nce_from_log_prob, label_positive_mask, masked_log_softmax, \
    similarity

__all__ = [
    "DEFAULT_TEMPERATURE",
    "WEIGHTING_MODES",
    "SupConOutput",
    "supcon_loss",
    "pair_loss_matrix",
    "self_paced_weights",
    "SelfPacedSupConLoss",
    "SelfPacedWeight",
]

DEFAULT_TEMPERATURE = 0.07
#: accepted weighting modes; "soft" is the authors' name for "linear" (Eq. 7) and is an alias of it.
WEIGHTING_MODES = ("hard", "linear", "soft")

GammaLike = Union[None, float, Sequence[Optional[float]]]
_UNIT_NORM_TOL = 1e-3


@dataclass(frozen=True)
class SupConOutput:
    """Result of :func:`supcon_loss`. M is the number of meta-labels (1 for ``labels`` of shape (N,) or None).

    Attributes:
        loss: () combined loss ``sum_k lambda_k L^k`` (Eq. 14); carries the gradient.
        per_label_loss: (M,) the unweighted ``L^k`` of each meta-label (Eq. 3); carries the gradient.
        mean_weight: (M,) detached; mean of ``w_ij`` over all positive pairs (i, j) of the batch (1 without pacing).
        frac_nonzero_weight: (M,) detached; fraction of positive pairs with ``w_ij > 0``.
        num_positive_pairs: (M,) detached int64; number of positive (anchor, positive) pairs, self-pairs excluded.
        weights: (M, 2N, 2N) detached; ``w_ij`` on positive pairs, 0 elsewhere (diagonal included).
    """

    loss: Tensor
    per_label_loss: Tensor
    mean_weight: Tensor
    frac_nonzero_weight: Tensor
    num_positive_pairs: Tensor
    weights: Tensor

    def as_dict(self, names: Optional[Sequence[str]] = None) -> dict:
        """Python floats for logging (one device sync): ``loss`` and, per meta-label ``name``,
        ``loss/<name>``, ``mean_weight/<name>``, ``frac_nonzero_weight/<name>``. Names default to ``"0"``, ``"1"``..."""
        m = self.per_label_loss.shape[0]
        names = [str(k) for k in range(m)] if names is None else list(names)
        if len(names) != m:
            raise ValueError(f"got {len(names)} names for {m} meta-labels")
        stacked = torch.stack([self.per_label_loss.detach(), self.mean_weight, self.frac_nonzero_weight]).tolist()
        out = {"loss": float(self.loss.detach())}
        for k, name in enumerate(names):
            out[f"loss/{name}"] = stacked[0][k]
            out[f"mean_weight/{name}"] = stacked[1][k]
            out[f"frac_nonzero_weight/{name}"] = stacked[2][k]
        return out


# ----------------------------------------------------------------------------------------------------------------
# validation helpers
# ----------------------------------------------------------------------------------------------------------------
def _check_temperature(temperature) -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        raise ValueError(f"temperature must be a real number, got {type(temperature).__name__}")
    t = float(temperature)
    if not math.isfinite(t) or t <= 0:
        raise ValueError(f"temperature must be finite and > 0, got {temperature!r}")
    return t


def _check_weighting(weighting) -> str:
    if weighting not in WEIGHTING_MODES:
        raise ValueError(f"unknown weighting mode {weighting!r}; expected one of {WEIGHTING_MODES}")
    return "linear" if weighting == "soft" else weighting


def _check_embeddings(z1, z2, normalize: bool, validate: bool) -> int:
    for name, z in (("z1", z1), ("z2", z2)):
        if not isinstance(z, Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(z).__name__}")
        if z.ndim != 2:
            raise ValueError(f"{name} must have shape (N, D), got shape {tuple(z.shape)}")
        if not z.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got dtype {z.dtype}")
    if z1.shape != z2.shape:
        raise ValueError(f"z1 and z2 must have the same shape (N, D), got {tuple(z1.shape)} and {tuple(z2.shape)}")
    if z1.device != z2.device:
        raise ValueError(f"z1 and z2 must be on the same device, got {z1.device} and {z2.device}")
    n, d = z1.shape
    if n < 1:
        raise ValueError(f"need N >= 1 samples, got N = {n}")
    if d < 1:
        raise ValueError(f"need embedding dimension D >= 1, got D = {d}")
    if validate:
        if not bool(torch.isfinite(z1).all() & torch.isfinite(z2).all()):
            raise ValueError("z1 / z2 contain non-finite values (nan or inf)")
        if not normalize:
            norms = torch.cat([z1, z2]).detach().float().norm(dim=1)
            if not bool(((norms - 1).abs() <= _UNIT_NORM_TOL).all()):
                raise ValueError("normalize=False but z1 / z2 rows are not L2-normalised "
                                 f"(|norm - 1| > {_UNIT_NORM_TOL}); pass normalize=True or normalise them")
    return n


def _check_labels(labels, n: int, device) -> Tensor:
    """(N,) / (N, M) integer labels, or None -> sample index (SimCLR). Returns (N, M) int64 on ``device``."""
    if labels is None:
        return torch.arange(n, device=device).unsqueeze(1)
    if not isinstance(labels, Tensor):
        try:
            labels = torch.as_tensor(labels)
        except (TypeError, ValueError, RuntimeError) as e:
            raise ValueError(f"labels must be an integer tensor of shape (N,) or (N, M): {e}") from None
    if labels.is_floating_point() or labels.is_complex():
        raise ValueError(f"labels must be integers (class ids per meta-label), got dtype {labels.dtype}")
    if labels.ndim == 1:
        labels = labels.unsqueeze(1)
    elif labels.ndim != 2:
        raise ValueError(f"labels must have shape (N,) or (N, M), got shape {tuple(labels.shape)}")
    if labels.shape[0] != n:
        raise ValueError(f"labels length mismatch: labels has {labels.shape[0]} rows but z1 / z2 have N = {n}")
    if labels.shape[1] < 1:
        raise ValueError("labels of shape (N, M) need M >= 1 meta-labels")
    return labels.to(device=device, dtype=torch.int64)


def _check_gamma(gamma: GammaLike, m: int) -> list:
    """None / float / sequence of M (None or float) -> list of M floats, inf meaning "no pacing"."""
    if gamma is None or (isinstance(gamma, numbers.Real) and not isinstance(gamma, bool)):
        values = [gamma] * m
    elif isinstance(gamma, Tensor):
        values = gamma.reshape(-1).tolist() if gamma.ndim > 0 else [gamma.item()] * m
    else:
        try:
            values = list(gamma)
        except TypeError:
            raise ValueError(f"gamma must be None, a number or a sequence of M numbers, got {gamma!r}") from None
    if len(values) != m:
        raise ValueError(f"gamma has {len(values)} values for M = {m} meta-labels")
    out = []
    for g in values:
        if g is None:
            out.append(math.inf)
            continue
        if isinstance(g, bool) or not isinstance(g, numbers.Real):
            raise ValueError(f"gamma values must be numbers or None, got {g!r}")
        g = float(g)
        if math.isnan(g) or g <= 0:
            raise ValueError(f"gamma must be > 0 (or None / inf for no pacing), got {g!r}")
        out.append(g)
    return out


def _check_label_weights(label_weights, m: Optional[int]) -> list:
    """lambda_k of Eq. 14 -> list of floats; ``m=None`` accepts any count >= 1."""
    if label_weights is None:
        return [1.0] * (m or 1)
    if isinstance(label_weights, numbers.Real) and not isinstance(label_weights, bool):
        values = [label_weights]
    elif isinstance(label_weights, Tensor):
        values = label_weights.reshape(-1).tolist()
    else:
        try:
            values = list(label_weights)
        except TypeError:
            raise ValueError(f"label_weights must be a sequence of numbers, got {label_weights!r}") from None
    if m is None and len(values) < 1:
        raise ValueError("label_weights must not be empty")
    if m is not None and len(values) != m:
        raise ValueError(f"label_weights has {len(values)} values for M = {m} meta-labels")
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v) or v < 0:
            raise ValueError(f"label_weights must be finite numbers >= 0 (lambda_k of Eq. 14), got {v!r}")
        out.append(float(v))
    return out


# ----------------------------------------------------------------------------------------------------------------
# core
# ----------------------------------------------------------------------------------------------------------------
def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _log_prob(z1: Tensor, z2: Tensor, temperature: float, normalize: bool) -> Tensor:
    """(2N, 2N) ``log p_ij`` (Eq. 2) from one similarity matrix (the contrastive core's); the diagonal holds a
    finite, meaningless value. Must be called with autocast disabled."""
    z = torch.cat([z1, z2], dim=0)
    logits = similarity(z, z, temperature, normalize)
    eye = torch.eye(z.shape[0], dtype=torch.bool, device=z.device)
    return masked_log_softmax(logits, ~eye)


def _no_autocast(device: torch.device):
    return torch.autocast(device_type=device.type, enabled=False)


def self_paced_weights(pair_loss: Tensor, gamma: Union[float, Tensor, None], weighting: str = "linear") -> Tensor:
    """Closed-form self-paced weights of Eq. 7, computed on ``pair_loss.detach()`` (the result has no gradient).

    Args:
        pair_loss: any shape, the per-pair losses ``l_ij >= 0``.
        gamma: learning pace, > 0; a float, or a tensor broadcastable to ``pair_loss`` (e.g. (M, 1, 1));
            None or inf means no pacing (all weights 1).
        weighting: ``"hard"``: ``w = 1[l <= gamma]``; ``"linear"`` (alias ``"soft"``): ``w = max(1 - l/gamma, 0)``.
    Returns:
        weights in [0, 1], same shape as ``pair_loss`` (broadcast with ``gamma``), detached.
    """
    mode = _check_weighting(weighting)
    loss = pair_loss.detach()
    if gamma is None:
        return torch.ones_like(loss)
    if not isinstance(gamma, Tensor):
        gamma = _check_gamma(gamma, 1)[0]
    elif bool((torch.isnan(gamma) | (gamma <= 0)).any()):
        raise ValueError("gamma must be > 0 (or inf for no pacing)")
    if mode == "hard":
        w = (loss <= gamma).to(loss.dtype)
    else:
        w = torch.clamp(1.0 - loss / gamma, min=0.0)  # gamma = inf gives 1 - 0 = 1
    return w.detach()


class SelfPacedWeight:
    """Self-paced weights (Eq. 7) as the contrastive core's injected ``weight_fn(pair_loss, pos_mask)``.

    ``gammas``: one pace per leading mask dim (M meta-labels; inf = no pacing for that one), ``weighting``:
    ``"hard"`` or ``"linear"``. Returns detached weights on positives, 0 elsewhere.
    """

    def __init__(self, gammas: Sequence[float], weighting: str = "linear"):
        self.gammas = [float(g) for g in gammas]
        self.weighting = _check_weighting(weighting)

    def __call__(self, pair_loss: Tensor, pos_mask: Tensor) -> Tensor:
        g = torch.tensor(self.gammas, dtype=pair_loss.dtype, device=pair_loss.device).view(-1, 1, 1)
        return self_paced_weights(pair_loss, g, self.weighting) * pos_mask


def pair_loss_matrix(z1: Tensor, z2: Tensor, temperature: float = DEFAULT_TEMPERATURE, *,
                     normalize: bool = True, validate: bool = True) -> Tensor:
    """Per-pair losses ``l_ij = -log p_ij`` (Eq. 2 / 11) for all ordered pairs of the 2N views.

    Args:
        z1, z2: (N, D) the two views (row i of z1 and row i of z2 come from sample i).
    Returns:
        (2N, 2N) tensor in the compute dtype (float32, or float64 for float64 inputs), differentiable, with
        ``+inf`` on the diagonal (a view is never paired with itself). Off-diagonal entries lie within
        :func:`nnunet_contrastive.framework.schedules.pair_loss_bounds` for unit-norm embeddings (Proposition 2).
    """
    temperature = _check_temperature(temperature)
    _check_embeddings(z1, z2, normalize, validate)
    with _no_autocast(z1.device):
        lp = _log_prob(z1, z2, temperature, normalize)
        eye = torch.eye(lp.shape[0], dtype=torch.bool, device=lp.device)
        return (-lp).masked_fill(eye, float("inf"))


def supcon_loss(z1: Tensor, z2: Tensor, labels: Optional[Tensor] = None, *,
                temperature: float = DEFAULT_TEMPERATURE, gamma: GammaLike = None, weighting: str = "linear",
                label_weights: Optional[Sequence[float]] = None, normalize: bool = True,
                validate: bool = True) -> SupConOutput:
    """Self-paced supervised contrastive loss over M meta-labels, from ONE (2N, 2N) similarity matrix.

    Args:
        z1, z2: (N, D) projections of the two views; N >= 1. Any float dtype (float16/bfloat16 are upcast: the
            similarity and log-sum-exp run in float32 with autocast disabled; float64 stays float64).
        labels: (N,) or (N, M) integer meta-labels (column k = meta-label k, values compared for equality only), or
            None for SimCLR (positives = the other view of the same sample only, Eq. 1). The other view of the same
            sample is always a positive; the anchor itself never is and is excluded from the denominator.
        temperature: tau > 0 (default 0.07, the authors' value).
        gamma: learning pace of Eq. 7. None / inf = no pacing (plain SupCon, Eq. 2). A number applies to every
            meta-label; a sequence of M values (each > 0, None or inf) gives one pace per meta-label.
        weighting: ``"linear"`` (default; alias ``"soft"``, the mode of the authors' scripts) or ``"hard"``.
        label_weights: lambda_k >= 0 of Eq. 14, M values (default all 1). The loss is the plain sum
            ``sum_k lambda_k L^k``; the authors' scripts divide by ``sum_k lambda_k`` -- pass normalised lambdas to
            reproduce that.
        normalize: L2-normalise z1, z2 inside (default). If False they must already be unit-norm.
        validate: run the data-dependent checks (finite values; unit norm when ``normalize=False``), which cost one
            device synchronisation. Shape / argument checks always run.
    Returns:
        :class:`SupConOutput` (loss, per-label losses, detached weight diagnostics).
    Raises:
        ValueError: on a bad shape, dtype, N < 1, non-finite input, temperature <= 0, gamma <= 0, unknown
            weighting mode, labels length mismatch or bad label_weights.
    """
    temperature = _check_temperature(temperature)
    mode = _check_weighting(weighting)
    n = _check_embeddings(z1, z2, normalize, validate)
    labels2 = _check_labels(labels, n, z1.device)  # (N, M)
    m = labels2.shape[1]
    gammas = _check_gamma(gamma, m)
    lambdas = _check_label_weights(label_weights, m)

    with _no_autocast(z1.device):
        log_prob = _log_prob(z1, z2, temperature, normalize)  # (2N, 2N), the one similarity matrix
        dtype, device = log_prob.dtype, log_prob.device
        two_n = 2 * n
        labels2 = labels2.to(device)

        pos = label_positive_mask(labels2, views=2)  # (M, 2N, 2N): same label, self excluded; other view included
        num_pos = pos.sum(dim=2)  # (M, 2N), >= 1 for N >= 1 (the other view)

        # self-paced weights from the detached per-pair loss (Eq. 7), injected into the core as a weight function
        weight_fn = None if all(math.isinf(g) for g in gammas) else SelfPacedWeight(gammas, mode)
        weights = None if weight_fn is None else weight_fn(-log_prob.detach().unsqueeze(0), pos)
        out = info_nce_from_log_prob(log_prob.unsqueeze(0).expand(m, two_n, two_n), pos, weights)
        weights = out.weights
        per_label = out.loss  # (M,) L^k = -1/(2N) sum_i 1/|P(i)| sum_{j in P(i)} w_ij log p_ij
        lam = torch.tensor(lambdas, dtype=dtype, device=device)
        loss = (lam * per_label).sum()

        with torch.no_grad():
            total_pos = num_pos.sum(dim=1)  # (M,)
            mean_w = weights.sum(dim=(1, 2)) / total_pos.to(dtype)
            frac_nz = ((weights > 0) & pos).sum(dim=(1, 2)).to(dtype) / total_pos.to(dtype)

    return SupConOutput(loss=loss, per_label_loss=per_label, mean_weight=mean_w, frac_nonzero_weight=frac_nz,
                        num_positive_pairs=total_pos, weights=weights.detach())


class SelfPacedSupConLoss(nn.Module):
    """Module wrapper of :func:`supcon_loss` holding the fixed configuration; the pace ``gamma`` is passed per call
    (e.g. from :class:`nnunet_contrastive.framework.schedules.GammaSchedule`, one per meta-label).

    ``forward(z1, z2, labels=None, gamma=None) -> SupConOutput``; shapes as in :func:`supcon_loss`.
    """

    def __init__(self, temperature: float = DEFAULT_TEMPERATURE, weighting: str = "linear",
                 label_weights: Optional[Sequence[float]] = None, normalize: bool = True, validate: bool = True):
        super().__init__()
        self.temperature = _check_temperature(temperature)
        self.weighting = _check_weighting(weighting)
        self.label_weights = None if label_weights is None else _check_label_weights(label_weights, None)
        self.normalize = bool(normalize)
        self.validate = bool(validate)

    def forward(self, z1: Tensor, z2: Tensor, labels: Optional[Tensor] = None,
                gamma: GammaLike = None) -> SupConOutput:
        return supcon_loss(z1, z2, labels, temperature=self.temperature, gamma=gamma, weighting=self.weighting,
                           label_weights=self.label_weights, normalize=self.normalize, validate=self.validate)

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature}, weighting={self.weighting!r}, "
                f"label_weights={self.label_weights}, normalize={self.normalize}")
