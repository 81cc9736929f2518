"""Learning-pace schedule (Eq. 16) and per-pair loss bounds (Proposition 2) of Peng et al. (NeurIPS 2021).

Pure Python (no torch import), so it is cheap to import from a trainer or a CLI.

Schedule (Eq. 16)::

    gamma(t) = gamma_start + (gamma_end - gamma_start) * (t / T) ** p,   t clamped to [0, T]

``p = 0.5`` is the authors' default ("inversesquare"), ``p = 1`` "linear", ``p = 2`` "square". As in the authors'
trainer, epoch ``t`` uses ``value(t)`` and the stepper advances once at the END of each epoch
(:meth:`GammaSchedule.step`), so epoch 0 trains with ``gamma_start`` and epoch ``T`` (if reached) with ``gamma_end``.

Bounds (Proposition 2, Eq. 11-13). For L2-normalised embeddings, cosines lie in [-1, 1]; rewriting
``l_ij = log(1 + sum_{a in A(i), a != j} exp((z_i.z_a - z_i.z_j) / tau))`` over the ``2N - 2`` other views gives the
tight range (both ends are attained)::

    l_min = log(1 + 2(N-1) e^{-2/tau})        (Eq. 12, equality)
    l_max = log(1 + 2(N-1) e^{ 2/tau})        (Eq. 13, equality)

which the paper then relaxes to ``log 2(N-1) - 2/tau <= l_ij <= log 2N + 2/tau`` (the statement of Proposition 2;
:func:`paper_pair_loss_bounds`). N is the number of SAMPLES (2N views). Consequences used to set gamma: with
``gamma >= l_max`` the hard rule keeps every pair (= plain SupCon); with ``gamma < l_min`` it keeps none (zero loss);
the linear rule gives ``w = 1 - l/gamma`` which tends to plain SupCon only as ``gamma -> inf`` and keeps every pair
with a non-zero weight once ``gamma > l_max``.
"""
from __future__ import annotations

import math
import numbers
from typing import NamedTuple, Optional, Union

__all__ = [
    "SCHEDULE_POWERS",
    "gamma_at",
    "GammaSchedule",
    "PairLossBounds",
    "pair_loss_bounds",
    "paper_pair_loss_bounds",
]

#: the authors' schedule names (deepclustering2 schedulers / PScheduler) -> exponent p of Eq. 16
SCHEDULE_POWERS = {"inversesquare": 0.5, "linear": 1.0, "square": 2.0}

PowerLike = Union[float, str]


