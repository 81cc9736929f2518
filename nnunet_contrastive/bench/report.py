"""Tables and plot of `nnunet-contrastive benchmark`: pure arithmetic on the per-run results, Markdown, PNG.

Definitions (every number of the label-efficiency table comes from these functions; tested against hand-computed
values in tests/test_benchmark.py):

- mean ± std over seeds: arithmetic mean and SAMPLE standard deviation (ddof = 1); the std is None (not shown)
  with a single seed.
- gain over the baseline (nnUNetTrainerFewLabels) at the same N: mean over the seeds both have of
  (trainer's mean Dice − baseline's mean Dice) for that seed (paired by seed), ± the sample std of those differences.
- fraction of the gap closed: (ours − few) / (full − few) with ours and few the seed-mean mean Dice of the trainer
  and of the baseline at the same N, and full the seed-mean mean Dice of the baseline with every training case
  labeled (N = "all"). None when full − few <= 0 (no gap to close), at N = "all" itself, or when a number is missing.
- validation mean Dice: nnU-Net's final validation of each run (full volumes of the fold's validation cases), mean
  ± std over seeds; hyperparameters and variants are chosen on it, never on the test volumes.
- 95 % intervals of the gain, two kinds, each saying what varies:
  - over seeds: Student's t interval of the per-seed paired differences (mean ± t(0.975, k−1) · std / sqrt(k), k
    seeds; none with one seed). Training randomness and the labeled subset vary; the test set is fixed.
  - over test volumes: percentile bootstrap (10 000 resamples, fixed generator) of the per-volume paired differences
    of mean foreground Dice, each volume's difference averaged over the common seeds. The test set varies; the
    training runs are fixed, so with one seed it says nothing about another seed or subset.
"""
from __future__ import annotations

import math
from typing import Iterable, Sequence

ALL = "all"


# ------------------------------------------------------------------------------------------------ arithmetic
def mean_std(values: Iterable[float]) -> tuple[float | None, float | None]:
    """(mean, sample std with ddof=1); std None for fewer than 2 values, both None for none."""
    vals = [float(v) for v in values]
    if not vals:
        return None, None
    mean = sum(vals) / len(vals)
    if len(vals) < 2:
        return mean, None
    var = sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)
    return mean, math.sqrt(var)


def gap_closed(ours: float | None, few: float | None, full: float | None) -> float | None:
    """(ours − few) / (full − few); None when a value is missing or the gap full − few is not positive."""
    if ours is None or few is None or full is None:
        return None
    gap = full - few
    if not gap > 1e-12:
        return None
    return (ours - few) / gap


def paired_gain(ours_by_seed: dict, base_by_seed: dict) -> tuple[float | None, float | None, list]:
    """Mean ± sample std over the common seeds of ours[seed] − base[seed]; also returns the seeds used."""
    seeds = sorted(set(ours_by_seed) & set(base_by_seed))
    mean, std = mean_std(ours_by_seed[s] - base_by_seed[s] for s in seeds)
    return mean, std, seeds


def t_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float] | None:
    """Student's t interval of the mean of `values` (None with fewer than two)."""
    from scipy import stats

    values = [float(v) for v in values]
    if len(values) < 2:
        return None
    mean, std = mean_std(values)
    half = float(stats.t.ppf(0.5 + level / 2, len(values) - 1)) * std / math.sqrt(len(values))
    return mean - half, mean + half


def bootstrap_interval(values: Sequence[float], level: float = 0.95, reps: int = 10000,
                       seed: int = 0) -> tuple[float, float] | None:
    """Percentile bootstrap interval of the mean of `values` (None when empty); reproducible (fixed generator)."""
    import numpy as np

    x = np.asarray([float(v) for v in values], dtype=float)
    if x.size == 0:
        return None
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(reps, x.size))].mean(axis=1)
    lo, hi = np.quantile(means, [0.5 - level / 2, 0.5 + level / 2])
    return float(lo), float(hi)


def paired_case_differences(ours: dict, base: dict) -> list[float]:
    """Per test volume, ours − base of the volume's mean Dice, averaged over the seeds both have.

    `ours`, `base`: seed -> {case: mean Dice of that volume} (a seed may be missing or have no per-case Dice).
    Volumes missing from one side of a seed, or with a None (NaN) Dice, are left out of that seed."""
    per_case = {}
    for seed in sorted(set(ours) & set(base)):
        o, b = ours[seed] or {}, base[seed] or {}
        for case in sorted(set(o) & set(b)):
            if o[case] is not None and b[case] is not None:
                per_case.setdefault(case, []).append(o[case] - b[case])
    return [sum(v) / len(v) for _, v in sorted(per_case.items())]


