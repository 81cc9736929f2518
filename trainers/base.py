"""Base of every nnunet-contrastive trainer: labeled subset of the fold, short-run schedules, safe checkpoints.

- Labeled subset: `splits_final.json` may list, per fold, which training cases are labeled
  (`nnunet-contrastive select-labeled`, see nnunet_contrastive.data.labeled). `self.labeled_keys` /
  `self.unlabeled_keys` hold them; only labeled cases enter nnU-Net's supervised data loader. A fold without a
  `labeled` list is fully labeled.
- Short runs: the environment variables `nnUNet_contrastive_epochs`, `nnUNet_contrastive_iterations` and
  `nnUNet_contrastive_val_iterations` override nnU-Net's 1000 epochs x 250 iterations (50 validation iterations)
  for demos, tests and CPU benchmarks; the log says when they are active. `nnUNet_contrastive_save_every` sets
  how many epochs apart `checkpoint_latest.pth` is written (nnU-Net: 50), so a short run can be resumed with `--c`.
- Seeding: `nnUNet_contrastive_seed` seeds Python's, NumPy's and torch's generators before the network is built,
  so weights, case/slice sampling and augmentation are reproducible in one process (with `nnUNet_n_proc_DA=0`:
  nnU-Net's multi-process augmenter seeds its workers itself). Paired runs then differ only in the method. Under
  DDP every rank builds the same weights, then ranks > 0 are re-seeded apart so they draw their own batches.
- Checkpoints carry the global generators' states (nnunet_contrastive.framework.rng): `--c` restores them when
  training restarts, so a seeded run interrupted and resumed with `nnUNet_n_proc_DA=0` draws the same batches as
  an uninterrupted one (under DDP rank 0 continues its stream; ranks > 0 are re-seeded from seed, rank and epoch).
- Checkpoints are written atomically (temporary file, then rename) and carry our state under the key
  `CHECKPOINT_KEY`, which nnU-Net's predictor ignores. The labeled subset is part of it: resuming (`--c`) with a
  different subset stops with an error instead of silently training on other labels.
"""
from __future__ import annotations

import json
import os

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from torch._dynamo import OptimizedModule

from nnunet_contrastive.data.labeled import SPLITS_FILENAME, labeled_and_unlabeled, read_splits
from nnunet_contrastive.data.metadata import copy_metadata
from nnunet_contrastive.framework.rng import capture_rng_state, reseed_for_rank, restore_rng_state, seed_everything

CHECKPOINT_KEY = "nnunet_contrastive"
SEED_ENV = "nnUNet_contrastive_seed"
SCHEDULE_ENV = {
    "num_epochs": "nnUNet_contrastive_epochs",
    "num_iterations_per_epoch": "nnUNet_contrastive_iterations",
    "num_val_iterations_per_epoch": "nnUNet_contrastive_val_iterations",
    "save_every": "nnUNet_contrastive_save_every",
}


def seed_from_env(environ=None) -> int | None:
    """The value of nnUNet_contrastive_seed (None when unset). Raises ValueError on a bad value."""
    environ = os.environ if environ is None else environ
    raw = environ.get(SEED_ENV)
    return None if raw is None or raw == "" else _env_int(SEED_ENV, raw, 0)


def _env_int(var: str, raw: str, minimum: int) -> int:
    """int(raw) if it is >= minimum, else ValueError naming the variable."""
    what = "a non-negative integer" if minimum == 0 else "a positive integer"
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{var}={raw!r}: must be {what}.") from None
    if value < minimum:
        raise ValueError(f"{var}={raw!r}: must be {what}.")
    return value


def schedule_from_env(environ=None) -> dict[str, int]:
    """Trainer attribute -> value for each schedule variable that is set. Raises ValueError on a bad value."""
    environ = os.environ if environ is None else environ
    out = {}
    for attr, var in SCHEDULE_ENV.items():
        raw = environ.get(var)
        if raw is None or raw == "":
            continue
        out[attr] = _env_int(var, raw, 1)
    return out


