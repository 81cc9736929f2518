"""Mean Teacher pieces (Tarvainen & Valpola 2017) as used by Peng et al. (NeurIPS 2021, methods.md §A.5.3).

* :class:`EMATeacher` - an exponential-moving-average copy of the student network.
* :func:`mean_teacher_consistency` - MSE between the softmax outputs of student and teacher.
* :func:`sigmoid_rampup` - the usual ramp-up of the consistency weight lambda_reg.
* :func:`flip_batch`, :func:`random_flip` - a shared flip so that the student sees a flipped input while the
  teacher sees the raw one, and both outputs are compared in the same spatial frame (the student's output is
  flipped back).

Typical use in a trainer step (``g`` is a seeded ``torch.Generator``)::

    x_s, dims = random_flip(x_unlabeled, generator=g)
    student_out = flip_batch(student(x_s), dims)            # back to the frame of x_unlabeled
    teacher_out = teacher(x_unlabeled)                       # no grad
    loss = sup + sigmoid_rampup(epoch, rampup) * w_mt * mean_teacher_consistency(student_out, teacher_out)
    ...
    optimizer.step(); teacher.update(student)
"""
from __future__ import annotations

import copy
import math
import operator
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from nnunet_contrastive.components.heads import unwrap_network

__all__ = [
    "ema_decay",
    "EMATeacher",
    "mean_teacher_consistency",
    "softmax_squared_error",
    "sigmoid_rampup",
    "flip_batch",
    "random_flip",
]

TensorOrList = Union[torch.Tensor, Sequence[torch.Tensor]]


def ema_decay(step: int, decay: float = 0.999, warmup: bool = True) -> float:
    """EMA coefficient alpha_t used at update number ``step`` (0-based).

    With warm-up, ``alpha_t = min(1 - 1/(t+1), decay)``: alpha_0 = 0 (the teacher becomes a copy of the student),
    alpha_1 = 1/2, alpha_2 = 2/3, ... until ``decay`` is reached, so early on the teacher is the plain average of
    all student iterates so far. Without warm-up, ``alpha_t = decay``.
    """
    try:
        if isinstance(step, bool):
            raise TypeError
        step = operator.index(step)
    except TypeError:
        raise ValueError(f"step must be a non-negative int, got {step!r}") from None
    if step < 0:
        raise ValueError(f"step must be a non-negative int, got {step!r}")
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"decay must be in [0, 1], got {decay!r}")
    if not warmup:
        return float(decay)
    return float(min(1.0 - 1.0 / (step + 1), decay))


