"""progress_contrastive.png: the contrastive and Mean-Teacher curves next to nnU-Net's progress.png."""
from __future__ import annotations

import math

import matplotlib

matplotlib.use("agg")
import matplotlib.pyplot as plt  # noqa: E402


def _series(log: dict, key: str, n: int) -> list[float]:
    values = list(log.get(key, []))[:n]
    return values + [math.nan] * (n - len(values))


def plot_contrastive_progress(log: dict, path: str, meta_labels) -> None:
    """Per epoch: SP-con loss per meta-label, gamma, self-paced weights (mean, fraction non-zero), MT loss/weight."""
    n = len(log.get("train_losses", []))
    if n == 0:
        return
    x = list(range(n))
    fig, axes = plt.subplots(4, 1, figsize=(12, 14), sharex=True)
    for m in meta_labels:
        axes[0].plot(x, _series(log, f"sp_loss_{m}", n), label=f"SP-con loss {m}")
        axes[1].plot(x, _series(log, f"gamma_{m}", n), label=f"gamma {m}")
        axes[2].plot(x, _series(log, f"w_mean_{m}", n), label=f"mean weight {m}")
        axes[2].plot(x, _series(log, f"w_nonzero_{m}", n), ls="--", label=f"fraction w>0 {m}")
    axes[0].plot(x, _series(log, "sp_loss", n), color="k", lw=2, label="SP-con total")
    axes[3].plot(x, _series(log, "mt_loss", n), label="MT loss")
    axes[3].plot(x, _series(log, "mt_weight", n), label="MT weight")
    axes[3].plot(x, _series(log, "sup_loss", n), label="supervised loss (stage 2)")
    stage = _series(log, "stage", n)
    switch = next((i for i, s in enumerate(stage) if s == 2.0), None)
    for ax, title in zip(axes, ("contrastive loss", "gamma (Eq. 16)", "self-paced weights", "Mean Teacher")):
        if switch is not None:
            ax.axvline(switch, color="grey", ls=":", label="stage 2")
        ax.set_title(title)
        ax.legend(loc="best", fontsize=8)
    axes[-1].set_xlabel("epoch")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
