"""nnUNetTrainerSPCon: self-paced contrastive learning with meta-labels (Peng et al., NeurIPS 2021) in nnU-Net.

Stage 1 (epochs [0, pretrain_epochs)): the encoder of nnU-Net's network and a projection head are trained with
the self-paced supervised contrastive loss over the dataset's meta-labels, L = sum_k lambda_k L^k_SP-con (Eq. 3,
14), on two independently augmented views of every slice, with volume x partition batches drawn from all training
cases of the fold, labeled and unlabeled (images only). The decoder gets no gradient.

Stage 2 (the remaining epochs): L = L_sup + lambda_reg * L_MT + lambda_sp * L_SP-con (Eq. 15). L_sup is nnU-Net's
Dice + CE with deep supervision on the labeled rows of a mixed batch; L_MT the softmax-MSE between the student's
output on view 1 (randomly flipped, flipped back) and an EMA teacher's output on view 2 (same spatial transform,
independent intensity transforms) on the unlabeled rows, weighted with a sigmoid ramp-up; L_SP-con the same
contrastive loss on the unlabeled rows' two views.

Self-paced gamma (Eq. 16) runs from gamma_start to gamma_end within each stage; both are given as multiples of
the largest possible pair loss (Proposition 2, `pair_loss_bounds`) for the actual batch and temperature, so the
defaults hold for any batch size. The defaults (1, 0.1, 0.1 for partition, patient, phase; 0.15 -> 1.8 etc.)
correspond to the authors' multi-meta-label ACDC run (gamma 5 -> 60, 3.5 -> 50, 2 -> 50 at 30 samples and
temperature 0.07).

nnU-Net's network stays `self.network` (stock predictor, `-pretrained_weights`); the projection head and the
teacher live beside it and are saved under the checkpoint key `nnunet_contrastive`. `checkpoint_teacher.pth`
(nnU-Net format, teacher weights) is written at the end: `nnUNetv2_predict ... -chk checkpoint_teacher.pth`.
"""
from __future__ import annotations

import os

import numpy as np
import torch
from nnunetv2.utilities.helpers import dummy_context
from torch import autocast
from torch import distributed as dist

from nnunet_contrastive.data.dataloading import build_semi_dataloaders, find_metadata, unlabeled_folder_cases
from nnunet_contrastive.components.heads import GlobalProjectionHead, encode, unwrap_network
from nnunet_contrastive.losses import supcon_loss
from nnunet_contrastive.framework.schedules import GammaSchedule, pair_loss_bounds
from nnunet_contrastive.framework.stages import StagePolyLRScheduler, stage_epoch, stage_of
from nnunet_contrastive.components.teacher import EMATeacher, flip_batch, mean_teacher_consistency, random_flip, \
    sigmoid_rampup
from nnunet_contrastive.trainers.base import nnUNetTrainerContrastiveBase

PARTITION = "partition"
PRETRAIN_ENV = "nnUNet_contrastive_pretrain_epochs"


class MetaLabelError(ValueError):
    """A trainer needs a meta-label the dataset does not provide."""


