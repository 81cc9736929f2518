"""Two-stage training bookkeeping: which stage an nnU-Net epoch belongs to, and nnU-Net's poly LR per stage.

Stage 1 covers epochs [0, pretrain_epochs), stage 2 the rest of `num_epochs`. Everything is a function of the epoch
index, so a resumed run (`--c`, which restores `current_epoch`) is in exactly the same stage, at the same learning
rate and the same self-paced gamma as the interrupted one.
"""
from __future__ import annotations

from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler


def stage_of(epoch: int, pretrain_epochs: int) -> int:
    """1 during pre-training, 2 afterwards."""
    if epoch < 0:
        raise ValueError(f"epoch must be >= 0, got {epoch}")
    return 1 if epoch < pretrain_epochs else 2


def stage_epoch(epoch: int, pretrain_epochs: int, num_epochs: int) -> tuple[int, int]:
    """(epoch within its stage, length of that stage)."""
    if stage_of(epoch, pretrain_epochs) == 1:
        return epoch, pretrain_epochs
    return epoch - pretrain_epochs, max(1, num_epochs - pretrain_epochs)


class StagePolyLRScheduler(PolyLRScheduler):
    """nnU-Net's poly schedule, lr0 * (1 - e / L) ** 0.9, restarted at the stage boundary (e, L stage-local)."""

    def __init__(self, optimizer, initial_lr: float, pretrain_epochs: int, num_epochs: int, exponent: float = 0.9):
        if not 0 <= pretrain_epochs <= num_epochs:
            raise ValueError(f"need 0 <= pretrain_epochs ({pretrain_epochs}) <= num_epochs ({num_epochs})")
        self.pretrain_epochs = pretrain_epochs
        self.total_epochs = num_epochs
        super().__init__(optimizer, initial_lr, num_epochs, exponent)

    def step(self, current_step=None):
        if current_step is None or current_step == -1:
            current_step = self.ctr
            self.ctr += 1
        local, length = stage_epoch(int(current_step), self.pretrain_epochs, self.total_epochs)
        new_lr = self.initial_lr * max(0.0, 1 - local / length) ** self.exponent
        for group in self.optimizer.param_groups:
            group["lr"] = new_lr
        self._last_lr = [g["lr"] for g in self.optimizer.param_groups]
