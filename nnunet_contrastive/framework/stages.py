"""Stages of a staged trainer: what each stage loads, trains and optimises, and where a run stands.

A trainer declares an ordered list of :class:`Stage` s. Each names its length in nnU-Net epochs (``None`` for at
most one stage: the rest of ``num_epochs``), its data-loader spec (:class:`LoaderSpec`), the module groups it trains
(all others are frozen: no gradient, hence no weight decay and no momentum step), its loss terms (:class:`Use`:
term name, weight or weight schedule, rows), and whether it starts from a fresh poly LR (optionally with a linear
warm-up) and fresh optimizer momentum.

:class:`StagePlan` resolves the lengths (stages of length 0 are dropped) and maps the epoch and the iteration to
(stage, fractional progress in the stage). Everything is a function of ``current_epoch`` and the iteration inside
the epoch, so a run resumed with ``--c`` (which restores ``current_epoch``; checkpoints are written at epoch ends)
is at exactly the same stage, learning rate and schedule values as the interrupted one.

Short runs: ``nnUNet_contrastive_stage_epochs`` (a comma list, one length per declared stage, 0 drops a stage)
replaces every stage length and with it ``num_epochs``; ``nnUNet_contrastive_pretrain_epochs`` only shortens the
stages a trainer marks ``pretraining`` (it never gives a trainer a stage it does not have).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from typing import Callable, Optional, Sequence, Union

__all__ = ["LoaderSpec", "Use", "Stage", "StagePlan", "StagedPolyLR", "stage_lengths_from_env", "STAGE_EPOCHS_ENV",
           "PRETRAIN_EPOCHS_ENV", "ROWS"]

STAGE_EPOCHS_ENV = "nnUNet_contrastive_stage_epochs"
PRETRAIN_EPOCHS_ENV = "nnUNet_contrastive_pretrain_epochs"
SAMPLING = ("random", "partition")
#: which rows of a batch a term reads
ROWS = ("all", "labeled", "unlabeled")

WeightLike = Union[float, Callable[[float], float]]


@dataclass(frozen=True)
class LoaderSpec:
    """The training batches of a stage (built with nnunet_contrastive.data.dataloading.build_semi_dataloaders).

    sampling: "random" (nnU-Net's) or "partition" (volume x partition blocks: ``volumes`` distinct volumes x K
        partitions, one slice each; ``volumes=None``: max(2, batch_size // K)).
    labeled: labeled rows: "batch" = the plans' batch size (what stock nnU-Net trains on), or a number (0: none).
    unlabeled: unlabeled rows: a float = that fraction of the plans' batch size (rounded), an int = that many;
        "partition" = the volume x partition block size. Dropped (0) when the fold has no unlabeled case.
    images_of_labeled: labeled cases' images also serve as unlabeled rows (label-free pre-training on every image).
    views: 1 or 2 augmented views of every row; share_spatial: the views share the spatial transform.
    """

    sampling: str = "random"
    labeled: Union[str, int] = "batch"
    unlabeled: Union[float, int, str] = 0
    images_of_labeled: bool = False
    views: int = 1
    share_spatial: bool = False
    volumes: Optional[int] = None

    def __post_init__(self):
        if self.sampling not in SAMPLING:
            raise ValueError(f"sampling must be one of {SAMPLING}, got {self.sampling!r}")
        if self.views not in (1, 2):
            raise ValueError(f"views must be 1 or 2, got {self.views!r}")
        if not (self.labeled == "batch" or (isinstance(self.labeled, int) and self.labeled >= 0)):
            raise ValueError(f"labeled must be 'batch' or an int >= 0, got {self.labeled!r}")

    @property
    def reads_labels(self) -> bool:
        return self.labeled != 0


@dataclass(frozen=True)
class Use:
    """A loss term used in a stage: its name (a key of the trainer's ``build_terms()``), its weight (a number or a
    function of the stage progress in [0, 1]) and the rows it reads ("all", "labeled", "unlabeled")."""

    term: str
    weight: WeightLike = 1.0
    rows: str = "all"

    def __post_init__(self):
        if self.rows not in ROWS:
            raise ValueError(f"rows must be one of {ROWS}, got {self.rows!r}")

    def weight_at(self, progress: float) -> float:
        return float(self.weight(progress)) if callable(self.weight) else float(self.weight)


@dataclass(frozen=True)
class Stage:
    """One stage. ``trains``: module groups with gradients ("network", "encoder", "decoder", "decoder.<i>" for
    decoder stage i counted from the bottleneck, or a term name for that term's heads); everything else is frozen.
    ``pretraining``: label-free (the benchmark runs it once per dataset and reports its cost apart).
    ``flip_student``: the student's view-1 input is randomly flipped (outputs and taps flipped back).
    ``resync_teacher``: the EMA teacher becomes a copy of the student when the stage starts."""

    name: str
    epochs: Optional[int]
    loader: LoaderSpec
    trains: tuple = ("network",)
    terms: tuple = ()
    fresh_lr: bool = True
    warmup: float = 0.0
    fresh_momentum: bool = True
    resync_teacher: bool = False
    pretraining: bool = False
    flip_student: bool = False

    def __post_init__(self):
        if self.epochs is not None and (not isinstance(self.epochs, int) or self.epochs < 0):
            raise ValueError(f"stage {self.name!r}: epochs must be an int >= 0 or None, got {self.epochs!r}")
        if not 0.0 <= self.warmup < 1.0:
            raise ValueError(f"stage {self.name!r}: warmup is a fraction of the stage in [0, 1), got {self.warmup}")
        if not self.terms:
            raise ValueError(f"stage {self.name!r} has no loss term")

    @property
    def term_names(self) -> list[str]:
        return [u.term for u in self.terms]


def _parse_int_list(raw: str, var: str) -> list[int]:
    try:
        values = [int(v) for v in raw.split(",")]
    except ValueError:
        raise ValueError(f"{var}={raw!r}: must be a comma list of non-negative integers, e.g. '2,8'.") from None
    if any(v < 0 for v in values):
        raise ValueError(f"{var}={raw!r}: must be a comma list of non-negative integers, e.g. '2,8'.")
    return values


def stage_lengths_from_env(stages: Sequence[Stage], environ=None) -> tuple[list[Stage], dict]:
    """Apply the short-run variables to declared stages; returns (stages, {variable: value} of what was applied)."""
    environ = os.environ if environ is None else environ
    applied = {}
    raw = environ.get(STAGE_EPOCHS_ENV)
    if raw:
        values = _parse_int_list(raw, STAGE_EPOCHS_ENV)
        if len(values) != len(stages):
            raise ValueError(f"{STAGE_EPOCHS_ENV}={raw!r}: {len(values)} lengths for the {len(stages)} stages "
                             f"{[s.name for s in stages]}.")
        stages = [replace(s, epochs=v) for s, v in zip(stages, values)]
        applied[STAGE_EPOCHS_ENV] = raw
    raw = environ.get(PRETRAIN_EPOCHS_ENV)
    if raw:
        value = _parse_int_list(raw, PRETRAIN_EPOCHS_ENV)
        if len(value) != 1:
            raise ValueError(f"{PRETRAIN_EPOCHS_ENV}={raw!r}: must be one non-negative integer.")
        if any(s.pretraining and (s.epochs or 0) > 0 for s in stages):
            stages = [replace(s, epochs=value[0]) if s.pretraining and (s.epochs or 0) > 0 else s for s in stages]
            applied[PRETRAIN_EPOCHS_ENV] = value[0]
    return list(stages), applied


@dataclass
class StagePlan:
    """Resolved stages with their epoch ranges. ``num_epochs`` fills the one open-ended stage."""

    stages: list
    num_epochs: int
    starts: list = field(default_factory=list)

    @classmethod
    def resolve(cls, declared: Sequence[Stage], num_epochs: int) -> "StagePlan":
        open_ended = [s.name for s in declared if s.epochs is None]
        if len(open_ended) > 1:
            raise ValueError(f"only one stage may take the rest of num_epochs, got {open_ended}")
        fixed = sum(s.epochs for s in declared if s.epochs is not None)
        if open_ended:
            rest = num_epochs - fixed
            if rest < 1:
                raise ValueError(f"stages {[(s.name, s.epochs) for s in declared if s.epochs]} take {fixed} of "
                                 f"num_epochs = {num_epochs} epochs: nothing left for stage {open_ended[0]!r}.")
            declared = [replace(s, epochs=rest) if s.epochs is None else s for s in declared]
        stages = [s for s in declared if s.epochs > 0]
        if not stages:
            raise ValueError("every stage has length 0")
        starts, t = [], 0
        for s in stages:
            starts.append(t)
            t += s.epochs
        return cls(stages=stages, num_epochs=t, starts=starts)

    def index(self, epoch: int) -> int:
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        for i in range(len(self.stages) - 1, -1, -1):
            if epoch >= self.starts[i]:
                return i
        return 0

    def stage(self, epoch: int) -> Stage:
        return self.stages[self.index(min(epoch, self.num_epochs - 1))]

    def progress(self, epoch: float) -> float:
        """Fractional progress in [0, 1] inside the stage of (fractional) ``epoch`` = epoch + iteration / iters."""
        i = self.index(int(epoch))
        return min(max((epoch - self.starts[i]) / self.stages[i].epochs, 0.0), 1.0)

    def training_progress(self, epoch: float) -> float:
        """Fractional progress in [0, 1] through the stages after the label-free pre-training (all stages when
        there is none) at (fractional) ``epoch``: 0 during the pre-training. A schedule that spans several stages
        (e.g. a self-paced pace over a warm-up and the pseudo-label rounds after it) reads this."""
        first = next((i for i, s in enumerate(self.stages) if not s.pretraining), None)
        if first is None:
            return 0.0
        start = self.starts[first]
        return min(max((epoch - start) / max(self.num_epochs - start, 1), 0.0), 1.0)

    def starts_stage(self, epoch: int) -> bool:
        return epoch in self.starts

    def describe(self) -> str:
        return "; ".join(f"{s.name} = epochs [{a}, {a + s.epochs})" for s, a in zip(self.stages, self.starts))


class StagedPolyLR:
    """nnU-Net's poly schedule ``lr0 * (1 - t) ** 0.9`` per LR segment, with ``t`` the fractional progress.

    A stage with ``fresh_lr`` starts a new segment (t restarts at 0); a stage without it continues the previous
    segment's decay. ``warmup`` (a fraction of the stage) ramps the LR linearly from lr0/warm-up-steps to the poly
    value. ``step(epoch)`` (nnU-Net calls it at every epoch start) and ``set(epoch_float)`` (per iteration) set the
    LR of every parameter group (times the group's optional ``lr_scale``).
    """

    def __init__(self, optimizer, initial_lr: float, plan: StagePlan, exponent: float = 0.9):
        self.optimizer, self.initial_lr, self.plan, self.exponent = optimizer, float(initial_lr), plan, exponent
        self.segments = []  # per stage: (segment start epoch, segment length)
        seg_start = 0
        for i, s in enumerate(plan.stages):
            if i == 0 or s.fresh_lr:
                seg_start = plan.starts[i]
            self.segments.append(seg_start)
        ends = {}
        for i, start in enumerate(self.segments):
            ends[start] = plan.starts[i] + plan.stages[i].epochs
        self.segment_len = [ends[s] - s for s in self.segments]
        self.ctr = 0
        self._last_lr = [initial_lr]

    def lr_at(self, epoch: float) -> float:
        i = self.plan.index(int(min(epoch, self.plan.num_epochs - 1e-9)))
        t = min(max((epoch - self.segments[i]) / self.segment_len[i], 0.0), 1.0)
        lr = self.initial_lr * (1.0 - t) ** self.exponent
        stage = self.plan.stages[i]
        if stage.warmup > 0:
            local = self.plan.progress(epoch)
            if local < stage.warmup:
                lr *= max(local / stage.warmup, 1e-3)
        return lr

    def set(self, epoch: float) -> float:
        lr = self.lr_at(epoch)
        for g in self.optimizer.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)
        self._last_lr = [g["lr"] for g in self.optimizer.param_groups]
        return lr

    def step(self, current_step=None):
        if current_step is None or current_step == -1:
            current_step = self.ctr
            self.ctr += 1
        self.set(float(current_step))

    def get_last_lr(self):
        return self._last_lr

    def state_dict(self) -> dict:  # everything is derived from the epoch: nothing to restore
        return {"ctr": self.ctr}

    def load_state_dict(self, state: dict) -> None:
        self.ctr = int(state.get("ctr", 0))