def _real(name: str, value, *, positive: bool = False, allow_inf: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a real number, got {value!r}")
    v = float(value)
    if math.isnan(v) or (math.isinf(v) and not allow_inf):
        raise ValueError(f"{name} must be finite, got {value!r}")
    if positive and v <= 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")
    return v


def _power(power: PowerLike) -> float:
    if isinstance(power, str):
        if power not in SCHEDULE_POWERS:
            raise ValueError(f"unknown schedule {power!r}; expected a number > 0 or one of {sorted(SCHEDULE_POWERS)}")
        return SCHEDULE_POWERS[power]
    return _real("power", power, positive=True)


def _max_epoch(max_epoch) -> int:
    if isinstance(max_epoch, bool) or not isinstance(max_epoch, numbers.Integral) or max_epoch < 1:
        raise ValueError(f"max_epoch must be an integer >= 1, got {max_epoch!r}")
    return int(max_epoch)


def gamma_at(epoch: float, *, gamma_start: float, gamma_end: float, max_epoch: int, power: PowerLike = 0.5) -> float:
    """Learning pace at ``epoch`` (Eq. 16); ``epoch`` (may be fractional) is clamped to ``[0, max_epoch]``.

    ``gamma_start``, ``gamma_end`` > 0 and finite (gamma is a loss threshold, Eq. 7; Proposition 2 gives its useful
    range, see :func:`pair_loss_bounds`). ``power`` is p > 0 or a name in :data:`SCHEDULE_POWERS`.
    """
    g0 = _real("gamma_start", gamma_start, positive=True)
    g1 = _real("gamma_end", gamma_end, positive=True)
    t_max = _max_epoch(max_epoch)
    p = _power(power)
    t = min(max(_real("epoch", epoch), 0.0), float(t_max))
    return g0 + (g1 - g0) * (t / t_max) ** p


class GammaSchedule:
    """Stateful Eq. 16 stepper a trainer can checkpoint: ``current`` is the pace of the epoch being trained,
    :meth:`step` is called once at the end of each epoch, :meth:`state_dict` / :meth:`load_state_dict` resume exactly.

    ``load_state_dict`` restores the configuration too (like torch LR schedulers), so a checkpoint fully determines
    the values. The state holds only Python scalars (JSON- and ``torch.save``-friendly).
    """

    def __init__(self, gamma_start: float, gamma_end: float, max_epoch: int, power: PowerLike = 0.5, epoch: int = 0):
        self.gamma_start = _real("gamma_start", gamma_start, positive=True)
        self.gamma_end = _real("gamma_end", gamma_end, positive=True)
        self.max_epoch = _max_epoch(max_epoch)
        self.power = _power(power)
        self.epoch = self._epoch(epoch)

    @staticmethod
    def _epoch(epoch) -> int:
        if isinstance(epoch, bool) or not isinstance(epoch, numbers.Integral) or epoch < 0:
            raise ValueError(f"epoch must be an integer >= 0, got {epoch!r}")
        return int(epoch)

    def value(self, epoch: Optional[float] = None) -> float:
        """gamma at ``epoch`` (default: the current epoch), Eq. 16, epoch clamped to [0, max_epoch]."""
        return gamma_at(self.epoch if epoch is None else epoch, gamma_start=self.gamma_start,
                        gamma_end=self.gamma_end, max_epoch=self.max_epoch, power=self.power)

    @property
    def current(self) -> float:
        return self.value()

    def step(self) -> float:
        """Advance one epoch; returns the new current value."""
        self.epoch += 1
        return self.current

    def state_dict(self) -> dict:
        return {"gamma_start": self.gamma_start, "gamma_end": self.gamma_end, "max_epoch": self.max_epoch,
                "power": self.power, "epoch": self.epoch}

    def load_state_dict(self, state: dict) -> None:
        missing = {"gamma_start", "gamma_end", "max_epoch", "power", "epoch"} - set(state)
        if missing:
            raise ValueError(f"GammaSchedule state is missing {sorted(missing)}")
        restored = GammaSchedule(state["gamma_start"], state["gamma_end"], state["max_epoch"], state["power"],
                                 state["epoch"])  # validates
        self.__dict__.update(restored.__dict__)

    def __repr__(self) -> str:
        return (f"GammaSchedule(gamma_start={self.gamma_start}, gamma_end={self.gamma_end}, "
                f"max_epoch={self.max_epoch}, power={self.power}, epoch={self.epoch})")


class PairLossBounds(NamedTuple):
    lower: float
    upper: float


def _check_bounds_args(batch_size, temperature) -> tuple:
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
        raise ValueError(f"batch_size (number of samples N, i.e. 2N views) must be an integer >= 1, got {batch_size!r}")
    return int(batch_size), _real("temperature", temperature, positive=True)


def pair_loss_bounds(batch_size: int, temperature: float) -> PairLossBounds:
    """Tight range of the per-pair loss ``l_ij`` for L2-normalised embeddings (Proposition 2, Eq. 12-13 equalities).

    ``lower = log(1 + 2(N-1) e^{-2/tau})``, ``upper = log(1 + 2(N-1) e^{2/tau})``, N = ``batch_size`` samples. Both
    are attained (``lower``: z_j = z_i and every other view = -z_i; ``upper``: the opposite). Computed stably
    (log1p / logaddexp form) for any tau > 0. For N = 1 the only non-self view is the positive: both are 0.
    """
    n, tau = _check_bounds_args(batch_size, temperature)
    if n == 1:
        return PairLossBounds(0.0, 0.0)
    log_k = math.log(2 * (n - 1))
    lower = math.log1p(math.exp(log_k - 2.0 / tau))
    x = log_k + 2.0 / tau  # upper = log(1 + e^x) = x + log1p(e^-x)
    upper = x + math.log1p(math.exp(-x)) if x > 0 else math.log1p(math.exp(x))
    return PairLossBounds(lower, upper)


def paper_pair_loss_bounds(batch_size: int, temperature: float) -> PairLossBounds:
    """The relaxed bounds stated in Proposition 2: ``log 2(N-1) - 2/tau <= l_ij <= log 2N + 2/tau``.

    They contain :func:`pair_loss_bounds`; the lower one is usually negative (vacuous, since l_ij > 0), and it is
    ``-inf`` for N = 1.
    """
    n, tau = _check_bounds_args(batch_size, temperature)
    lower = -math.inf if n == 1 else math.log(2 * (n - 1)) - 2.0 / tau
    return PairLossBounds(lower, math.log(2 * n) + 2.0 / tau)


class SigmoidRampup:
    """A term weight that ramps up over the first ``fraction`` of a stage: ``scale * exp(-5 (1 - t)^2)`` with
    ``t = min(progress / fraction, 1)`` (Laine & Aila 2017; 1 from ``progress >= fraction``; ``fraction = 0``: always
    ``scale``). Called with the fractional stage progress, so it steps every iteration."""

    def __init__(self, scale: float = 1.0, fraction: float = 0.2):
        self.scale = _real("scale", scale)
        self.fraction = _real("fraction", fraction)
        if self.fraction < 0:
            raise ValueError(f"fraction must be >= 0, got {fraction!r}")

    def __call__(self, progress: float) -> float:
        from nnunet_contrastive.components.teacher import sigmoid_rampup

        return self.scale * sigmoid_rampup(progress, self.fraction)

    def __repr__(self) -> str:
        return f"SigmoidRampup(scale={self.scale}, fraction={self.fraction})"