def n_sort_key(n) -> tuple:
    """Numbers ascending, then 'all'."""
    return (1, 0) if n == ALL else (0, int(n))


def summarize(results: Sequence[dict], trainers: Sequence[str], num_labeled: Sequence, classes: Sequence[str],
              baseline: str) -> list[dict]:
    """One row per (N, trainer) from per-run results ({'trainer', 'num_labeled', 'seed', 'dice': {class: v,
    'mean': v}}). Rows of missing runs have n_seeds 0 and None values."""
    by, cases, val = {}, {}, {}
    for r in results:
        by.setdefault((r["trainer"], r["num_labeled"]), {})[r["seed"]] = r["dice"]
        if r.get("val_dice"):
            val.setdefault((r["trainer"], r["num_labeled"]), []).append(r["val_dice"]["mean"])
        if r.get("dice_per_case"):
            cases.setdefault((r["trainer"], r["num_labeled"]), {})[r["seed"]] = {
                c: d.get("mean") for c, d in r["dice_per_case"].items()}

    def seed_means(trainer, n):
        return {s: d["mean"] for s, d in by.get((trainer, n), {}).items()}

    full = mean_std(seed_means(baseline, ALL).values())[0]
    rows = []
    for n in sorted(num_labeled, key=n_sort_key):
        few_by_seed = seed_means(baseline, n)
        few = mean_std(few_by_seed.values())[0]
        for tr in trainers:
            runs = by.get((tr, n), {})
            row = {"trainer": tr, "num_labeled": n, "seeds": sorted(runs), "n_seeds": len(runs), "dice": {}}
            for c in list(classes) + ["mean"]:
                m, s = mean_std(runs[seed][c] for seed in sorted(runs))
                row["dice"][c] = {"mean": m, "std": s}
            m, sd = mean_std(val.get((tr, n), []))
            row["val_dice"] = {"mean": m, "std": sd, "n_seeds": len(val.get((tr, n), []))}
            ours_by_seed = seed_means(tr, n)
            if tr == baseline:
                row["gain"] = {"mean": None, "std": None, "seeds": [], "ci_seeds": None, "ci_cases": None,
                               "n_cases": 0}
                row["gap_closed"] = None
            else:
                g, gs, seeds = paired_gain(ours_by_seed, few_by_seed)
                diffs = paired_case_differences(cases.get((tr, n), {}), cases.get((baseline, n), {}))
                row["gain"] = {"mean": g, "std": gs, "seeds": seeds,
                               "ci_seeds": t_interval([ours_by_seed[s] - few_by_seed[s] for s in seeds]),
                               "ci_cases": bootstrap_interval(diffs), "n_cases": len(diffs)}
                row["gap_closed"] = None if n == ALL else gap_closed(row["dice"]["mean"]["mean"], few, full)
            rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------------ formatting
def fmt(mean: float | None, std: float | None = None, digits: int = 3, signed: bool = False) -> str:
    if mean is None:
        return "—"
    s = f"{mean:+.{digits}f}" if signed else f"{mean:.{digits}f}"
    return s if std is None else f"{s} ± {std:.{digits}f}"


def fmt_interval(ci, digits: int = 3) -> str:
    return "—" if ci is None else f"[{ci[0]:+.{digits}f}, {ci[1]:+.{digits}f}]"


def n_label(n, num_train: int) -> str:
    return f"all ({num_train})" if n == ALL else str(n)