class EMATeacher(nn.Module):
    """Exponential-moving-average teacher of a student network.

    Holds ``self.module``, a deep copy of the *unwrapped* student (``torch.compile`` / DDP wrappers are peeled
    off with :func:`~nnunet_contrastive.components.heads.unwrap_network`), with ``requires_grad=False`` everywhere. Calling
    the teacher runs that copy under ``torch.no_grad()``.

    Update rule after each optimiser step (methods.md §A.5.3, authors' ``ema_updater``)::

        alpha_t = min(1 - 1/(t+1), decay)        (warm-up; alpha_t = decay if warmup=False)
        theta_T <- alpha_t * theta_T + (1 - alpha_t) * theta_S     for every parameter
        theta_T <- (1 - weight_decay) * theta_T                    (only if weight_decay > 0)

    ``t`` counts the updates done so far (0 for the first call), is stored in :meth:`state_dict` and restored by
    :meth:`load_state_dict`, so a resumed run continues with the same alpha_t.

    Choices:
      * **Buffers are copied**, not averaged: running statistics (BatchNorm ``running_mean/var``,
        ``num_batches_tracked``; InstanceNorm only has them with ``track_running_stats=True``, which nnU-Net does
        not use) are taken from the student at every update. Averaging running averages has no clear meaning,
        and the authors do not average BN buffers either.
      * **Eval mode**: the wrapped copy is kept in eval mode (``train()`` on the teacher does not change it), so
        dropout is off and BatchNorm, if any, uses the copied running statistics. For nnU-Net's default
        networks (InstanceNorm without running stats, no dropout) train and eval mode compute the same thing.
        Pass ``eval_mode=False`` to let ``train()/eval()`` act on the copy.
      * ``weight_decay`` defaults to 0 (Mean Teacher as published); the authors' code uses 1e-6.
      * :meth:`sync_from` makes the teacher an exact copy of the student. Call it after anything that changes the
        student's weights outside the optimiser, e.g. nnU-Net's ``-pretrained_weights``, which is loaded into the
        student *after* ``initialize()``, i.e. after the teacher was created: re-sync in ``on_train_start``.

    Args:
        student: the student network (may be compiled and/or DDP-wrapped).
        decay: the final EMA coefficient (0.999, authors' default).
        warmup: use the alpha_t warm-up above.
        weight_decay: multiplicative shrink of teacher parameters after each update.
        eval_mode: keep the teacher copy in eval mode.
    """

    def __init__(self, student: nn.Module, decay: float = 0.999, warmup: bool = True,
                 weight_decay: float = 0.0, eval_mode: bool = True):
        super().__init__()
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"decay must be in [0, 1], got {decay!r}")
        if not 0.0 <= weight_decay < 1.0:
            raise ValueError(f"weight_decay must be in [0, 1), got {weight_decay!r}")
        self.decay = float(decay)
        self.warmup = bool(warmup)
        self.weight_decay = float(weight_decay)
        self.eval_mode = bool(eval_mode)
        self.num_updates = 0
        self.module = copy.deepcopy(unwrap_network(student))
        self.module.requires_grad_(False)
        for p in self.module.parameters():
            p.grad = None  # deepcopy also copies the student's current .grad tensors
        if self.eval_mode:
            self.module.eval()

    # ------------------------------------------------------------------ forward / mode
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Run the teacher copy without gradients; outputs are detached."""
        with torch.no_grad():
            return self.module(*args, **kwargs)

    def train(self, mode: bool = True) -> "EMATeacher":
        self.training = mode
        self.module.train(False if self.eval_mode else mode)
        return self

    # ------------------------------------------------------------------ EMA
    def current_decay(self, step: Optional[int] = None) -> float:
        """alpha_t for update number ``step`` (default: the next update, ``self.num_updates``)."""
        return ema_decay(self.num_updates if step is None else step, self.decay, self.warmup)

    def _paired(self, student: nn.Module):
        src = unwrap_network(student)
        t_params = dict(self.module.named_parameters())
        s_params = dict(src.named_parameters())
        t_bufs = dict(self.module.named_buffers())
        s_bufs = dict(src.named_buffers())
        if t_params.keys() != s_params.keys() or t_bufs.keys() != s_bufs.keys():
            missing = sorted((t_params.keys() | t_bufs.keys()) ^ (s_params.keys() | s_bufs.keys()))
            raise ValueError(f"student and teacher have different parameters/buffers: {missing[:10]}")
        for name, t in list(t_params.items()) + list(t_bufs.items()):
            s = s_params.get(name, s_bufs.get(name))
            if t.shape != s.shape:
                raise ValueError(f"shape mismatch for {name!r}: teacher {tuple(t.shape)}, student {tuple(s.shape)}")
        return ([(t, s_params[n]) for n, t in t_params.items()],
                [(t, s_bufs[n]) for n, t in t_bufs.items()])

    @torch.no_grad()
    def update(self, student: nn.Module, step: Optional[int] = None) -> float:
        """Average the student's parameters into the teacher; copy its buffers. Returns the alpha_t used.

        ``step`` (0-based update index) overrides the internal counter for this call, e.g. the trainer's
        global iteration; afterwards the counter is ``step + 1``. Without it the internal counter is used.
        """
        alpha = ema_decay(self.num_updates if step is None else step, self.decay, self.warmup)
        t = self.num_updates if step is None else operator.index(step)
        params, bufs = self._paired(student)
        t_list = [tp for tp, _ in params]
        s_list = [sp.detach().to(device=tp.device, dtype=tp.dtype) for tp, sp in params]
        if t_list:  # one fused kernel per op instead of one launch per parameter (matters on GPUs)
            torch._foreach_mul_(t_list, alpha)
            torch._foreach_add_(t_list, s_list, alpha=1.0 - alpha)
            if self.weight_decay > 0:
                torch._foreach_mul_(t_list, 1.0 - self.weight_decay)
        for tb, sb in bufs:
            tb.copy_(sb.detach())
        self.num_updates = t + 1
        return alpha

    @torch.no_grad()
    def sync_from(self, student: nn.Module, reset_counter: bool = False) -> None:
        """Make every teacher parameter and buffer an exact copy of the student's.

        ``reset_counter=True`` also sets the update counter back to 0 (restarting the alpha_t warm-up).
        """
        params, bufs = self._paired(student)
        for tp, sp in params + bufs:
            tp.copy_(sp.detach())
        if reset_counter:
            self.num_updates = 0

    # ------------------------------------------------------------------ state
    def get_extra_state(self) -> Dict[str, Any]:
        # stored in state_dict() under "_extra_state"; plain Python types so torch.load(weights_only=True) works
        return {"num_updates": int(self.num_updates), "decay": self.decay, "warmup": self.warmup,
                "weight_decay": self.weight_decay}

    def set_extra_state(self, state: Dict[str, Any]) -> None:
        # Only the counter is restored; decay/warmup/weight_decay stay as configured by the constructor
        # (they are saved for information).
        if not isinstance(state, dict) or "num_updates" not in state:
            raise ValueError(f"invalid EMATeacher extra state: {state!r}")
        self.num_updates = int(state["num_updates"])


# ---------------------------------------------------------------------- consistency loss
def _check_logits_pair(s: torch.Tensor, t: torch.Tensor, where: str) -> None:
    if not isinstance(s, torch.Tensor) or not isinstance(t, torch.Tensor):
        raise ValueError(f"{where}: logits must be tensors, got {type(s).__name__} and {type(t).__name__}")
    if s.dim() not in (4, 5):
        raise ValueError(f"{where}: logits must be (B, C, H, W) or (B, C, D, H, W), got {tuple(s.shape)}")
    if s.shape != t.shape:
        raise ValueError(f"{where}: student {tuple(s.shape)} and teacher {tuple(t.shape)} shapes differ")
    if s.shape[1] < 2:
        raise ValueError(f"{where}: need at least 2 channels for a softmax, got {tuple(s.shape)}")


def _are_deep_supervision_lists(s: TensorOrList, t: TensorOrList) -> bool:
    """True for two deep-supervision lists (non-empty, equally long), False for two tensors; an error otherwise."""
    s_is_list, t_is_list = isinstance(s, (list, tuple)), isinstance(t, (list, tuple))
    if s_is_list != t_is_list:
        raise ValueError("student_logits and teacher_logits must both be tensors or both be lists")
    if s_is_list and (len(s) == 0 or len(s) != len(t)):
        raise ValueError(f"deep-supervision lists must be non-empty and equally long, got {len(s)} and {len(t)}")
    return s_is_list


def _softmax_mse(s: torch.Tensor, t: torch.Tensor, reduction: str) -> torch.Tensor:
    p_s = F.softmax(s.float(), dim=1)
    p_t = F.softmax(t.detach().float(), dim=1)
    return F.mse_loss(p_s, p_t, reduction=reduction)


def mean_teacher_consistency(student_logits: TensorOrList, teacher_logits: TensorOrList,
                             ds_weights: Optional[Sequence[float]] = None,
                             reduction: str = "mean") -> torch.Tensor:
    """Mean Teacher consistency loss: ``MSE(softmax(student_logits), softmax(teacher_logits))``.

    The softmax is taken over the channel dimension (dim 1) of **both** inputs, which are raw logits. (The
    authors' hook pipeline, ``semi_seg/hooks/mt.py``, compares the teacher's *logits* with the student's
    probabilities; that is a bug and is not reproduced. Their script pipeline, used for the paper, applies
    softmax to both, as done here.) The teacher side is detached: no gradient reaches it. Computed in float32.

    Args:
        student_logits, teacher_logits: (B, C, H, W) or (B, C, D, H, W) tensors of the same shape, already in
            the same spatial frame (undo any flip of the student input first, see :func:`flip_batch`); or two
            equally long lists of such tensors (nnU-Net deep supervision, highest resolution first).
        ds_weights: for lists only. ``None`` (default) uses only the highest-resolution output (index 0): the
            consistency target is the prediction, and the coarser outputs of nnU-Net's decoder are auxiliary.
            Otherwise the loss is ``sum_i ds_weights[i] * loss_i`` with the weights used as given (pass
            normalised weights, e.g. the ones of nnU-Net's ``DeepSupervisionWrapper``; zero-weight levels are
            skipped).
        reduction: ``"mean"`` (over all B*C*spatial elements, like ``nn.MSELoss``) or ``"sum"``.

    Returns:
        A scalar tensor.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if not _are_deep_supervision_lists(student_logits, teacher_logits):
        if ds_weights is not None:
            raise ValueError("ds_weights is only meaningful for deep-supervision lists")
        _check_logits_pair(student_logits, teacher_logits, "mean_teacher_consistency")
        return _softmax_mse(student_logits, teacher_logits, reduction)

    if ds_weights is None:
        _check_logits_pair(student_logits[0], teacher_logits[0], "level 0")
        return _softmax_mse(student_logits[0], teacher_logits[0], reduction)
    weights = [float(w) for w in ds_weights]
    if len(weights) != len(student_logits):
        raise ValueError(f"ds_weights has {len(weights)} entries for {len(student_logits)} outputs")
    if any(w < 0 or not math.isfinite(w) for w in weights) or sum(weights) == 0:
        raise ValueError(f"ds_weights must be finite, non-negative and not all zero, got {weights}")
    total: Optional[torch.Tensor] = None
    for i, (w, s, t) in enumerate(zip(weights, student_logits, teacher_logits)):
        _check_logits_pair(s, t, f"level {i}")
        if w == 0:
            continue
        term = w * _softmax_mse(s, t, reduction)
        total = term if total is None else total + term
    return total