class nnUNetTrainerSPCon(nnUNetTrainerContrastiveBase):
    """Self-paced meta-label contrastive pre-training, then Dice+CE + Mean Teacher + SP-con (Peng et al. 2021)."""

    # stages, in nnU-Net epochs (env nnUNet_contrastive_pretrain_epochs overrides pretrain_epochs)
    pretrain_epochs = 100
    pretrain_only = False
    # meta-labels: used when the dataset has them; a `required` one that is missing stops the run at start
    meta_labels = (PARTITION, "patient", "phase")
    required_meta_labels = (PARTITION,)
    meta_label_weights = {PARTITION: 1.0, "patient": 0.1, "phase": 0.1}
    num_partitions = 3
    # loss (Eq. 2, 7, 16); gamma as multiples of the largest pair loss (Proposition 2)
    temperature = 0.07
    weighting = "linear"
    gamma_start = {PARTITION: 0.15, "patient": 0.11, "phase": 0.06}
    gamma_end = {PARTITION: 1.8, "patient": 1.5, "phase": 1.5}
    gamma_power = 0.5
    head_dim = 256
    head_grid = 2
    # stage 2 (Eq. 15)
    # stage-2 batch: the plans' batch_size labeled rows (what stock nnU-Net trains on) PLUS
    # round(unlabeled_batch_ratio * batch_size) unlabeled rows (the authors: 5 labeled + 5 unlabeled per step)
    unlabeled_batch_ratio = 0.5
    lambda_sp = 0.1
    lambda_reg = 1.0
    mt_rampup_fraction = 0.2  # of stage 2
    ema_decay = 0.999
    # logged per epoch (progress_contrastive.png)
    LOG_KEYS = ("stage", "sp_loss", "mt_loss", "mt_weight", "sup_loss")

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        raw = os.environ.get(PRETRAIN_ENV)
        if raw and self.pretrain_epochs > 0:  # trainers without a pre-training stage (SemiOnly, MeanTeacher) keep none
            try:
                self.pretrain_epochs = int(raw)
            except ValueError:
                raise ValueError(f"{PRETRAIN_ENV}={raw!r}: must be a non-negative integer.") from None
            self.schedule_overrides["pretrain_epochs"] = self.pretrain_epochs
        if self.pretrain_only:
            self.num_epochs = self.pretrain_epochs
        if not 0 <= self.pretrain_epochs <= self.num_epochs:
            raise ValueError(f"{type(self).__name__}: pretrain_epochs ({self.pretrain_epochs}) must be between 0 and "
                             f"num_epochs ({self.num_epochs}).")
        self.projection_head = None
        self.teacher = None
        self.active_meta_labels: list[str] = []
        self._loaded_checkpoint = False
        self._loader_stage = None
        self._flip_generator = torch.Generator().manual_seed(12345 + (0 if fold == "all" else int(fold)))
        self._epoch_means: dict[str, list[float]] = {}

    # ------------------------------------------------------------------ set-up
    def _do_i_compile(self):
        # the student runs through its encoder and decoder separately (bottleneck features), which bypasses a
        # torch.compile wrapper; compiling would only cost time
        return False

    def configure_optimizers(self):
        """nnU-Net's SGD over the network AND the projection head, poly LR restarted at the stage boundary."""
        if self.projection_head is None:
            self.projection_head = GlobalProjectionHead.for_network(
                self.network, out_dim=self.head_dim, grid_size=self.head_grid).to(self.device)
            self.teacher = EMATeacher(self.network, decay=self.ema_decay).to(self.device)
        params = list(self.network.parameters()) + list(self.projection_head.parameters())
        optimizer = torch.optim.SGD(params, self.initial_lr, weight_decay=self.weight_decay, momentum=0.99,
                                    nesterov=True)
        return optimizer, StagePolyLRScheduler(optimizer, self.initial_lr, self.pretrain_epochs, self.num_epochs)

    def resolve_meta_labels(self, available: list[str]) -> list[str]:
        """The meta-labels this run uses: `meta_labels` present in `available`; a missing required one raises."""
        missing_required = [m for m in self.required_meta_labels if m not in available]
        if missing_required:
            raise MetaLabelError(
                f"{type(self).__name__} needs meta-label(s) {missing_required}, which dataset "
                f"'{self.plans_manager.dataset_name}' does not provide (available: {available}). Add the column to "
                f"metadata.csv (docs/data_format.md) or use a trainer that does not need it.")
        used = [m for m in self.meta_labels if m in available]
        skipped = [m for m in self.meta_labels if m not in available]
        if skipped:
            self.print_to_log_file(f"Meta-label(s) {skipped} not in this dataset: training on {used}.")
        return used

    def _available_meta_labels(self) -> list[str]:
        table = find_metadata(self)
        if table is None:
            self.print_to_log_file("No metadata.csv found: meta-labels are slice partition and patient = case id.")
            return [PARTITION, "patient"]
        all_cases = list(self.labeled_keys or []) + list(self.unlabeled_keys or [])
        missing = [c for c in all_cases if c not in table.rows]
        if missing:
            raise MetaLabelError(f"{table.source}: training case(s) {missing[:5]} have no metadata row "
                                 f"({len(missing)} in all). Run 'nnunet-contrastive check -d "
                                 f"{self.plans_manager.dataset_name}'.")
        return [PARTITION] + table.available_meta_labels()

    def on_train_start(self):
        super().on_train_start()  # builds the loaders (get_dataloaders -> do_split)
        for key in self.LOG_KEYS + tuple(f"{s}_{m}" for m in self.meta_labels
                                        for s in ("sp_loss", "gamma", "w_mean", "w_nonzero")):
            self.logger.local_logger.my_fantastic_logging.setdefault(key, [])
        if not self._loaded_checkpoint:
            # fresh run, or -pretrained_weights loaded into the student after initialize(): teacher = student
            self.teacher.sync_from(self.network, reset_counter=True)
        self.print_to_log_file(
            f"SPCon: stage 1 = epochs [0, {self.pretrain_epochs}), stage 2 = [{self.pretrain_epochs}, "
            f"{self.num_epochs}); meta-labels {self.active_meta_labels} weights "
            f"{[self.meta_label_weights.get(m, 1.0) for m in self.active_meta_labels]}; {self.weighting} weights, "
            f"temperature {self.temperature}")

    def get_dataloaders(self):
        """Stage 1: volume x partition batches of all training cases (images only), two independent views.
        Stage 2: labeled + unlabeled rows, two views sharing their spatial transform."""
        split = self.do_split()  # once: it logs and writes labeled_subset.json
        self.active_meta_labels = self.resolve_meta_labels(self._available_meta_labels())
        stage = stage_of(self.current_epoch, self.pretrain_epochs)
        self._loader_stage = stage
        k = self.num_partitions
        extra_unlabeled = unlabeled_folder_cases(self)  # truly unlabeled images (preprocess-unlabeled)
        if stage == 1:
            n_volumes = len(self.labeled_keys) + len(self.unlabeled_keys) + len(extra_unlabeled)
            n = self.stage1_batch_rows(self.batch_size, n_volumes)
            return build_semi_dataloaders(
                self, sampling="partition", num_labeled=0, num_unlabeled=n, num_partitions=k, two_views=True,
                share_spatial=False, unlabeled_keys=list(self.labeled_keys) + list(self.unlabeled_keys), split=split)
        has_unlabeled = bool(self.unlabeled_keys) or bool(extra_unlabeled)
        n_u = int(round(self.batch_size * self.unlabeled_batch_ratio)) if has_unlabeled else 0
        if n_u == 0 and self.unlabeled_batch_ratio > 0:
            self.print_to_log_file("No unlabeled cases in this fold: stage 2 is supervised only.")
        return build_semi_dataloaders(
            self, sampling="random", num_labeled=self.batch_size, num_unlabeled=n_u, num_partitions=k,
            two_views=True, share_spatial=True, split=split)

    @classmethod
    def stage1_batch_rows(cls, batch_size: int, n_volumes: int | None = None) -> int:
        """Rows N of a stage-1 batch: m volumes x K partitions, m = max(2, batch_size // K), at most `n_volumes`
        (distinct volumes per batch; None = unlimited)."""
        k = cls.num_partitions
        m = max(2, batch_size // k)
        return k * (m if n_volumes is None else max(1, min(m, n_volumes)))

    def _finish_loaders(self):
        for dl in (self.dataloader_train, self.dataloader_val):
            if dl is not None and hasattr(dl, "_finish"):
                dl._finish()

    def on_epoch_start(self):
        stage = stage_of(self.current_epoch, self.pretrain_epochs)
        if stage != self._loader_stage:
            self.print_to_log_file(f"Stage {stage} starts: new data loaders, optimizer momentum reset.")
            self._finish_loaders()
            self.dataloader_train, self.dataloader_val = self.get_dataloaders()
        if stage == 2 and self.current_epoch == self.pretrain_epochs:
            self.optimizer.state.clear()  # stage-1 momentum of the encoder must not push stage 2
        self._epoch_means = {}
        super().on_epoch_start()

    # ------------------------------------------------------------------ losses
    def _labels(self, batch: dict, rows=None) -> torch.Tensor | None:
        """(N, M) integer meta-labels of the active meta-labels (None when there are none: SimCLR)."""
        if not self.active_meta_labels:
            return None
        names = list(batch.get("meta_label_names", []))
        cols = []
        for m in self.active_meta_labels:
            if m == PARTITION:
                cols.append(torch.as_tensor(batch["partition"]).long())
            elif m in names:
                cols.append(torch.as_tensor(batch["meta_labels"])[:, names.index(m)].long())
            elif m == "patient":  # no table: every case is its own patient
                _, inv = np.unique(np.asarray(batch["keys"]), return_inverse=True)
                cols.append(torch.as_tensor(inv).long())
            else:
                raise MetaLabelError(f"meta-label '{m}' missing from the batch (columns {names}).")
        labels = torch.stack(cols, dim=1)
        if rows is not None:
            labels = labels[rows]
        return labels.to(self.device)

    def _gammas(self, n: int) -> list[float]:
        local, length = stage_epoch(self.current_epoch, self.pretrain_epochs, self.num_epochs)
        upper = pair_loss_bounds(n, self.temperature).upper
        return [upper * GammaSchedule(self.gamma_start.get(m, 0.15), self.gamma_end.get(m, 1.5), length,
                                      self.gamma_power).value(local) for m in self.active_meta_labels]

    def _contrastive(self, z1, z2, labels):
        gammas = self._gammas(z1.shape[0])
        out = supcon_loss(z1, z2, labels, temperature=self.temperature, gamma=gammas, weighting=self.weighting,
                          label_weights=[self.meta_label_weights.get(m, 1.0) for m in self.active_meta_labels]
                          or None, validate=False)
        # detached tensors: converted once per epoch (on_train_epoch_end), no device sync per iteration
        stats = {"sp_loss": out.loss.detach()}
        for k, m in enumerate(self.active_meta_labels):
            stats[f"sp_loss_{m}"] = out.per_label_loss[k].detach()
            stats[f"gamma_{m}"] = gammas[k]
            stats[f"w_mean_{m}"] = out.mean_weight[k]
            stats[f"w_nonzero_{m}"] = out.frac_nonzero_weight[k]
        return out.loss, stats

    def _trainable_parameters(self):
        return list(self.network.parameters()) + list(self.projection_head.parameters())

    def _backward_and_step(self, loss: torch.Tensor) -> None:
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
        """DDP: our forward bypasses the DDP wrapper (bottleneck features), so average gradients ourselves."""
        if not self.is_ddp:
            return
        world = dist.get_world_size()
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad)
            p.grad /= world

    def _autocast(self):
        return autocast(self.device.type, enabled=True) if self.device.type == "cuda" else dummy_context()

    def train_step(self, batch: dict) -> dict:
        if stage_of(self.current_epoch, self.pretrain_epochs) == 1:
            out = self._pretrain_step(batch)
        else:
            out = self._semi_step(batch)
        for k, v in out.items():
            if k != "loss":
                self._epoch_means.setdefault(k, []).append(v)
        return {"loss": out["loss"]}

    def _pretrain_step(self, batch: dict) -> dict:
        net = unwrap_network(self.network)
        x = torch.cat([batch["data"], batch["data_view2"]]).to(self.device, non_blocking=True)
        labels = self._labels(batch)
        self.optimizer.zero_grad(set_to_none=True)
        with self._autocast():
            z = self.projection_head(encode(net, x))
            z1, z2 = z.chunk(2)
            loss, stats = self._contrastive(z1, z2, labels)
        self._backward_and_step(loss)
        return {"loss": loss.detach().cpu().numpy(), "stage": 1.0, **stats}

    def _semi_step(self, batch: dict) -> dict:
        net = unwrap_network(self.network)
        x1 = batch["data"].to(self.device, non_blocking=True)
        x2 = batch["data_view2"].to(self.device, non_blocking=True)
        target = batch["target"]
        target = [t.to(self.device, non_blocking=True) for t in target] if isinstance(target, list) else \
            target.to(self.device, non_blocking=True)
        labeled = torch.as_tensor(batch["labeled"]).bool()
        lab_rows = torch.nonzero(labeled).flatten().to(self.device)
        unl_rows = torch.nonzero(~labeled).flatten().to(self.device)
        local, length = stage_epoch(self.current_epoch, self.pretrain_epochs, self.num_epochs)
        stats = {"stage": 2.0}
        self.optimizer.zero_grad(set_to_none=True)
        with self._autocast():
            x1f, dims = random_flip(x1, generator=self._flip_generator)
            skips = net.encoder(x1f)
            output = flip_batch(net.decoder(skips), dims)
            if isinstance(output, (list, tuple)):  # deep supervision: one output and target per scale
                out_list = list(output)
                sup = self.loss([o[lab_rows] for o in output], [t[lab_rows] for t in target])
            else:
                out_list = [output]
                sup = self.loss(output[lab_rows], target[lab_rows])
            loss = sup
            stats["sup_loss"] = sup.detach()
            if len(unl_rows) > 0 and self.lambda_reg > 0:
                t_out = self.teacher(x2[unl_rows])
                t_out = t_out[0] if isinstance(t_out, (list, tuple)) else t_out
                mt = mean_teacher_consistency(out_list[0][unl_rows], t_out)
                w_mt = self.lambda_reg * sigmoid_rampup(local, self.mt_rampup_fraction * length)
                loss = loss + w_mt * mt
                stats.update(mt_loss=mt.detach(), mt_weight=w_mt)
            if len(unl_rows) > 1 and self.lambda_sp > 0:
                z1 = self.projection_head(skips[-1][unl_rows])
                z2 = self.projection_head(encode(net, x2[unl_rows]))
                sp, sp_stats = self._contrastive(z1, z2, self._labels(batch, unl_rows.cpu()))
                loss = loss + self.lambda_sp * sp
                stats.update(sp_stats)
        self._backward_and_step(loss)
        self.teacher.update(self.network)
        return {"loss": loss.detach().cpu().numpy(), **stats}

    # ------------------------------------------------------------------ logging
    def on_train_epoch_end(self, train_outputs):
        super().on_train_epoch_end(train_outputs)
        log = self.logger.local_logger.my_fantastic_logging
        stage = float(stage_of(self.current_epoch, self.pretrain_epochs))
        values = {k: float(torch.stack(v).float().mean()) if all(torch.is_tensor(x) for x in v)
                  else float(np.mean(v)) for k, v in self._epoch_means.items()}  # one device sync per key
        values["stage"] = stage
        parts = []
        for key in log:
            if key in self.LOG_KEYS or any(key.startswith(p + "_") for p in ("sp_loss", "gamma", "w_mean",
                                                                               "w_nonzero")):
                v = values.get(key, float("nan"))
                self.logger.log(key, v, self.current_epoch)
                if not np.isnan(v) and key != "stage":
                    parts.append(f"{key} {v:.4g}")
        self.print_to_log_file(f"stage {int(stage)}: " + ", ".join(parts))

    def on_epoch_end(self):
        super().on_epoch_end()
        if self.local_rank == 0:
            try:
                from nnunet_contrastive.framework.plotting import plot_contrastive_progress

                plot_contrastive_progress(self.logger.local_logger.my_fantastic_logging,
                                          os.path.join(self.output_folder, "progress_contrastive.png"),
                                          self.active_meta_labels)
            except Exception as e:  # a plot must never stop training
                self.print_to_log_file(f"progress_contrastive.png not drawn: {e}")

    # ------------------------------------------------------------------ checkpoints and inference
    def extra_checkpoint_state(self) -> dict:
        state = super().extra_checkpoint_state()
        state.update(projection_head=self.projection_head.state_dict(), teacher=self.teacher.state_dict(),
                     pretrain_epochs=self.pretrain_epochs, active_meta_labels=list(self.active_meta_labels),
                     stage=stage_of(min(self.current_epoch, self.num_epochs - 1), self.pretrain_epochs),
                     flip_generator=self._flip_generator.get_state())
        return state

    def load_extra_checkpoint_state(self, state: dict) -> None:
        super().load_extra_checkpoint_state(state)
        if "projection_head" not in state:
            raise RuntimeError(f"{type(self).__name__}: the checkpoint has no projection head / teacher state "
                               f"(key 'nnunet_contrastive'): it was not written by this trainer.")
        if state.get("pretrain_epochs", self.pretrain_epochs) != self.pretrain_epochs:
            raise RuntimeError(f"checkpoint was trained with pretrain_epochs={state['pretrain_epochs']}, this run has "
                               f"{self.pretrain_epochs}: set {PRETRAIN_ENV} to the old value to resume.")
        self.projection_head.load_state_dict(state["projection_head"])
        self.teacher.load_state_dict(state["teacher"])
        if "flip_generator" in state:
            self._flip_generator.set_state(state["flip_generator"].cpu())  # loaded with map_location=device
        self._loaded_checkpoint = True

    def on_train_end(self):
        super().on_train_end()
        if self.local_rank == 0 and not self.disable_checkpointing and self.pretrain_epochs < self.num_epochs:
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
        if self.pretrain_epochs >= self.num_epochs:
            self.print_to_log_file("Pre-training only: the decoder is untrained, final validation skipped. Use this "
                                   "checkpoint with -pretrained_weights.")
            return
        super().perform_actual_validation(save_probabilities)