def label_efficiency_markdown(rows: Sequence[dict], classes: Sequence[str], baseline: str, num_train: int) -> str:
    head = (["N labeled", "trainer", "seeds"] + [f"Dice {c}" for c in classes]
            + ["mean Dice", "validation mean Dice", f"gain vs {baseline}", "95 % CI over seeds", "95 % CI over test volumes",
               "gap closed"])
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        d = r["dice"]
        if r["trainer"] == baseline:
            gain, ci_s, ci_c, gap = "(reference)", "—", "—", "—"
        else:
            gain = fmt(r["gain"]["mean"], r["gain"]["std"], signed=True)
            ci_s, ci_c = fmt_interval(r["gain"].get("ci_seeds")), fmt_interval(r["gain"].get("ci_cases"))
            gap = "—" if r["gap_closed"] is None else f"{r['gap_closed']:.2f}"
        cells = ([n_label(r["num_labeled"], num_train), r["trainer"], str(r["n_seeds"])]
                 + [fmt(d[c]["mean"], d[c]["std"]) for c in classes]
                 + [fmt(d["mean"]["mean"], d["mean"]["std"]),
                    fmt(r["val_dice"]["mean"], r["val_dice"]["std"]) if "val_dice" in r else "—", gain, ci_s, ci_c,
                    gap])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def per_seed_markdown(results: Sequence[dict], trainers: Sequence[str], num_labeled: Sequence, baseline: str,
                      num_train: int) -> str:
    """One row per (N, seed) with a baseline run: the labeled cases, then for the baseline and each other trainer
    the test mean Dice, its paired gain over the baseline of the same seed and the validation mean Dice ("—" where
    a run or its validation score is missing). The all-labeled rows are left out (no subset to pair on)."""
    by = {(r["trainer"], r["num_labeled"], r["seed"]): r for r in results}
    others = [t for t in trainers if t != baseline]
    head = (["N labeled", "seed", "labeled cases", f"{baseline} test / validation"]
            + [f"{t} test (gain) / validation" for t in others])
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]

    def val(r):
        return fmt(r["val_dice"]["mean"]) if r.get("val_dice") else "—"

    for n in sorted((n for n in num_labeled if n != ALL), key=n_sort_key):
        for seed in sorted(s for (t, m, s) in by if t == baseline and m == n):
            base = by[(baseline, n, seed)]
            cells = [n_label(n, num_train), str(seed), ", ".join(base.get("labeled") or []) or "—",
                     f"{fmt(base['dice']['mean'])} / {val(base)}"]
            for t in others:
                r = by.get((t, n, seed))
                cells.append("—" if r is None else f"{fmt(r['dice']['mean'])} "
                             f"({fmt(r['dice']['mean'] - base['dice']['mean'], signed=True)}) / {val(r)}")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def cost_markdown(cost_rows: Sequence[dict], reference: str = "nnUNetTrainer") -> str:
    """One row per (trainer, stage): time per iteration, peak host memory and, when measured on CUDA, peak GPU
    memory, each with its ratio to stock nnUNetTrainer; the mean training loss of the measured iterations, flagged
    when any value (total or a named term) was not finite."""
    gpu = any("cuda_max_allocated_mib" in r for r in cost_rows)
    head = (["trainer", "stage", "s/it (load + step)", "× stock", "step only (s)", "peak RSS (MiB)", "× stock"]
            + (["peak GPU memory (MiB)", "× stock"] if gpu else []) + ["loss", "timed its"])
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in cost_rows:
        stage = "—" if r.get("stage") is None else str(r["stage"])
        name = r["trainer"] + (" (reference)" if r["trainer"] == reference and r.get("stage") is None else "")
        cells = [name, stage, f"{r['s_per_it']:.3f}", f"{r['s_per_it_ratio']:.2f}", f"{r['step_s']:.3f}",
                 f"{r['peak_rss_mib']:.0f}", f"{r['peak_rss_ratio']:.2f}"]
        if gpu:
            mem, ratio = r.get("cuda_max_allocated_mib"), r.get("cuda_memory_ratio")
            cells += ["—" if mem is None else f"{mem:.0f}", "—" if ratio is None else f"{ratio:.2f}"]
        if r.get("loss_mean") is None:
            loss = "—"
        else:
            loss = f"{r['loss_mean']:.3g}" + ("" if r.get("loss_finite") else " **not finite**")
        cells += [loss, str(r["timed_iterations"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def augmentation_note(cost_rows: Sequence[dict]) -> str:
    """Where the measured rows ran nnU-Net's data augmentation (nnUNet_n_proc_DA as recorded by each row)."""
    values = sorted({str(r.get("n_proc_DA", "0")) for r in cost_rows})
    if values == ["0"]:
        return "data augmentation in the same process, nnUNet_n_proc_DA=0"
    return "data augmentation in nnUNet_n_proc_DA=" + "/".join(values) + " background workers"


def loss_markdown(loss_rows: Sequence[dict], step_label: str) -> str:
    head = ["2N embeddings", "supcon_loss fwd+bwd (ms)", "per_label_loop_supcon (ms)", "speed-up",
            f"supcon_loss / {step_label}", f"reference / {step_label}", "max |diff|"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in loss_rows:
        frac = r.get("fraction_of_step")
        frac_ref = r.get("reference_fraction_of_step")
        cells = [str(r["two_n"]) + (" (training batch)" if r.get("training_batch") else ""),
                 f"{r['supcon_ms']:.2f}", f"{r['reference_ms']:.2f}", f"{r['reference_ms'] / r['supcon_ms']:.1f}×",
                 "—" if frac is None else f"{frac:.1%}", "—" if frac_ref is None else f"{frac_ref:.1%}",
                 f"{r['max_abs_diff']:.1e}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ plot
def plot_dice_vs_labeled(rows: Sequence[dict], trainers: Sequence[str], baseline: str, num_train: int, path: str,
                         title: str) -> str | None:
    """Mean Dice vs number of labeled volumes, one line per trainer (error bars = std over seeds when > 1 seed);
    the baseline with every case labeled (upper bound) as a dashed horizontal line. Returns the path, or None when
    there is nothing to plot."""
    import matplotlib

    matplotlib.use("agg")
    import matplotlib.pyplot as plt

    numeric = sorted({r["num_labeled"] for r in rows if r["num_labeled"] != ALL}, key=int)
    if not any(r["dice"]["mean"]["mean"] is not None for r in rows):
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=90)
    markers = "osD^v<>p*h"
    for i, tr in enumerate(trainers):
        pts = [(int(r["num_labeled"]), r["dice"]["mean"]["mean"], r["dice"]["mean"]["std"]) for r in rows
               if r["trainer"] == tr and r["num_labeled"] != ALL and r["dice"]["mean"]["mean"] is not None]
        color = f"C{i}"
        if pts:
            xs, ys, es = zip(*pts)
            yerr = [e or 0.0 for e in es] if any(e is not None for e in es) else None
            ax.errorbar(xs, ys, yerr=yerr, marker=markers[i % len(markers)], capsize=3, color=color, label=tr)
        if tr != baseline:
            full_other = [r for r in rows if r["trainer"] == tr and r["num_labeled"] == ALL
                          and r["dice"]["mean"]["mean"] is not None]
            if full_other:
                ax.axhline(full_other[0]["dice"]["mean"]["mean"], ls=":", lw=1, color=color,
                           label=f"{tr}, all {num_train} labeled")
    full = [r for r in rows if r["trainer"] == baseline and r["num_labeled"] == ALL
            and r["dice"]["mean"]["mean"] is not None]
    if full:
        ax.axhline(full[0]["dice"]["mean"]["mean"], ls="--", color="k",
                   label=f"{baseline}, all {num_train} labeled (upper bound)")
    if numeric:
        ax.set_xscale("log", base=2)
        ax.set_xticks([int(n) for n in numeric])
        ax.set_xticklabels([str(n) for n in numeric])
    ax.set_xlabel("labeled training volumes (N)")
    ax.set_ylabel("mean foreground Dice, held-out test set")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_learning_curves(results: list[dict], baseline: str, path: str, title: str) -> str | None:
    """Validation pseudo-Dice per epoch of `baseline` at the smallest and the largest N (mean over seeds)."""
    import math

    import matplotlib

    matplotlib.use("agg")
    import matplotlib.pyplot as plt

    runs = [r for r in results if r["trainer"] == baseline and r.get("val_curve")]
    if not runs:
        return None
    ns = sorted({r["num_labeled"] for r in runs}, key=n_sort_key)
    fig, ax = plt.subplots(figsize=(7, 4))
    for n in dict.fromkeys([ns[0], ns[-1]]):
        curves = [r["val_curve"] for r in runs if r["num_labeled"] == n]
        length = min(len(c) for c in curves)
        mean = [sum(c[i] for c in curves) / len(curves) for i in range(length)]
        if all(math.isnan(v) for v in mean):
            continue
        ax.plot(range(1, length + 1), mean, marker="o", label=f"N = {n} ({len(curves)} seed(s))")
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation pseudo-Dice (mean fg)")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
