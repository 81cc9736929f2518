"""nnUNetTrainerStaged: the training framework every method trainer of this package is declared on.

A method trainer declares
  * ``declare_stages()`` (a classmethod, from class attributes only, so the benchmark can read it without building a
    trainer): an ordered list of :class:`~nnunet_contrastive.framework.stages.Stage` - length, loader spec, trained
    module groups, loss terms with weights and rows, LR restart / warm-up, momentum reset, teacher re-sync;
  * ``build_terms()``: its loss terms (:mod:`nnunet_contrastive.terms`), which own their heads;
  * optionally ``meta_labels`` / ``required_meta_labels`` (resolved once, nnunet_contrastive.data.meta_labels).

This class does the rest, in one place: stage plan and short-run overrides, data loaders per stage (rebuilt when
the stage changes or a term asks for it, ``request_loader_rebuild``), freezing, one SGD over the network and every
head, nnU-Net's poly LR per stage set every iteration, the step (one :class:`StepContext` per iteration caching the
student's and teacher's passes; AMP on CUDA, gradient clipping at 12, DDP gradient averaging, optimizer step, EMA
teacher update with a decay fit to the stage length), stats logged and plotted by name, checkpoints with all our
state under the key ``nnunet_contrastive`` (exact ``--c`` resume), ``checkpoint_teacher.pth``, and the end state of
the stages named in ``stage_checkpoints`` (``checkpoint_<stage>_end.pth``: a supervised warm-up that several
trainers share, see ``warmup_key``).

``self.network`` stays nnU-Net's network (stock predictor, ``-pretrained_weights``); heads and teacher live beside
it. ``torch.compile`` is off: the framework runs the encoder and decoder separately (taps, encoder-only passes).
"""
from __future__ import annotations

import json
import os

import numpy as np
import torch
from nnunetv2.utilities.helpers import dummy_context
from torch import autocast, nn
from torch import distributed as dist

from nnunet_contrastive.components.heads import unwrap_network
from nnunet_contrastive.components.taps import module_groups
from nnunet_contrastive.components.teacher import EMATeacher, decay_for_horizon
from nnunet_contrastive.data import meta_labels as ML
from nnunet_contrastive.data.dataloading import build_semi_dataloaders, find_metadata, unlabeled_folder_cases
from nnunet_contrastive.framework.context import StepContext
from nnunet_contrastive.framework.stages import (PRETRAIN_EPOCHS_ENV, STAGE_EPOCHS_ENV, LoaderSpec, StagedPolyLR,
                                                 StagePlan, stage_lengths_from_env)
from nnunet_contrastive.trainers.base import nnUNetTrainerContrastiveBase

__all__ = ["nnUNetTrainerStaged", "MetaLabelError", "PARTITION"]

PARTITION = ML.PARTITION
MetaLabelError = ML.MetaLabelError
DEFAULT_NUM_EPOCHS = 1000


def _stable_repr(value) -> str:
    """repr, but a function by its qualified name (its repr holds a memory address, different in every process)."""
    if callable(value) and hasattr(value, "__qualname__"):
        return f"{value.__module__}.{value.__qualname__}"
    return repr(value)


def load_terms_state(terms: nn.Module, state: dict, who: str) -> None:
    """Load the loss terms' state_dict. A checkpoint older than a term's extra state (``get_extra_state``, e.g.
    ARCO's sampler generator) still loads, and that term starts a fresh one; any other missing or unexpected key
    is an error naming them."""
    missing, unexpected = terms.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise RuntimeError(f"{who}: the checkpoint's loss-term state does not fit this trainer (missing "
                           f"{missing[:5]}, unexpected {unexpected[:5]}).")


