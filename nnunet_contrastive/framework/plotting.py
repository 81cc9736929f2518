"""progress_contrastive.png beside nnU-Net's progress.png: one panel per loss term, every stat it logged, by name."""
from __future__ import annotations

import math

import matplotlib

matplotlib.use("agg")
import matplotlib.pyplot as plt  # noqa: E402


def _series(log: dict, key: str, n: int) -> list[float]:
    values = list(log.get(key, []))[:n]
    return values + [math.nan] * (n - len(values))


def plot_term_progress(log: dict, term_keys: dict, path: str) -> None:
    """``term_keys``: term name -> the stat keys it logged (the trainer records them as they appear). Stage
    switches (the logged ``stage`` changes) are drawn as dotted lines."""
    n = len(log.get("train_losses", []))
    if n == 0 or not term_keys:
        return
    x = list(range(n))
    stage = _series(log, "stage", n)
    switches = [i for i in range(1, n) if stage[i] != stage[i - 1] and not math.isnan(stage[i])]
    fig, axes = plt.subplots(len(term_keys), 1, figsize=(12, 3.5 * len(term_keys)), sharex=True, squeeze=False)
    for ax, (term, keys) in zip(axes[:, 0], term_keys.items()):
        for key in keys:
            values = _series(log, key, n)
            if all(math.isnan(v) or math.isinf(v) for v in values):
                continue
            ax.plot(x, values, label=key, lw=2 if key == f"{term}_loss" else 1)
        for s in switches:
            ax.axvline(s, color="grey", ls=":")
        ax.set_title(f"term '{term}'")
        ax.legend(loc="best", fontsize=8)
    axes[-1, 0].set_xlabel("epoch (dotted: stage switch)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