class nnUNetTrainerContrastiveBase(nnUNetTrainer):
    """Shared base of our trainers (trains like nnUNetTrainerFewLabels); not meant to be selected with -tr."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.schedule_overrides = schedule_from_env()
        for attr, value in self.schedule_overrides.items():
            setattr(self, attr, value)
        self.labeled_keys: list[str] | None = None
        self.unlabeled_keys: list[str] = []
        self.seed = seed_from_env()
        if self.seed is not None:
            self.schedule_overrides["seed"] = self.seed
        self._resumed_rng_state: dict | None = None

    @property
    def run_seed(self) -> int | None:
        """The seed of this fold's run (nnUNet_contrastive_seed + fold), None when unseeded."""
        return None if self.seed is None else self.seed + (0 if self.fold == "all" else int(self.fold))

    def initialize(self):
        if self.seed is not None:  # before the network's weights (and our heads) are drawn: the same on every rank
            seed_everything(self.run_seed)
        super().initialize()
        if self.seed is not None and self.is_ddp and self.local_rank > 0:
            reseed_for_rank(self.run_seed, self.local_rank)  # each rank its own batches and augmentation

    # ------------------------------------------------------------------ data split
    def do_split(self):
        from nnunet_contrastive.data.labeled import check_training_split

        check_training_split(self.preprocessed_dataset_folder_base, self.preprocessed_dataset_folder)
        tr_keys, val_keys = super().do_split()
        labeled, unlabeled = tr_keys, []
        splits_file = os.path.join(self.preprocessed_dataset_folder_base, SPLITS_FILENAME)
        if self.fold != "all" and os.path.isfile(splits_file):
            splits = read_splits(self.preprocessed_dataset_folder_base)
            if self.fold < len(splits) and list(splits[self.fold]["train"]) == list(tr_keys):
                labeled, unlabeled = labeled_and_unlabeled(splits[self.fold], self.fold)
        if self.labeled_keys is not None and sorted(self.labeled_keys) != sorted(labeled):
            raise RuntimeError(
                f"The labeled subset of fold {self.fold} in {splits_file} differs from the one this run was started "
                f"with ({len(self.labeled_keys)} cases, recorded in the checkpoint). Restore the old subset or "
                f"start a new run (a new results folder) instead of --c.")
        self.labeled_keys, self.unlabeled_keys = list(labeled), list(unlabeled)
        self.print_to_log_file(
            f"Labeled subset: {len(self.labeled_keys)} labeled and {len(self.unlabeled_keys)} unlabeled training "
            f"cases (labels of unlabeled cases are never read); {len(val_keys)} validation cases.")
        if self.local_rank == 0 and self.output_folder is not None:
            os.makedirs(self.output_folder, exist_ok=True)
            with open(os.path.join(self.output_folder, "labeled_subset.json"), "w", encoding="utf-8") as f:
                json.dump({"labeled": self.labeled_keys, "unlabeled": self.unlabeled_keys, "val": list(val_keys)},
                          f, indent=1)
        return self.labeled_keys, val_keys

    def on_train_start(self):
        if self.schedule_overrides:
            self.print_to_log_file(f"Schedule overridden by environment: {self.schedule_overrides}")
        super().on_train_start()
        self._continue_random_streams()
        if self.local_rank == 0:  # the model records the meta-labels it was trained with (beside dataset.json)
            raw = os.environ.get("nnUNet_raw")
            sources = [self.preprocessed_dataset_folder_base] + (
                [os.path.join(raw, self.plans_manager.dataset_name)] if raw else [])
            for folder in sources:
                if copy_metadata(folder, self.output_folder_base):
                    break

    def _continue_random_streams(self) -> None:
        """After a checkpoint was loaded (--c): the generators continue where the saved run left them, so the next
        epoch draws what the uninterrupted run drew. Called once loaders are built, before the first epoch."""
        state, self._resumed_rng_state = self._resumed_rng_state, None
        if state is None:
            return
        if self.is_ddp and self.local_rank > 0:  # the checkpoint holds rank 0's streams
            if self.seed is not None:
                reseed_for_rank(self.run_seed, self.local_rank, self.current_epoch)
            return
        restore_rng_state(state)
        self.print_to_log_file(f"Random generators restored from the checkpoint (epoch {self.current_epoch}).")

    # ------------------------------------------------------------------ checkpoints
    def extra_checkpoint_state(self) -> dict:
        """Our state saved beside nnU-Net's keys. Subclasses extend it (heads, teacher, stage, schedules)."""
        return {"labeled_keys": self.labeled_keys, "schedule_overrides": self.schedule_overrides,
                "rng": capture_rng_state()}

    def load_extra_checkpoint_state(self, state: dict) -> None:
        if state.get("labeled_keys") is not None:
            self.labeled_keys = list(state["labeled_keys"])
        self._resumed_rng_state = state.get("rng")  # restored by on_train_start (checkpoints before it: none)

    def save_checkpoint(self, filename: str) -> None:
        if self.local_rank != 0:
            return
        if self.disable_checkpointing:
            self.print_to_log_file("No checkpoint written, checkpointing is disabled")
            return
        mod = self.network.module if self.is_ddp else self.network
        if isinstance(mod, OptimizedModule):
            mod = mod._orig_mod
        checkpoint = {
            "network_weights": mod.state_dict(),
            "optimizer_state": self.optimizer.state_dict(),
            "grad_scaler_state": self.grad_scaler.state_dict() if self.grad_scaler is not None else None,
            "logging": self.logger.get_checkpoint(),
            "_best_ema": self._best_ema,
            "current_epoch": self.current_epoch + 1,
            "init_args": self.my_init_kwargs,
            "trainer_name": self.__class__.__name__,
            "inference_allowed_mirroring_axes": self.inference_allowed_mirroring_axes,
            CHECKPOINT_KEY: self.extra_checkpoint_state(),
        }
        tmp = filename + ".tmp"
        torch.save(checkpoint, tmp)
        os.replace(tmp, filename)  # atomic: an interrupted save never destroys the previous checkpoint

    def load_checkpoint(self, filename_or_checkpoint) -> None:
        if not isinstance(filename_or_checkpoint, str):
            raise TypeError("nnunet-contrastive trainers load checkpoints from a file path (nnU-Net 2.8.1's "
                            "load_checkpoint cannot take a dict).")
        from nnunet_contrastive.data.checkpoints import read_checkpoint

        checkpoint = read_checkpoint(filename_or_checkpoint, map_location=self.device)  # names a broken file
        super().load_checkpoint(filename_or_checkpoint)
        self.load_extra_checkpoint_state(checkpoint.get(CHECKPOINT_KEY, {}))