class nnUNetTrainerStaged(nnUNetTrainerContrastiveBase):
    """Base of the staged trainers; not meant to be selected with -tr."""

    meta_labels: tuple = ()
    required_meta_labels: tuple = ()
    num_partitions = 3
    ema_decay = 0.999
    ema_window_fraction = 0.05  # the teacher averages over at most this fraction of a stage (decay_for_horizon)
    stage_checkpoints: tuple = ()  # stages whose end state is kept as checkpoint_<stage>_end.pth (warmup_key)
    warmup_attributes: tuple = ()  # class attributes those stages depend on beyond the plan (e.g. a head's size)
    unlabeled_batch_ratio = 0.5  # semi-supervised stages: unlabeled rows per step, as a fraction of the plans' batch

    # ------------------------------------------------------------------ declarations
    @classmethod
    def declare_stages(cls) -> list:  # pragma: no cover - every concrete trainer declares its stages
        raise NotImplementedError(f"{cls.__name__} declares no stages")

    def build_terms(self) -> dict:  # pragma: no cover
        raise NotImplementedError(f"{type(self).__name__} builds no loss terms")

    def refuse_regions(self, why: str) -> None:
        """For ``build_terms`` of trainers whose terms need one class per pixel: a clear error at start-up when the
        dataset trains regions (dataset.json 'regions_class_order'), saying ``why``."""
        if self.label_manager.has_regions:
            raise ValueError(f"{type(self).__name__}: region-based datasets (dataset.json 'regions_class_order') are "
                             f"not supported: {why}.")

    @classmethod
    def teacher_student_loader(cls) -> LoaderSpec:
        """The batches of a stage where an EMA teacher labels what the student sees: the plans' batch of labeled rows
        + round(unlabeled_batch_ratio x batch) unlabeled rows, two views sharing the spatial transform (independent
        intensity augmentation), so the teacher's view-2 prediction lines up with the student's view-1 pixels."""
        return LoaderSpec(labeled="batch", unlabeled=float(cls.unlabeled_batch_ratio), views=2, share_spatial=True)

    @classmethod
    def stage_plan(cls, num_epochs: int = DEFAULT_NUM_EPOCHS, environ=None) -> StagePlan:
        """The resolved plan for ``num_epochs`` and the short-run variables in ``environ`` (default os.environ)."""
        stages, applied = stage_lengths_from_env(cls.declare_stages(), environ)
        if STAGE_EPOCHS_ENV in applied or all(s.epochs is not None for s in stages):
            num_epochs = sum(s.epochs for s in stages if s.epochs is not None)
        return StagePlan.resolve(stages, num_epochs)

    @classmethod
    def kept_stage(cls, num_epochs: int = DEFAULT_NUM_EPOCHS, environ=None) -> str | None:
        """The last stage of this plan (never its final one) whose end state is kept, or None."""
        if not cls.stage_checkpoints:
            return None
        names = [s.name for s in cls.stage_plan(num_epochs, environ).stages][:-1]
        kept = [n for n in names if n in cls.stage_checkpoints]
        return kept[-1] if kept else None

    @classmethod
    def warmup_key(cls, num_epochs: int = DEFAULT_NUM_EPOCHS, environ=None) -> str | None:
        """What the stages up to the last kept one (``stage_checkpoints``) depend on, as one string: those stages'
        declarations (loaders, terms, trained groups, LR and momentum), the LR segments of the later stages (a later
        stage without a fresh LR stretches the poly decay over the earlier ones), ``warmup_attributes`` and the code
        that builds the terms, network and optimizer. Two trainers with equal keys train those stages the same way,
        so the benchmark (``--share-warmup``) may start one from the other's ``checkpoint_<stage>_end.pth`` at the
        same labeled cases and seed. None: no kept stage in this plan."""
        stage = cls.kept_stage(num_epochs, environ)
        if stage is None:
            return None
        plan = cls.stage_plan(num_epochs, environ)
        last = [s.name for s in plan.stages].index(stage)
        return json.dumps({
            "shared": [repr(s) for s in plan.stages[:last + 1]],
            "later": [[s.name, s.epochs, s.fresh_lr, s.warmup, s.fresh_momentum] for s in plan.stages[last + 1:]],
            "attributes": {a: _stable_repr(getattr(cls, a)) for a in cls.warmup_attributes},
            "code": [getattr(cls, m).__qualname__ for m in ("build_terms", "build_network_architecture",
                                                             "configure_optimizers", "get_dataloaders")]})

    @classmethod
    def needs_unlabeled(cls) -> bool:
        """Whether any stage reads unlabeled rows (semi-supervised) - the benchmark gives such trainers N < all."""
        return any(s.loader.unlabeled not in (0, 0.0) and not s.loader.images_of_labeled
                   for s in cls.declare_stages())

    @classmethod
    def pretraining_stage_names(cls) -> list:
        return [s.name for s in cls.declare_stages() if s.pretraining and (s.epochs is None or s.epochs > 0)]

    @classmethod
    def partition_batch_rows(cls, batch_size: int, n_volumes: int | None = None, volumes: int | None = None) -> int:
        """Rows of a volume x partition batch: m volumes x K partitions, m = ``volumes`` or max(2, batch_size // K),
        at most ``n_volumes`` (distinct volumes available; None = unlimited)."""
        k = cls.num_partitions
        m = volumes if volumes is not None else max(2, batch_size // k)
        return k * (m if n_volumes is None else max(1, min(m, n_volumes)))

    # ------------------------------------------------------------------ set-up
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        stages, applied = stage_lengths_from_env(self.declare_stages())
        self.schedule_overrides.update(applied)
        if STAGE_EPOCHS_ENV in applied or all(s.epochs is not None for s in stages):
            self.num_epochs = sum(s.epochs for s in stages if s.epochs is not None)
        self.plan = StagePlan.resolve(stages, self.num_epochs)
        self.num_epochs = self.plan.num_epochs
        self.pretrain_epochs = sum(s.epochs for s in self.plan.stages if s.pretraining)
        self.terms: nn.ModuleDict | None = None
        self.teacher: EMATeacher | None = None
        self.head_teachers: dict = {}
        self.active_meta_labels: list = []
        self._meta_resolved = False
        self._loaded_checkpoint = False
        self._loader_stage = None
        self._applied_stage = None
        self._rebuild_requested = False
        self._iteration = 0
        self._flip_generator = torch.Generator().manual_seed(12345 + (0 if fold == "all" else int(fold)))
        self._epoch_stats: dict = {}
        self._term_keys: dict = {}

    def _do_i_compile(self):
        return False  # the framework runs encoder and decoder separately: a compiled wrapper would be bypassed

    def updates_teacher(self, stage) -> bool:
        """Whether the EMA teacher is updated after each step of ``stage``: when one of its terms reads the teacher.
        A trainer that reads the teacher outside the loss terms (e.g. to estimate pseudo-labels) extends this."""
        return any(self.terms[u.term].uses_teacher for u in stage.terms)

    @property
    def uses_teacher(self) -> bool:
        return any(self.updates_teacher(s) for s in self.plan.stages)

    def configure_optimizers(self):
        """nnU-Net's SGD (momentum 0.99, Nesterov) over the network and every term's heads; poly LR per stage."""
        if self.terms is None:
            terms = self.build_terms()
            used = {u.term for s in self.plan.stages for u in s.terms}
            unknown = used - set(terms)
            if unknown:
                raise ValueError(f"{type(self).__name__}: stages use term(s) {sorted(unknown)} that build_terms() "
                                 f"does not build ({sorted(terms)}).")
            self.terms = nn.ModuleDict({k: v for k, v in terms.items() if k in used}).to(self.device)
            for name, term in self.terms.items():
                term.name = name
            if self.uses_teacher:
                self.teacher = EMATeacher(self.network, decay=self.ema_decay).to(self.device)
                dec = getattr(self.teacher.module, "decoder", None)
                if dec is not None and hasattr(dec, "deep_supervision"):
                    dec.deep_supervision = False  # the teacher's low-resolution outputs are never read
                for name, term in self.terms.items():
                    for head in term.ema_heads:
                        self.head_teachers[f"{name}.{head}"] = EMATeacher(getattr(term, head),
                                                                          decay=self.ema_decay).to(self.device)
        params = list(self.network.parameters()) + list(self.terms.parameters())
        optimizer = torch.optim.SGD(params, self.initial_lr, weight_decay=self.weight_decay, momentum=0.99,
                                    nesterov=True)
        return optimizer, StagedPolyLR(optimizer, self.initial_lr, self.plan)

    # ------------------------------------------------------------------ stages
    def current_stage(self):
        return self.plan.stage(self.current_epoch)

    def _epoch_float(self) -> float:
        return min(self.current_epoch, self.num_epochs - 1) + self._iteration / max(1, self.num_iterations_per_epoch)

    def progress(self) -> float:
        """Fractional progress in the current stage (steps every iteration)."""
        return self.plan.progress(self._epoch_float())

    def training_progress(self) -> float:
        """Fractional progress through the stages after the pre-training (StagePlan.training_progress)."""
        return self.plan.training_progress(self._epoch_float())

    def request_loader_rebuild(self) -> None:
        """A term (e.g. a pseudo-label refresh) asks for new loaders at the next epoch start."""
        self._rebuild_requested = True

    def trainable_groups(self, stage) -> dict:
        groups = module_groups(self.network)
        groups["network"] = list(self.network.parameters())
        for name, term in self.terms.items():
            groups[name] = list(term.parameters())
        groups["heads"] = list(self.terms.parameters())
        unknown = [g for g in stage.trains if g not in groups]
        if unknown:
            raise ValueError(f"stage {stage.name!r} trains unknown module group(s) {unknown}; known: {sorted(groups)}")
        return groups

    def apply_stage(self, index: int, starting: bool) -> None:
        """Freeze what the stage does not train; at the stage's first epoch reset momentum / re-sync the teacher."""
        stage = self.plan.stages[index]
        groups = self.trainable_groups(stage)
        train_ids = {id(p) for g in stage.trains for p in groups[g]}
        for p in list(self.network.parameters()) + list(self.terms.parameters()):
            p.requires_grad_(id(p) in train_ids)
            if id(p) not in train_ids:
                p.grad = None
        if starting and stage.fresh_momentum:
            self.optimizer.state.clear()
        if self.teacher is not None:
            self._set_teacher_decay(index)
            if starting and stage.resync_teacher:
                self._sync_teachers()
        for u in stage.terms:
            self.terms[u.term].on_stage_start(self, stage)
        self._applied_stage = index
        n_train = sum(p.numel() for p in self.network.parameters() if p.requires_grad) + \
            sum(p.numel() for p in self.terms.parameters() if p.requires_grad)
        self.print_to_log_file(
            f"Stage {index + 1} '{stage.name}' ({'starts' if starting else 'resumes'}): trains {list(stage.trains)} "
            f"({n_train} parameters, the rest frozen), terms {[(u.term, u.rows) for u in stage.terms]}"
            + (f", teacher decay {self.teacher.decay:.4g}" if self.teacher is not None else "")
            + (", momentum reset" if starting and stage.fresh_momentum else "")
            + (", teacher re-synced" if starting and stage.resync_teacher and self.teacher is not None else ""))

    def _set_teacher_decay(self, index: int) -> None:
        """EMA decay fit to the length of stage ``index`` (decay_for_horizon); a function of the plan only."""
        iters = self.plan.stages[index].epochs * self.num_iterations_per_epoch
        decay = decay_for_horizon(iters, self.ema_decay, self.ema_window_fraction)
        for t in [self.teacher] + list(self.head_teachers.values()):
            t.decay = decay

    def _sync_teachers(self) -> None:
        self.teacher.sync_from(self.network, reset_counter=True)
        for key, t in self.head_teachers.items():
            name, head = key.split(".", 1)
            t.sync_from(getattr(self.terms[name], head), reset_counter=True)

    def teacher_head(self, term: str, head: str):
        return self.head_teachers[f"{term}.{head}"]

    # ------------------------------------------------------------------ data
    def resolve_meta_labels(self, available: list) -> list:
        """The meta-labels this run uses: ``meta_labels`` present in ``available``; a missing required one raises."""
        return ML.resolve(type(self).__name__, self.meta_labels, self.required_meta_labels, available,
                          self.plans_manager.dataset_name, self.print_to_log_file)

    def _available_meta_labels(self) -> list:
        cases = list(self.labeled_keys or []) + list(self.unlabeled_keys or [])
        return ML.available(find_metadata(self), cases, self.plans_manager.dataset_name, self.print_to_log_file)

    def get_dataloaders(self):
        """Loaders of the current stage (its LoaderSpec); the fold is split once per build."""
        split = self.do_split()
        if self.meta_labels and not self._meta_resolved:
            self.active_meta_labels = self.resolve_meta_labels(self._available_meta_labels())
            self._meta_resolved = True
        index = self.plan.index(min(self.current_epoch, self.num_epochs - 1))
        spec = self.plan.stages[index].loader
        self._loader_stage = index
        extra = unlabeled_folder_cases(self)  # truly unlabeled images (preprocess-unlabeled)
        unl_keys = list(self.labeled_keys) + list(self.unlabeled_keys) if spec.images_of_labeled \
            else list(self.unlabeled_keys)
        n_lab = self.batch_size if spec.labeled == "batch" else int(spec.labeled)
        if spec.unlabeled == "partition":
            n_unl = self.partition_batch_rows(self.batch_size, len(unl_keys) + len(extra), spec.volumes)
        elif isinstance(spec.unlabeled, float):
            n_unl = int(round(self.batch_size * spec.unlabeled))
        else:
            n_unl = int(spec.unlabeled)
        if n_unl and not (unl_keys or extra):
            self.print_to_log_file(f"No unlabeled cases in this fold: stage '{self.plan.stages[index].name}' trains "
                                   f"without unlabeled rows.")
            n_unl = 0
        if n_lab + n_unl == 0:
            raise ValueError(f"stage '{self.plan.stages[index].name}' has no rows: no labeled rows requested and no "
                             f"unlabeled case in this fold.")
        return build_semi_dataloaders(
            self, sampling=spec.sampling, num_labeled=n_lab, num_unlabeled=n_unl, num_partitions=self.num_partitions,
            two_views=spec.views == 2, share_spatial=spec.share_spatial, unlabeled_keys=unl_keys, split=split,
            contrastive_labels=self.active_meta_labels, **self.loader_options(index))

    def loader_options(self, stage_index: int) -> dict:
        """Extra keyword arguments of build_semi_dataloaders for stage ``stage_index`` (e.g. ``pseudo_labels``);
        none by default. Called by get_dataloaders after the fold is split."""
        return {}

    def _finish_loaders(self):
        for dl in (self.dataloader_train, self.dataloader_val):
            if dl is not None and hasattr(dl, "_finish"):
                dl._finish()

    # ------------------------------------------------------------------ loop hooks
    def on_train_start(self):
        if self.plan.starts_stage(self.current_epoch):
            # resumed (--c, or a kept stage end) at a stage's first epoch: the uninterrupted run built this stage's
            # loaders (and estimated its pseudo-labels) after writing that checkpoint, drawing from the generators
            # as saved, so they are restored before the loaders are built, not after (no-op without a checkpoint;
            # the base's call after the loaders then finds nothing left to restore)
            self._continue_random_streams()
        super().on_train_start()  # builds the loaders of the current stage (get_dataloaders -> do_split)
        if not self._loaded_checkpoint and self.teacher is not None:
            # fresh run, or -pretrained_weights loaded into the student after initialize(): teacher = student
            self._sync_teachers()
        if self.teacher is not None:
            self._set_teacher_decay(self.plan.index(min(self.current_epoch, self.num_epochs - 1)))
        self.print_to_log_file(f"{type(self).__name__}: {self.plan.describe()}"
                               + (f"; meta-labels {self.active_meta_labels}" if self.meta_labels else ""))

    def on_epoch_start(self):
        index = self.plan.index(min(self.current_epoch, self.num_epochs - 1))
        if index != self._loader_stage or self._rebuild_requested:
            self.print_to_log_file(f"Stage {index + 1} '{self.plan.stages[index].name}': new data loaders.")
            self._finish_loaders()
            self._rebuild_requested = False
            self.dataloader_train, self.dataloader_val = self.get_dataloaders()
        if index != self._applied_stage:
            self.apply_stage(index, starting=self.plan.starts_stage(self.current_epoch))
        self._epoch_stats = {}
        self._iteration = 0
        super().on_epoch_start()

    def train_step(self, batch: dict) -> dict:
        stage = self.current_stage()
        progress = self.progress()
        self.lr_scheduler.set(self._epoch_float())
        ctx = StepContext(batch, self.device, unwrap_network(self.network),
                          self.teacher.module if self.teacher is not None else None,
                          self._flip_generator if stage.flip_student else None, progress, stage, self,
                          training_progress=self.training_progress())
        self.optimizer.zero_grad(set_to_none=True)
        stats, total = {}, None
        with self._autocast():
            for use in stage.terms:
                res = self.terms[use.term](ctx, use.rows)
                if res is None:
                    continue
                loss, term_stats = res
                w = use.weight_at(progress)
                total = w * loss if total is None else total + w * loss
                named = {f"{use.term}_loss": loss.detach(), f"{use.term}_weight": w, **term_stats}
                self._term_keys.setdefault(use.term, [])
                for k in named:
                    if k not in self._term_keys[use.term]:
                        self._term_keys[use.term].append(k)
                stats.update(named)
        if total is None:
            raise RuntimeError(f"stage '{stage.name}': no loss term could be computed on this batch "
                               f"(rows {ctx.num_rows('labeled')} labeled, {ctx.num_rows('unlabeled')} unlabeled).")
        self._backward_and_step(total)
        if self.teacher is not None and self.updates_teacher(stage):
            self.teacher.update(self.network)
            for key, t in self.head_teachers.items():
                name, head = key.split(".", 1)
                t.update(getattr(self.terms[name], head))
        self._iteration += 1
        for k, v in stats.items():
            self._epoch_stats.setdefault(k, []).append(v)
        self.last_step_context = ctx
        return {"loss": total.detach().cpu().numpy()}

    def _autocast(self):
        return autocast(self.device.type, enabled=True) if self.device.type == "cuda" else dummy_context()

    def _trainable_parameters(self) -> list:
        return [p for p in list(self.network.parameters()) + list(self.terms.parameters()) if p.requires_grad]

    def _backward_and_step(self, loss: torch.Tensor) -> None:
        """The one place of AMP scaling, DDP gradient averaging, clipping (12, as nnU-Net) and the optimizer step."""
        params = self._trainable_parameters()
        if self.grad_scaler is not None:
            self.grad_scaler.scale(loss).backward()
            self._sync_gradients(params)
            self.grad_scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(params, 12)
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
        else:
            loss.backward()
            self._sync_gradients(params)
            torch.nn.utils.clip_grad_norm_(params, 12)
            self.optimizer.step()

    def _sync_gradients(self, params) -> None:
        """DDP: our forward bypasses the DDP wrapper (taps, encoder-only passes), so average gradients ourselves."""
        if not self.is_ddp:
            return
        world = dist.get_world_size()
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad)
            p.grad /= world

    # ------------------------------------------------------------------ logging
    def on_train_epoch_end(self, train_outputs):
        super().on_train_epoch_end(train_outputs)
        log = self.logger.local_logger.my_fantastic_logging
        index = self.plan.index(min(self.current_epoch, self.num_epochs - 1))
        values = {k: float(torch.stack([torch.as_tensor(x, dtype=torch.float32) for x in v]).mean())
                  for k, v in self._epoch_stats.items()}  # one device sync per key and epoch
        values["stage"] = float(index + 1)
        keys = ["stage"] + [k for ks in self._term_keys.values() for k in ks]
        parts = []
        for key in dict.fromkeys(keys):
            series = log.setdefault(key, [])
            while len(series) < self.current_epoch:  # a key first seen in a later stage: NaN before
                series.append(float("nan"))
            v = values.get(key, float("nan"))
            self.logger.log(key, v, self.current_epoch)
            if not np.isnan(v) and key != "stage":
                parts.append(f"{key} {v:.4g}")
        self.print_to_log_file(f"stage {index + 1}: {self.plan.stages[index].name}; " + ", ".join(parts))

    def on_epoch_end(self):
        ending = self.current_epoch + 1 in self.plan.starts[1:]  # last epoch of a stage that is not the last one
        stage = self.plan.stages[self.plan.index(self.current_epoch)].name
        super().on_epoch_end()  # checkpoint_latest.pth (every save_every epochs), then current_epoch += 1
        if ending and stage in self.stage_checkpoints:
            self.current_epoch -= 1  # save_checkpoint records current_epoch + 1, the epoch to resume from
            try:
                self.save_checkpoint(os.path.join(self.output_folder, f"checkpoint_{stage}_end.pth"))
            finally:
                self.current_epoch += 1
            self.print_to_log_file(f"Kept the end of stage '{stage}': checkpoint_{stage}_end.pth")
        if self.local_rank == 0:
            try:
                from nnunet_contrastive.framework.plotting import plot_term_progress

                plot_term_progress(self.logger.local_logger.my_fantastic_logging, self._term_keys,
                                   os.path.join(self.output_folder, "progress_contrastive.png"))
            except Exception as e:  # a plot must never stop training
                self.print_to_log_file(f"progress_contrastive.png not drawn: {e}")

    # ------------------------------------------------------------------ checkpoints and inference
    def _plan_signature(self) -> list:
        return [[s.name, s.epochs] for s in self.plan.stages]

    def extra_checkpoint_state(self) -> dict:
        state = super().extra_checkpoint_state()
        state.update(plan=self._plan_signature(), terms=self.terms.state_dict(),
                     teacher=None if self.teacher is None else self.teacher.state_dict(),
                     head_teachers={k: t.state_dict() for k, t in self.head_teachers.items()},
                     active_meta_labels=list(self.active_meta_labels), term_keys=self._term_keys,
                     stage=self.plan.index(min(self.current_epoch, self.num_epochs - 1)) + 1,
                     flip_generator=self._flip_generator.get_state())
        return state

    def load_extra_checkpoint_state(self, state: dict) -> None:
        super().load_extra_checkpoint_state(state)
        if "plan" not in state or "terms" not in state:
            raise RuntimeError(f"{type(self).__name__}: the checkpoint has no stage plan / loss-term state (key "
                               f"'nnunet_contrastive'): it was not written by this trainer.")
        if [list(x) for x in state["plan"]] != self._plan_signature():
            raise RuntimeError(f"checkpoint was trained with the stages {state['plan']}, this run has "
                               f"{self._plan_signature()}: set {STAGE_EPOCHS_ENV} / {PRETRAIN_EPOCHS_ENV} / "
                               f"nnUNet_contrastive_epochs to the old values to resume.")
        load_terms_state(self.terms, state["terms"], type(self).__name__)
        if self.teacher is not None and state.get("teacher") is not None:
            self.teacher.load_state_dict(state["teacher"])
        for k, t in self.head_teachers.items():
            t.load_state_dict(state["head_teachers"][k])
        self.active_meta_labels = list(state.get("active_meta_labels", []))
        self._meta_resolved = bool(self.meta_labels)
        self._term_keys = {k: list(v) for k, v in state.get("term_keys", {}).items()}
        if "flip_generator" in state:
            self._flip_generator.set_state(state["flip_generator"].cpu())  # loaded with map_location=device
        self._loaded_checkpoint = True

    def _final_stage_segments(self) -> bool:
        """Whether the last stage trains the decoder (the final network segments)."""
        trains = self.plan.stages[-1].trains
        return any(g in ("network", "decoder") for g in trains)

    def on_train_end(self):
        super().on_train_end()
        if self.local_rank == 0 and not self.disable_checkpointing and self.teacher is not None \
                and self._final_stage_segments():
            final = os.path.join(self.output_folder, "checkpoint_final.pth")
            ckpt = torch.load(final, map_location="cpu", weights_only=False)
            ckpt["network_weights"] = self.teacher.module.state_dict()
            ckpt["nnunet_contrastive"] = {"note": "EMA teacher weights of checkpoint_final.pth"}
            tmp = os.path.join(self.output_folder, "checkpoint_teacher.pth.tmp")
            torch.save(ckpt, tmp)
            os.replace(tmp, os.path.join(self.output_folder, "checkpoint_teacher.pth"))
            self.print_to_log_file("Wrote checkpoint_teacher.pth (EMA teacher; nnUNetv2_predict -chk "
                                   "checkpoint_teacher.pth)")

    def perform_actual_validation(self, save_probabilities: bool = False):
        if not self._final_stage_segments():
            self.print_to_log_file("Pre-training only: the decoder is untrained, final validation skipped. Use this "
                                   "checkpoint with -pretrained_weights.")
            return
        # the framework may have frozen parts of the network in the last stage; prediction needs no gradients
        super().perform_actual_validation(save_probabilities)