# ---------------------------------------------------------------------------------------------------- variants
class nnUNetTrainerSPConPretrain(nnUNetTrainerSPCon):
    """Stage 1 only: its checkpoint initialises any trainer (stock nnUNetTrainer too) via -pretrained_weights."""
    pretrain_only = True


class nnUNetTrainerSPConSemiOnly(nnUNetTrainerSPCon):
    """Stage 2 only, from scratch (or from -pretrained_weights of nnUNetTrainerSPConPretrain)."""
    pretrain_epochs = 0


class nnUNetTrainerSPConHard(nnUNetTrainerSPCon):
    """Hard self-paced weights 1[l <= gamma] (Eq. 7) instead of linear ones."""
    weighting = "hard"


class nnUNetTrainerSPConPosition(nnUNetTrainerSPCon):
    """Slice position (partition) as the only meta-label."""
    meta_labels = (PARTITION,)


class nnUNetTrainerSPConPatient(nnUNetTrainerSPCon):
    """Patient id as the only meta-label."""
    meta_labels, required_meta_labels = ("patient",), ("patient",)


class nnUNetTrainerSPConPhase(nnUNetTrainerSPCon):
    """Cardiac phase as the only meta-label; stops at start on datasets without a 'phase' column."""
    meta_labels, required_meta_labels = ("phase",), ("phase",)