def softmax_squared_error(student_logits: TensorOrList,
                          teacher_logits: TensorOrList) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-pixel Mean-Teacher error, for reductions other than the plain mean.

    Returns ``(err, teacher_class)``, both ``(B, *S)``: ``err`` the mean over the C channels of
    ``(softmax(student) - softmax(teacher))^2`` (so the mean of ``err`` over every pixel is
    ``mean_teacher_consistency(..., reduction="mean")``), float32 with a gradient to the student only, and
    ``teacher_class`` the teacher's argmax (int64, no gradient). Deep-supervision lists: the highest resolution
    (index 0) only, as :func:`mean_teacher_consistency` does by default.
    """
    if _are_deep_supervision_lists(student_logits, teacher_logits):
        student_logits, teacher_logits = student_logits[0], teacher_logits[0]
    _check_logits_pair(student_logits, teacher_logits, "softmax_squared_error")
    p_t = F.softmax(teacher_logits.detach().float(), dim=1)
    err = (F.softmax(student_logits.float(), dim=1) - p_t).pow(2).mean(dim=1)
    return err, p_t.argmax(dim=1)


def sigmoid_rampup(epoch: float, rampup_length: float) -> float:
    """Sigmoid-shaped ramp-up ``exp(-5 (1 - t)^2)`` with ``t = clip(epoch / rampup_length, 0, 1)``.

    Laine & Aila (2017), Tarvainen & Valpola (2017). Rises from exp(-5) ~ 0.0067 at ``epoch = 0`` to exactly 1.0
    at ``epoch >= rampup_length``; monotonically non-decreasing. ``rampup_length = 0`` means no ramp (always
    1.0). ``epoch`` may be fractional (e.g. ``iteration / iterations_per_epoch``).
    """
    if not math.isfinite(float(epoch)):
        raise ValueError(f"epoch must be finite, got {epoch!r}")
    if not math.isfinite(float(rampup_length)) or rampup_length < 0:
        raise ValueError(f"rampup_length must be a finite number >= 0, got {rampup_length!r}")
    if rampup_length == 0:
        return 1.0
    t = min(max(float(epoch) / float(rampup_length), 0.0), 1.0)
    return float(math.exp(-5.0 * (1.0 - t) ** 2))


# ---------------------------------------------------------------------- flips
def _check_flip_dims(x: torch.Tensor, dims: Sequence[int]) -> Tuple[int, ...]:
    dims = tuple(int(d) for d in dims)
    if len(set(dims)) != len(dims):
        raise ValueError(f"repeated flip dims {dims}")
    for d in dims:
        if not 2 <= d < x.dim():
            raise ValueError(f"flip dims must be spatial tensor dims in [2, {x.dim() - 1}] for shape "
                             f"{tuple(x.shape)}, got {dims}")
    return dims


def flip_batch(x: TensorOrList, dims: Sequence[int]) -> TensorOrList:
    """Flip ``x`` along the tensor dimensions ``dims`` (spatial dims, >= 2); the same batch-wide flip for every
    sample. A flip is its own inverse: ``flip_batch(flip_batch(x, d), d)`` equals ``x``.

    ``x`` may be a tensor (B, C, *spatial) or a list/tuple of them (deep-supervision outputs, all with the same
    number of dims), which is flipped element-wise and returned as a list. ``dims=()`` returns ``x`` unchanged.
    Note: tensor dims, not nnU-Net mirroring axes (a spatial axis ``a`` is tensor dim ``a + 2``).
    """
    if isinstance(x, (list, tuple)):
        return [flip_batch(xi, dims) for xi in x]
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"x must be a tensor or a list of tensors, got {type(x).__name__}")
    if x.dim() < 3:
        raise ValueError(f"x must be (B, C, *spatial), got {tuple(x.shape)}")
    dims = _check_flip_dims(x, dims)
    return torch.flip(x, dims) if dims else x


def random_flip(x: torch.Tensor, generator: Optional[torch.Generator] = None, p: float = 0.5,
                dims: Optional[Sequence[int]] = None) -> Tuple[torch.Tensor, Tuple[int, ...]]:
    """Flip ``x`` (B, C, *spatial) along a random subset of its spatial dims, one draw for the whole batch.

    Each candidate dim (default: all spatial dims ``2 .. x.dim()-1``) is flipped independently with probability
    ``p``, using one ``torch.rand`` draw per candidate from ``generator`` (a CPU ``torch.Generator``; seed it for
    reproducibility). Returns ``(flipped_x, flipped_dims)``; undo on the network output with
    ``flip_batch(output, flipped_dims)``.
    """
    if not isinstance(x, torch.Tensor) or x.dim() < 3:
        raise ValueError(f"x must be a tensor (B, C, *spatial), got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p must be in [0, 1], got {p!r}")
    candidates = tuple(range(2, x.dim())) if dims is None else _check_flip_dims(x, dims)
    draws = torch.rand(len(candidates), generator=generator)
    chosen = tuple(d for d, r in zip(candidates, draws.tolist()) if r < p)
    return flip_batch(x, chosen), chosen


def decay_for_horizon(iterations: int, decay: float = 0.999, window_fraction: float = 0.05) -> float:
    """EMA decay that fits a stage of ``iterations`` updates: ``min(decay, 1 - 1 / (window_fraction * iterations))``.

    An EMA with decay alpha averages over about ``1 / (1 - alpha)`` recent updates. With ``decay`` 0.999 (the
    authors' value, made for tens of thousands of updates) and a short stage (e.g. 800 updates), the warm-up
    ``min(1 - 1/(t+1), alpha)`` never reaches alpha and the teacher is the plain average of every iterate since the
    start, the random decoder included. Capping the window at ``window_fraction`` of the stage keeps the teacher a
    recent average: 800 updates and 0.05 give a window of 40 updates (alpha 0.975); 250 000 updates keep 0.999.
    The window is at least 2 updates.
    """
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    if not 0 < window_fraction <= 1:
        raise ValueError(f"window_fraction must be in (0, 1], got {window_fraction}")
    window = max(2.0, window_fraction * iterations)
    return float(min(decay, 1.0 - 1.0 / window))
