"""`nnunet-contrastive benchmark`: label efficiency and cost of our trainers on real data (MSD hippocampus, ACDC).

Everything runs through nnU-Net's own commands (nnunet_contrastive.prep.pipeline); this module only arranges data,
splits, budgets and the report.

Data (`prepare_data`; the datasets and their split and labeled-subset rules: nnunet_contrastive.bench.datasets)
    `Task04_Hippocampus` (MSD layout) is converted with `convert_msd`, ACDC with `convert_acdc`, into
    `<workdir>/nnUNet_raw`. A FIXED held-out test set — hippocampus: `test_cases` cases drawn with `split_seed`;
    ACDC: the test patients of ssl4mis_split.json — is then MOVED from imagesTr/labelsTr to
    imagesTs/labelsTs (numTraining and metadata.csv updated) BEFORE `nnUNetv2_plan_and_preprocess`, so the test
    volumes are never planned on, preprocessed or trained on. The remaining cases form the training pool (`--quick`
    keeps only `pool_size` of them and deletes the rest from the converted copy). `val_cases` pool cases (same seed)
    are nnU-Net's validation cases; train = pool − val. Our own `splits_final.json` has ONE fold (fold 0) with these
    train / val lists; before each run the labeled subset of that fold is drawn with
    `nnunet_contrastive.data.labeled.apply_selection(splits, N, seed)` (N = "all": every train case labeled, no unlabeled
    data). The split is recorded in `<workdir>/benchmark_setup.json`.

Budget
    Every trainer gets the same plans (nnU-Net's 2d plans + the dataset's CPU-tier override: hippocampus `cpu_small`,
    batch 8; ACDC `acdc_cpu`, 2.5 mm in-plane, patch 128 x 128, half the features, batch 8, preprocessed with `nnUNetv2_preprocess
    -plans_name`; `--plans-override none`: nnU-Net's own plans, the GPU tier) and the same number of
    training iterations with labels, `epochs x iterations` (env nnUNet_contrastive_epochs / _iterations).
    Pre-training stages (the stages a trainer declares `pretraining`: label-free) are run ONCE per seed, on every
    training image, and reused by every N (`-pretrained_weights`); their `pretrain_epochs x iterations` and wall time
    are reported in their own column. `--pretraining inside` restores the older rule (pre-training counted inside the
    same total). Runs are seeded (nnUNet_contrastive_seed = the run's seed), so paired runs differ only in the
    method. Predictions use `checkpoint_final.pth` (the student network) for every trainer.

Runs
    One run = (trainer, N, seed): write the split, `nnUNetv2_train DATASET 2d 0 -tr T -p <the tier's plans>`
    with its own nnUNet_results folder, `nnUNetv2_predict` on imagesTs, `nnUNetv2_evaluate_folder` against labelsTs.
    Its result is `<workdir>/runs/<budget>[_<plans>]/<trainer>/N<n>_seed<s>/result.json` (`Config.tag`); a run with that file is skipped, an
    interrupted one continues: training with `nnUNetv2_train --c` from its `checkpoint_latest.pth` (written every
    epoch, with the random generators' states, so a resumed run with nnUNet_n_proc_DA=0 draws what the
    uninterrupted one would have; result.json records `resumed_at_epoch`), or prediction from
    `checkpoint_final.pth`. The seed draws the
    labeled subset and seeds nnU-Net's training. FewLabels' validation pseudo-Dice per epoch (nnU-Net's online
    validation) is kept as the learning curve: the report plots it at the smallest and the largest N.

Outputs (in `--out`, default `<workdir>/report`): `results.md`, `results.json`, `dice_vs_labeled.png`.
"""
from __future__ import annotations

import dataclasses
import json
import os
import platform
import re
import shlex
import shutil
import sys
import time
from dataclasses import dataclass, field

from nnunet_contrastive.bench.report import ALL, n_sort_key
from nnunet_contrastive.errors import UserInputError

BASELINE = "nnUNetTrainerFewLabels"
DEFAULT_TRAINERS = [BASELINE, "nnUNetTrainerSPCon"]
PLANS_OVERRIDE = "cpu_small"  # the default CPU tier; datasets name their own (BenchDataset.plans_override)
NO_OVERRIDE = "none"  # --plans-override none: nnU-Net's own plans (the GPU tier)
SETUP_FILE = "benchmark_setup.json"

# Budgets: FULL is the default run (2 trainers x 4 N x 1 seed on 2 idle CPU cores: see docs/results/);
# QUICK only exercises every code path (CI), its numbers mean nothing.
FULL = dict(epochs=10, iterations=100, val_iterations=4, pretrain_epochs=2, cost_warmup=3, cost_iterations=20,
            loss_sizes=[64, 128, 256, 512], loss_reps=20, disable_tta=False, workdir="nnunet_contrastive_benchmark")
QUICK = dict(epochs=2, iterations=3, val_iterations=1, pretrain_epochs=1, cost_warmup=1, cost_iterations=2,
             loss_sizes=[64, 128], loss_reps=3, disable_tta=True, workdir="nnunet_contrastive_benchmark_quick")


class BenchmarkError(UserInputError):
    """Bad input or an unusable work folder; the message says what to change."""


@dataclass
class Budget:
    epochs: int
    iterations: int
    val_iterations: int
    pretrain_epochs: int
    disable_tta: bool = False
    pretraining: str = "separate"  # "separate": once per seed, outside the budget; "inside": part of it

    @property
    def total_iterations(self) -> int:
        return self.epochs * self.iterations

    @property
    def tag(self) -> str:
        return (f"e{self.epochs}_i{self.iterations}_v{self.val_iterations}_p{self.pretrain_epochs}"
                + ("" if self.pretraining == "inside" else "sep")
                + ("_notta" if self.disable_tta else ""))

    def describe(self, two_stage: list[str], plans: str = f"nnUNetPlans_{PLANS_OVERRIDE}", batch_size: int = 8) -> str:
        s = (f"{self.epochs} epochs x {self.iterations} iterations = {self.total_iterations} training iterations per "
             f"run for every trainer (batch {batch_size}, plans {plans}; {self.val_iterations} validation "
             f"iterations per epoch, not counted)")
        if two_stage:
            p, e, i = self.pretrain_epochs, self.epochs, self.iterations
            if self.pretraining == "inside":
                s += (f"; {', '.join(two_stage)}: {p}x{i} = {p * i} contrastive pre-training + {e - p}x{i} = "
                      f"{(e - p) * i} stage-2 iterations = {e * i} in all")
            else:
                s += (f"; {', '.join(two_stage)}: the same {e}x{i} = {e * i} iterations after {p}x{i} = {p * i} "
                      f"label-free pre-training iterations per pre-training stage, run once per seed and reused by "
                      f"every N (cost reported apart)")
        return s


@dataclass
class Config:
    data: str
    workdir: str
    out: str
    trainers: list[str]
    num_labeled: list  # ints and/or "all"
    seeds: list[int]
    budget: Budget
    dataset_id: int
    test_cases: int
    val_cases: int
    pool_size: int | None
    split_seed: int = 0
    device: str = "cpu"
    quick: bool = False
    skip_cost: bool = False
    skip_label_efficiency: bool = False
    cost_warmup: int = 3
    cost_iterations: int = 20
    loss_sizes: list[int] = field(default_factory=list)
    loss_reps: int = 20
    command: str = ""
    dataset: str = "hippocampus"
    plans_override: str | None = None  # None: the dataset's CPU tier; NO_OVERRIDE: nnU-Net's own plans
    report_only: bool = False  # the report of the finished runs; nothing trains
    imports: list[str] = field(default_factory=list)  # earlier reports' results.json whose runs are imported
    share_warmup: bool = False  # start a run from an equal warm-up of another trainer's run (same N, seed)

    @property
    def override(self) -> str:
        """The plans override of this benchmark (a built-in name, a JSON path, or NO_OVERRIDE)."""
        return self.plans_override or self.spec.plans_override

    @property
    def tag(self) -> str:
        """Folder name of this budget and plans under runs/, pretraining/ and cost/ (the cpu_small plans keep the
        plain budget tag of earlier benchmarks, so their work folders resume)."""
        if self.override == PLANS_OVERRIDE:
            return self.budget.tag
        name = "nnUNetPlans" if self.override == NO_OVERRIDE else os.path.splitext(os.path.basename(self.override))[0]
        return f"{self.budget.tag}_{name}"

    @property
    def spec(self):
        from nnunet_contrastive.bench.datasets import DATASETS

        return DATASETS[self.dataset]


@dataclass
class Prepared:
    raw: str
    pre: str
    dataset: str  # DatasetXXX_Name
    plans: str
    labels: dict
    classes: list[str]
    train: list[str]
    val: list[str]
    test: list[str]
    groups: dict = field(default_factory=dict)  # case -> patient
    batch_size: int = 8
    title: str = "MSD hippocampus"
    unit: str = "volumes"
    train_order: list = field(default_factory=list)  # patients in the published split's order (ACDC)
    ceiling: dict | None = None  # resolution ceiling of the plans' 2d spacing on the test labels (when not nnU-Net's)


# ------------------------------------------------------------------------------------------------ input checks
def default_data_dir(dataset: str = "hippocampus") -> str:
    """`<repository>/../shared/data/<the dataset's folder>` (a source checkout), else `<cwd>/../shared/data/...`."""
    from nnunet_contrastive.bench.datasets import DATASETS

    return DATASETS[dataset].default_dir()


def check_data(path: str, dataset: str = "hippocampus") -> str:
    from nnunet_contrastive.bench.datasets import DATASETS

    return DATASETS[dataset].check(path)


def parse_num_labeled(values) -> list:
    out = []
    for v in values:
        text = str(v).strip().lower()
        if text == ALL:
            n = ALL
        else:
            try:
                n = int(text)
            except ValueError:
                raise BenchmarkError(f"--num-labeled: '{v}' is neither a positive integer nor 'all'.") from None
            if n < 1:
                raise BenchmarkError(f"--num-labeled: {n} labeled volumes is impossible; give positive integers "
                                     f"or 'all'.")
        if n not in out:
            out.append(n)
    if not out:
        raise BenchmarkError("--num-labeled: give at least one value.")
    return sorted(out, key=n_sort_key)


def available_trainers() -> list[str]:
    import nnunet_contrastive.trainers as T

    return [t for t in T.__all__ if t not in ("nnUNetTrainerContrastiveBase", "nnUNetTrainerStaged")]


def resolve_trainers(names: list[str] | None) -> list[str]:
    """The trainers to run, baseline first (always included: every gain is measured against it)."""
    names = list(names or DEFAULT_TRAINERS)
    known = available_trainers()
    for n in names:
        if n not in known:
            raise BenchmarkError(f"unknown trainer '{n}'. Choose from: {', '.join(known)}.")
        if pretraining_only(n):
            raise BenchmarkError(f"{n} only pre-trains (its decoder is untrained): it segments nothing and cannot be "
                                 f"benchmarked. Use the trainer that fine-tunes after that pre-training.")
    out = [BASELINE] + [n for n in names if n != BASELINE]
    return list(dict.fromkeys(out))


def two_stage(trainer: str) -> bool:
    """A trainer with a label-free pre-training stage followed by a training stage (read from its declaration)."""
    from nnunet_contrastive.bench.cost import trainer_class

    cls = trainer_class(trainer)
    if not hasattr(cls, "stage_plan"):
        return False
    stages = cls.stage_plan(environ={}).stages
    return any(s.pretraining for s in stages) and not stages[-1].pretraining


def pretraining_only(trainer: str) -> bool:
    """A trainer whose last stage is label-free pre-training: its decoder is untrained, it segments nothing."""
    from nnunet_contrastive.bench.cost import trainer_class

    cls = trainer_class(trainer)
    return hasattr(cls, "stage_plan") and cls.stage_plan(environ={}).stages[-1].pretraining


def check_budget(b: Budget, trainers: list[str]) -> None:
    for name, v, lo in (("--epochs", b.epochs, 1), ("--iterations", b.iterations, 1),
                        ("--val-iterations", b.val_iterations, 1), ("--pretrain-epochs", b.pretrain_epochs, 0)):
        if v < lo:
            raise BenchmarkError(f"{name} must be >= {lo}, got {v}.")
    staged = [t for t in trainers if two_stage(t)]
    if b.pretraining not in ("separate", "inside"):
        raise BenchmarkError(f"--pretraining must be 'separate' or 'inside', got {b.pretraining!r}.")
    if staged and b.pretraining == "separate" and b.pretrain_epochs < 1:
        raise BenchmarkError(f"--pretrain-epochs must be >= 1 for {', '.join(staged)} with separate pre-training.")
    if staged and b.pretraining == "inside" and not b.pretrain_epochs < b.epochs:
        raise BenchmarkError(f"--pretrain-epochs ({b.pretrain_epochs}) must be smaller than --epochs ({b.epochs}): "
                             f"{', '.join(staged)} need at least one stage-2 epoch.")


def check_meta_labels(trainers: list[str], prep: "Prepared") -> None:
    """Trainers that require a meta-label the dataset lacks (e.g. nnUNetTrainerSPConPhase: 'phase') fail here,
    before any training, instead of at the start of their runs."""
    from nnunet_contrastive.bench.cost import trainer_class
    from nnunet_contrastive.data.metadata import load_dataset_json, read_metadata
    from nnunet_contrastive.data.meta_labels import PARTITION

    table = read_metadata(prep.raw, load_dataset_json(prep.raw))
    available = [PARTITION] + table.available_meta_labels()
    for t in trainers:
        cls = trainer_class(t)
        if getattr(cls, "meta_labels", ()):
            missing = [m for m in getattr(cls, "required_meta_labels", ()) if m not in available]
            if missing:
                raise BenchmarkError(f"{t} needs meta-label(s) {missing}, which the {prep.title} data do not have "
                                     f"(available: {available}). Leave it out of --trainers.")


# ------------------------------------------------------------------------------------------------ data
def _case_files(folder: str, case: str, ending: str, channels: int | None) -> list[str]:
    if channels is None:
        return [os.path.join(folder, case + ending)]
    return [os.path.join(folder, f"{case}_{c:04d}{ending}") for c in range(channels)]


def _setup_dict(cfg: Config) -> dict:
    return {"dataset": cfg.dataset, "source": cfg.data, "dataset_id": cfg.dataset_id, "test_cases": cfg.test_cases,
            "val_cases": cfg.val_cases, "pool_size": cfg.pool_size, "split_seed": cfg.split_seed}


def _hold_out(raw: str, cfg: Config, log) -> dict:
    """Move the held-out cases to imagesTs/labelsTs (and drop cases beyond pool_size); returns the split."""
    import numpy as np

    from nnunet_contrastive.data.metadata import METADATA_FILENAME, read_metadata, write_metadata

    with open(os.path.join(raw, "dataset.json"), encoding="utf-8") as f:
        dj = json.load(f)
    ending, channels = dj["file_ending"], len(dj["channel_names"])
    cases = sorted(f[: -len(ending)] for f in os.listdir(os.path.join(raw, "labelsTr")) if f.endswith(ending))
    table = read_metadata(raw, dj)
    groups = {c: table.value(c, "patient") for c in cases}
    test, pool, val, dropped = cfg.spec.split(cfg.data, cases, groups, cfg.test_cases, cfg.val_cases, cfg.pool_size,
                                              cfg.split_seed)
    train = [c for c in pool if c not in set(val)]
    for split in ("imagesTs", "labelsTs"):
        os.makedirs(os.path.join(raw, split), exist_ok=True)
    for case in test:
        for src in _case_files(os.path.join(raw, "imagesTr"), case, ending, channels):
            os.replace(src, os.path.join(raw, "imagesTs", os.path.basename(src)))
        os.replace(os.path.join(raw, "labelsTr", case + ending), os.path.join(raw, "labelsTs", case + ending))
    for case in dropped:
        for src in _case_files(os.path.join(raw, "imagesTr"), case, ending, channels):
            os.remove(src)
        os.remove(os.path.join(raw, "labelsTr", case + ending))
    write_metadata(os.path.join(raw, METADATA_FILENAME), {c: table.rows[c] for c in pool}, table.columns)
    write_metadata(os.path.join(raw, "metadata_Ts.csv"), {c: table.rows[c] for c in test}, table.columns)
    dj["numTraining"] = len(pool)
    dj["benchmark_holdout"] = (f"{len(test)} cases moved to imagesTs/labelsTs before planning (seed "
                               f"{cfg.split_seed}); {len(dropped)} cases removed (pool size {cfg.pool_size})")
    with open(os.path.join(raw, "dataset.json"), "w", encoding="utf-8") as f:
        json.dump(dj, f, indent=2)
    log(f"  held out {len(test)} test cases (imagesTs/labelsTs); pool {len(pool)} = {len(train)} train + "
        f"{len(val)} val" + (f"; {len(dropped)} cases not used" if dropped else ""))
    order = cfg.spec.published_split(cfg.data)["train"] if cfg.dataset == "acdc" else []
    return {"test": test, "pool": pool, "train": train, "val": val, "dropped": dropped, "groups": groups,
            "train_order": [p for p in order if any(groups[c] == p for c in train)]}


def prepare_data(cfg: Config, env: dict, log=print) -> Prepared:
    """Convert, hold out, plan and preprocess (each step skipped when already done in this workdir)."""
    from nnunet_contrastive.prep import pipeline
    from nnunet_contrastive.data.metadata import copy_metadata
    from nnunet_contrastive.prep.plans_override import derive_plans

    setup_path = os.path.join(cfg.workdir, SETUP_FILE)
    wanted = _setup_dict(cfg)
    setup = None
    if os.path.isfile(setup_path):
        with open(setup_path, encoding="utf-8") as f:
            setup = json.load(f)
        old = {k: setup.get(k) for k in wanted}
        if old != wanted:
            diff = {k: (old[k], wanted[k]) for k in wanted if old[k] != wanted[k]}
            raise BenchmarkError(f"{cfg.workdir} was prepared with a different data setup {diff} (old, new). Use "
                                 f"another --workdir, or --fresh to delete this one.")
    dataset = f"Dataset{cfg.dataset_id:03d}_{cfg.spec.name}"
    raw = os.path.join(env["nnUNet_raw"], dataset)
    pre = os.path.join(env["nnUNet_preprocessed"], dataset)
    if setup is None or not setup.get("holdout_done"):
        log(f"converting {cfg.data} ({cfg.spec.title}) into {env['nnUNet_raw']}")
        shutil.rmtree(pre, ignore_errors=True)
        cfg.spec.convert(cfg.data, cfg.dataset_id, env["nnUNet_raw"])
        split = _hold_out(raw, cfg, log)
        setup = {**wanted, **split, "holdout_done": True, "how": (
            "test cases moved from imagesTr/labelsTr to imagesTs/labelsTs before nnUNetv2_plan_and_preprocess; "
            "splits_final.json: one fold, train = pool - val")}
        with open(setup_path, "w", encoding="utf-8") as f:
            json.dump(setup, f, indent=1)
    gt = os.path.join(pre, "gt_segmentations")
    done = (os.path.isfile(os.path.join(pre, "nnUNetPlans.json")) and os.path.isdir(os.path.join(pre, "nnUNetPlans_2d"))
            and os.path.isdir(gt) and len(os.listdir(gt)) == len(setup["pool"]))
    if not done:
        log("nnUNetv2_plan_and_preprocess (2d) on the training pool")
        t0 = time.time()
        pipeline.plan_and_preprocess(cfg.dataset_id, env, log=lambda *a: None,
                                     output_file=os.path.join(cfg.workdir, "plan_and_preprocess.log"))
        log(f"  done in {time.time() - t0:.0f} s")
    copy_metadata(raw, pre)
    from nnunet_contrastive.prep.plans_override import resolved_configuration

    plans = "nnUNetPlans" if cfg.override == NO_OVERRIDE else derive_plans(pre, cfg.override)
    with open(os.path.join(pre, f"{plans}.json"), encoding="utf-8") as f:
        tier = json.load(f)
    conf = resolved_configuration(tier, "2d")
    ensure_preprocessed(cfg, pre, plans, conf["data_identifier"], len(setup["pool"]), env, log)
    with open(os.path.join(raw, "dataset.json"), encoding="utf-8") as f:
        dj = json.load(f)
    labels = dj["labels"]
    ceiling = resolution_ceiling_of(cfg, raw, pre, plans, conf["spacing"], tuple(tier.get("transpose_forward",
                                                                                          (0, 1, 2))),
                                    dj["file_ending"], log)
    classes = [k for k, v in labels.items() if v != 0 and k != "ignore"]
    return Prepared(raw=raw, pre=pre, dataset=dataset, plans=plans, labels=labels, classes=classes,
                    batch_size=int(conf["batch_size"]),
                    train=list(setup["train"]), val=list(setup["val"]), test=list(setup["test"]),
                    groups=dict(setup.get("groups", {})), train_order=list(setup.get("train_order", [])),
                    title=cfg.spec.title, unit=cfg.spec.unit, ceiling=ceiling)


def resolution_ceiling_of(cfg: Config, raw: str, pre: str, plans: str, spacing: list, transpose: tuple,
                          file_ending: str, log=print) -> dict | None:
    """The Dice a perfect network at the plans' 2d `spacing` would score on the test labels
    (nnunet_contrastive.bench.resolution), when that spacing differs from nnU-Net's own plans; cached in the
    workdir."""
    from nnunet_contrastive.bench.resolution import resolution_ceiling
    from nnunet_contrastive.prep.plans_override import resolved_configuration

    with open(os.path.join(pre, "nnUNetPlans.json"), encoding="utf-8") as f:
        own_spacing = resolved_configuration(json.load(f), "2d")["spacing"]
    if spacing == own_spacing:
        return None
    path = os.path.join(cfg.workdir, f"resolution_ceiling_{plans}.json")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    labels = os.path.join(raw, "labelsTs")
    files = sorted(os.path.join(labels, f) for f in os.listdir(labels) if f.endswith(file_ending))
    out = resolution_ceiling(files, spacing, transpose)
    out["plans"], out["own_spacing"] = plans, own_spacing
    with open(path, "w", encoding="utf-8") as f:
        json.dump(out, f, indent=1)
    log(f"  resolution ceiling of {plans} ({spacing} mm in-plane) on the test labels: mean Dice "
        f"{out['mean']['mean']:.3f}")
    return out


def ensure_preprocessed(cfg: Config, pre: str, plans: str, ident: str, n_cases: int, env: dict, log=print) -> None:
    """Run nnUNetv2_preprocess for plans whose 2d configuration has its own data_identifier `ident` (an override that
    changes the spacing, e.g. acdc_cpu) unless its folder already holds every training-pool case."""
    from nnunet_contrastive.prep import pipeline

    folder = os.path.join(pre, ident)
    if os.path.isdir(folder) and sum(f.endswith(".pkl") for f in os.listdir(folder)) == n_cases:
        return
    log(f"nnUNetv2_preprocess -plans_name {plans} (2d data '{ident}')")
    t0 = time.time()
    pipeline.preprocess(cfg.dataset_id, plans, env, log=lambda *a: None,
                        output_file=os.path.join(cfg.workdir, f"preprocess_{plans}.log"))
    log(f"  done in {time.time() - t0:.0f} s")


def write_split(prep: Prepared, num_labeled, seed: int, spec=None) -> list[str]:
    """splits_final.json with one fold (train / val of the benchmark) and its labeled subset; returns it."""
    from nnunet_contrastive.bench.datasets import HIPPOCAMPUS
    from nnunet_contrastive.data.labeled import LABELED_KEY, SELECTION_KEY, write_splits

    spec = spec or HIPPOCAMPUS
    labeled = spec.labeled(list(prep.train), num_labeled, seed, prep.groups, prep.train_order)
    write_splits(prep.pre, [{"train": list(prep.train), "val": list(prep.val), LABELED_KEY: labeled,
                             SELECTION_KEY: {"num_labeled": num_labeled, "seed": int(seed),
                                            "by": "patient" if spec.unit == "patients" else "case"}}])
    return labeled


# ------------------------------------------------------------------------------------------------ runs
def cost_budget(budget: Budget, trainer: str) -> Budget:
    """The budget a cost measurement builds `trainer` with: its pre-training stages inside the run (each stage is
    timed at its first epoch) and room left after them, however short the benchmark's own epochs (--quick: 2
    epochs could not hold GlobalLocal's two pre-training stages and a supervised one)."""
    from nnunet_contrastive.bench.cost import trainer_stages

    room = len(trainer_stages(trainer)) * budget.pretrain_epochs
    return dataclasses.replace(budget, pretraining="inside", epochs=budget.epochs + room)


def run_env(base: dict, trainer: str, budget: Budget, results: str, seed: int | None = None) -> dict:
    env = dict(base, nnUNet_results=results, nnUNet_contrastive_epochs=str(budget.epochs),
               nnUNet_contrastive_iterations=str(budget.iterations),
               nnUNet_contrastive_val_iterations=str(budget.val_iterations),
               nnUNet_contrastive_save_every="1")  # checkpoint_latest.pth every epoch: an interrupted run resumes
    for var in ("nnUNet_contrastive_pretrain_epochs", "nnUNet_contrastive_stage_epochs", "nnUNet_contrastive_seed"):
        env.pop(var, None)
    if seed is not None:
        env["nnUNet_contrastive_seed"] = str(seed)
    # only two-stage trainers get the pre-training variable: it would give one-stage trainers
    # (nnUNetTrainerMeanTeacher, nnUNetTrainerSPConSemiOnly) a pre-training stage they must not have
    if trainer != "nnUNetTrainer" and two_stage(trainer):
        # separate: the run itself has no pre-training (it starts from the shared pre-training's weights)
        env["nnUNet_contrastive_pretrain_epochs"] = str(budget.pretrain_epochs if budget.pretraining == "inside"
                                                        else 0)
    return env


def pretraining_env(base: dict, trainer: str, budget: Budget, results: str, seed: int) -> dict:
    """Only the trainer's pre-training stages, each `pretrain_epochs` long (the others dropped)."""
    from nnunet_contrastive.bench.cost import trainer_class

    env = run_env(base, trainer, budget, results, seed)
    env.pop("nnUNet_contrastive_pretrain_epochs", None)
    stages = trainer_class(trainer).declare_stages()
    env["nnUNet_contrastive_stage_epochs"] = ",".join(str(budget.pretrain_epochs if s.pretraining and
                                                          (s.epochs is None or s.epochs > 0) else 0) for s in stages)
    return env


def ensure_pretraining(cfg: Config, prep: Prepared, base_env: dict, trainer: str, seed: int, log=print) -> dict:
    """The label-free pre-training of `trainer` for `seed`, run once (on every training image) and reused by every
    N; returns {"checkpoint", "wall_s", "iterations"}."""
    folder = os.path.join(cfg.workdir, "pretraining", cfg.tag, trainer, f"seed{seed}")
    info_path = os.path.join(folder, "pretraining.json")
    if os.path.isfile(info_path):
        with open(info_path, encoding="utf-8") as f:
            return json.load(f)
    os.makedirs(folder, exist_ok=True)
    write_split(prep, ALL, seed, cfg.spec)  # labels are never read by a pre-training stage; every image is used
    results = os.path.join(folder, "nnUNet_results")
    env = pretraining_env(base_env, trainer, cfg.budget, results, seed)
    t0 = time.time()
    train_or_resume(cfg, prep, env, trainer, folder, [], os.path.join(folder, "log.txt"), log,
                    f"  {trainer} seed={seed}: label-free pre-training, once for every N "
                    f"({env['nnUNet_contrastive_stage_epochs']} epochs per stage x {cfg.budget.iterations} iterations)")
    ckpt = os.path.join(run_fold_dir(folder, prep, trainer), "checkpoint_final.pth")
    n_epochs = sum(int(v) for v in env["nnUNet_contrastive_stage_epochs"].split(","))
    info = {"checkpoint": ckpt, "wall_s": time.time() - t0, "iterations": n_epochs * cfg.budget.iterations,
            "stage_epochs": env["nnUNet_contrastive_stage_epochs"]}
    _write_json(info_path, info)
    log(f"  pre-training done in {info['wall_s']:.0f} s")
    return info


def validation_curve(checkpoint: str) -> list:
    """nnU-Net's online validation pseudo-Dice per epoch (mean over foreground classes) from a checkpoint."""
    import torch

    log = torch.load(checkpoint, map_location="cpu", weights_only=False).get("logging", {})
    return [float(v) for v in log.get("mean_fg_dice", [])]


def run_dir(cfg: Config, trainer: str, n, seed: int) -> str:
    return os.path.join(cfg.workdir, "runs", cfg.tag, trainer, f"N{n}_seed{seed}")


def _write_json(path: str, obj) -> None:
    """Atomically (temporary file, then rename): an interrupted write never leaves a half result.json."""
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def train_or_resume(cfg: Config, prep: Prepared, env: dict, trainer: str, folder: str, extra: list[str],
                    logf: str, log, message: str) -> int | None:
    """Train the run in `folder` (its nnUNet_results inside) to checkpoint_final.pth. An interrupted run
    (checkpoint_latest.pth, written every epoch, see `run_env`) continues with `nnUNetv2_train --c` from the epoch it
    reached, which is returned; otherwise the run starts from scratch (returns None; nothing to do when
    checkpoint_final.pth exists)."""
    from nnunet_contrastive.data.checkpoints import read_checkpoint
    from nnunet_contrastive.prep import pipeline

    fold_dir = run_fold_dir(folder, prep, trainer)
    if os.path.isfile(os.path.join(fold_dir, "checkpoint_final.pth")):
        return None
    latest = os.path.join(fold_dir, "checkpoint_latest.pth")
    epoch = None
    if os.path.isfile(latest):
        epoch = int(read_checkpoint(latest).get("current_epoch", 0))  # names a damaged file
        log(f"{message}: resumed at epoch {epoch} (--c)")
        # the pre-trained weights are in the checkpoint; nnU-Net refuses --c together with -pretrained_weights
        extra = ["--c"]
    else:
        shutil.rmtree(os.path.join(folder, "nnUNet_results"), ignore_errors=True)  # killed before its first epoch
        log(message)
    pipeline.train(cfg.dataset_id, trainer, prep.plans, 0, env, device=cfg.device, log=lambda *a: None,
                   output_file=logf, extra=extra)
    return epoch


WARMUP_FILE = "warmup_from.json"


def _warmup_key(trainer: str, budget: Budget, env: dict) -> tuple[str | None, str | None]:
    """(kept stage, warm-up key) of a trainer's plan under the run environment `env` (some trainers read their stage
    lengths from the environment); (None, None) for trainers without a kept stage."""
    from unittest import mock

    from nnunet_contrastive.bench.cost import trainer_class

    cls = trainer_class(trainer)
    if not hasattr(cls, "warmup_key"):
        return None, None
    with mock.patch.dict(os.environ, env, clear=True):
        return cls.kept_stage(budget.epochs, env), cls.warmup_key(budget.epochs, env)


def warmup_source(cfg: Config, prep: Prepared, trainer: str, n, seed: int, env: dict,
                  labeled: list[str]) -> dict | None:
    """Another trainer's end-of-warm-up checkpoint this run may start from (`--share-warmup`): a run of the same
    budget folder, N and seed (so the same plans, budget, labeled cases and seeded generators) whose trainer has an
    equal `warmup_key` and whose checkpoint names the same labeled cases. None when there is none."""
    from nnunet_contrastive.data.checkpoints import read_checkpoint

    stage, mine = _warmup_key(trainer, cfg.budget, env)
    root = os.path.join(cfg.workdir, "runs", cfg.tag)
    if mine is None or not os.path.isdir(root):
        return None
    known = available_trainers()
    for other in sorted(os.listdir(root)):
        if other == trainer or other not in known:
            continue
        path = os.path.join(run_fold_dir(run_dir(cfg, other, n, seed), prep, other), f"checkpoint_{stage}_end.pth")
        if not os.path.isfile(path) or _warmup_key(other, cfg.budget, run_env(env, other, cfg.budget,
                                                                              env["nnUNet_results"], seed))[1] != mine:
            continue
        ckpt = read_checkpoint(path)
        theirs = (ckpt.get("nnunet_contrastive") or {}).get("labeled_keys")
        if theirs is not None and sorted(theirs) != sorted(labeled):
            continue
        return {"trainer": other, "checkpoint": path, "stage": stage, "epoch": int(ckpt.get("current_epoch", 0))}
    return None


def start_from_warmup(cfg: Config, prep: Prepared, trainer: str, n, seed: int, env: dict, labeled: list[str],
                      log=print) -> dict | None:
    """With `--share-warmup`, a run that has not started continues from an equal warm-up of another trainer's run
    (`warmup_source`, copied to its checkpoint_latest.pth, so training resumes with --c after the warm-up); recorded
    in the run folder's warmup_from.json, which is returned (also for a run started that way before)."""
    from nnunet_contrastive.data.files import atomic_copy, read_json

    folder = run_dir(cfg, trainer, n, seed)
    marker = os.path.join(folder, WARMUP_FILE)
    if os.path.isfile(marker):
        return read_json(marker)
    fold_dir = run_fold_dir(folder, prep, trainer)
    if not cfg.share_warmup or any(os.path.isfile(os.path.join(fold_dir, c))
                                   for c in ("checkpoint_latest.pth", "checkpoint_final.pth")):
        return None
    src = warmup_source(cfg, prep, trainer, n, seed, env, labeled)
    if src is None:
        return None
    shutil.rmtree(os.path.join(folder, "nnUNet_results"), ignore_errors=True)
    os.makedirs(fold_dir)
    atomic_copy(src["checkpoint"], os.path.join(fold_dir, "checkpoint_latest.pth"))
    _write_json(marker, src)
    log(f"  {trainer} N={n} seed={seed}: starts from the end of {src['trainer']}'s '{src['stage']}' stage (epoch "
        f"{src['epoch']}; equal warm-up, --share-warmup)")
    return src


def equivalent_run(cfg: Config, trainer: str, n, seed: int) -> str | None:
    """The folder of the same finished run of a trainer WITHOUT label-free pre-training in a budget folder that
    differs from this one only in the pre-training settings (`--pretrain-epochs`, `--pretraining`), which never
    reach such a trainer (`run_env`): the run would be identical, so it is reused instead of trained again."""
    if two_stage(trainer):
        return None
    pre = f"_p{cfg.budget.pretrain_epochs}" + ("" if cfg.budget.pretraining == "inside" else "sep")
    head, tail = cfg.tag.split(pre, 1)
    pattern = re.compile(re.escape(head) + r"_p\d+(sep)?" + re.escape(tail))
    root = os.path.join(cfg.workdir, "runs")
    for other in sorted(os.listdir(root)) if os.path.isdir(root) else []:
        folder = os.path.join(root, other, trainer, f"N{n}_seed{seed}")
        if other != cfg.tag and pattern.fullmatch(other) and os.path.isfile(os.path.join(folder, "result.json")):
            return folder
    return None


def finished_result(cfg: Config, prep: Prepared, trainer: str, n, seed: int) -> dict | None:
    """The result.json of a finished run (None when it has not finished), or of the identical run in another budget
    folder (`equivalent_run`; recorded as `reused_from` and copied here)."""
    folder = run_dir(cfg, trainer, n, seed)
    result_path = os.path.join(folder, "result.json")
    if os.path.isfile(result_path):
        return _load_result(folder, prep, trainer)
    source = equivalent_run(cfg, trainer, n, seed)
    if source is None:
        return None
    res = dict(_load_result(source, prep, trainer), reused_from=source)
    os.makedirs(folder, exist_ok=True)
    _write_json(result_path, res)
    return res


def _same_budget(trainer: str, theirs: dict, ours: Budget) -> bool:
    """Budgets that give the same run: equal, or differing only in pre-training settings that never reach a trainer
    without pre-training (as in `equivalent_run`)."""
    mine = dataclasses.asdict(ours)
    if not two_stage(trainer):
        theirs = {k: v for k, v in theirs.items() if k not in ("pretrain_epochs", "pretraining")}
        mine = {k: v for k, v in mine.items() if k not in ("pretrain_epochs", "pretraining")}
    return theirs == mine


def import_results(cfg: Config, prep: Prepared, paths: list[str], log=print) -> list[str]:
    """Copy finished runs of earlier reports (their results.json) into this work folder, for a campaign spread over
    sessions or machines whose work folders do not survive. A run is imported only when it is one of this
    benchmark's runs (trainer, N, seed) made under the same conditions: dataset, plans, budget, the same train /
    validation / test cases and the same labeled cases. A run this folder already has is kept. Imported result.json
    files record `imported_from`; the report lists them. Returns the run folders written."""
    written, skipped = [], []
    for path in paths:
        try:
            with open(path, encoding="utf-8") as f:
                report = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise BenchmarkError(f"--import-results {path}: cannot read it ({e}).") from e
        if not isinstance(report, dict) or not isinstance(report.get("runs"), list) or "data" not in report:
            raise BenchmarkError(f"--import-results {path}: not a benchmark report (the results.json that "
                                 f"`nnunet-contrastive benchmark` writes next to results.md, with 'runs' and 'data').")
        data = report["data"]
        theirs = (report.get("config", {}).get("dataset", "hippocampus"),
                  sorted(data.get("train", [])), sorted(data.get("val", [])), sorted(data.get("test", [])))
        if theirs != (cfg.dataset, sorted(prep.train), sorted(prep.val), sorted(prep.test)):
            raise BenchmarkError(f"--import-results {path}: its dataset or its train / validation / test cases differ "
                                 f"from this benchmark's ({cfg.dataset}, {len(prep.train)} / {len(prep.val)} / "
                                 f"{len(prep.test)} cases); its runs cannot be compared with these.")
        for rec in report["runs"]:
            key = (rec.get("trainer"), rec.get("num_labeled"), rec.get("seed"))
            name = f"{key[0]} N={key[1]} seed={key[2]}"
            if key[0] not in resolve_trainers(cfg.trainers) or key[1] not in cfg.num_labeled or key[2] not in cfg.seeds:
                continue  # not a run of this benchmark
            why = None
            if rec.get("plans") != prep.plans:
                why = f"plans {rec.get('plans')} instead of {prep.plans}"
            elif not _same_budget(key[0], rec.get("budget", {}), cfg.budget):
                why = f"budget {rec.get('budget')} instead of {dataclasses.asdict(cfg.budget)}"
            elif sorted(rec.get("labeled", [])) != sorted(cfg.spec.labeled(list(prep.train), key[1], key[2],
                                                                           prep.groups, prep.train_order)):
                why = "other labeled cases than this benchmark draws for that N and seed"
            elif set(rec.get("dice_per_case") or {}) != set(prep.test):
                why = "no per-volume Dice on this benchmark's test cases"
            if why:
                skipped.append(f"{name}: {why}")
                continue
            folder = run_dir(cfg, key[0], key[1], key[2])
            if os.path.isfile(os.path.join(folder, "result.json")):
                log(f"  {name}: already in this work folder (trained or imported here before); kept, {path} "
                    f"not read for it")
                continue
            os.makedirs(folder, exist_ok=True)
            _write_json(os.path.join(folder, "result.json"), dict(rec, imported_from=os.path.abspath(path)))
            written.append(folder)
            log(f"  {name}: imported from {path} (mean Dice {rec['dice']['mean']:.3f})")
    for s in skipped:
        log(f"  not imported (made under other conditions): {s}")
    return written


def _load_result(folder: str, prep: Prepared, trainer: str) -> dict:
    """A run folder's result.json, completed with what older versions did not record (per-volume and validation
    Dice, from the run's own nnU-Net summaries)."""
    from nnunet_contrastive.prep import pipeline

    result_path = os.path.join(folder, "result.json")
    with open(result_path, encoding="utf-8") as f:
        res = json.load(f)
    summary = os.path.join(folder, "predictions", "summary.json")
    changed = False
    if "dice_per_case" not in res and os.path.isfile(summary):
        with open(summary, encoding="utf-8") as f:
            res["dice_per_case"] = pipeline.dice_per_case(json.load(f), prep.labels)
        changed = True
    if "val_dice" not in res:
        res["val_dice"] = validation_dice(run_fold_dir(folder, prep, trainer), prep.labels)
        changed = res["val_dice"] is not None or changed
    if changed:
        _write_json(result_path, res)
    return res


def run_fold_dir(folder: str, prep: Prepared, trainer: str) -> str:
    """nnU-Net's fold folder inside a run folder."""
    return os.path.join(folder, "nnUNet_results", prep.dataset, f"{trainer}__{prep.plans}__2d", "fold_0")


def validation_dice(fold_dir: str, labels: dict) -> dict | None:
    """Dice per class and mean on the fold's validation cases, from nnU-Net's final validation (full volumes, its
    own predictor, `<fold>/validation/summary.json`); None when it is missing. Hyperparameters are chosen on it,
    never on the test volumes."""
    from nnunet_contrastive.prep import pipeline

    path = os.path.join(fold_dir, "validation", "summary.json")
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return pipeline.dice_from_summary(json.load(f), labels)


def run_one(cfg: Config, prep: Prepared, base_env: dict, trainer: str, n, seed: int, log=print) -> dict:
    """Train, predict and evaluate one (trainer, N, seed); skipped when its result.json exists."""
    from nnunet_contrastive.prep import pipeline

    res = finished_result(cfg, prep, trainer, n, seed)
    if res is not None:
        log(f"  {trainer} N={n} seed={seed}: done before (mean Dice {res['dice']['mean']:.3f}"
            + (f"; the identical run of {res['reused_from']}" if res.get("reused_from") else "")
            + (f"; imported from {res['imported_from']}" if res.get("imported_from") else "") + "), skipped")
        return res
    folder = run_dir(cfg, trainer, n, seed)
    result_path = os.path.join(folder, "result.json")
    os.makedirs(folder, exist_ok=True)
    labeled = write_split(prep, n, seed, cfg.spec)
    results = os.path.join(folder, "nnUNet_results")
    env = run_env(base_env, trainer, cfg.budget, results, seed)
    fold_dir = run_fold_dir(folder, prep, trainer)
    pretraining, extra = None, []
    if two_stage(trainer) and cfg.budget.pretraining == "separate":
        pretraining = ensure_pretraining(cfg, prep, base_env, trainer, seed, log)
        write_split(prep, n, seed, cfg.spec)  # the pre-training wrote its own (all labeled) split
        extra = ["-pretrained_weights", pretraining["checkpoint"]]
    warmup_from = start_from_warmup(cfg, prep, trainer, n, seed, env, labeled, log) if not extra else None
    logf = os.path.join(folder, "log.txt")
    times = {}
    load = {"start": _loadavg()}
    t0 = time.time()
    resumed = train_or_resume(cfg, prep, env, trainer, folder, extra, logf, log,
                              f"  {trainer} N={n} seed={seed}: nnUNetv2_train ({len(labeled)} labeled / "
                              f"{len(prep.train)} train cases; log {logf})")
    times["train_s"] = time.time() - t0
    if warmup_from is not None and resumed == warmup_from["epoch"]:
        resumed = None  # it started there; not an interruption
    pred = os.path.join(folder, "predictions")
    shutil.rmtree(pred, ignore_errors=True)
    t1 = time.time()
    pipeline.predict(cfg.dataset_id, trainer, prep.plans, 0, os.path.join(prep.raw, "imagesTs"), pred, env,
                     device=cfg.device, log=lambda *a: None, output_file=logf,
                     extra=["--disable_tta"] if cfg.budget.disable_tta else [])
    times["predict_s"] = time.time() - t1
    t2 = time.time()
    summary = pipeline.evaluate(os.path.join(prep.raw, "labelsTs"), pred, os.path.join(prep.raw, "dataset.json"),
                                os.path.join(prep.pre, f"{prep.plans}.json"), env, log=lambda *a: None,
                                output_file=logf)
    times["evaluate_s"] = time.time() - t2
    load["end"] = _loadavg()
    dice = pipeline.dice_from_summary(summary, prep.labels)
    per_case = pipeline.dice_per_case(summary, prep.labels)
    res = {"trainer": trainer, "num_labeled": n, "seed": seed, "labeled": labeled, "num_train": len(prep.train),
           "num_val": len(prep.val), "num_test": len(prep.test), "budget": dataclasses.asdict(cfg.budget),
           "plans": prep.plans, "checkpoint": "checkpoint_final.pth", "dice": dice, "wall_s": times,
           "loadavg_1_5_15min": load, "pretraining": pretraining, "resumed_at_epoch": resumed,
           "val_curve": validation_curve(os.path.join(fold_dir, "checkpoint_final.pth")),
           "finished": time.strftime("%Y-%m-%d %H:%M:%S"), "dice_per_case": per_case,
           "val_dice": validation_dice(fold_dir, prep.labels), "code": code_version(), "warmup_from": warmup_from}
    _write_json(result_path, res)
    log(f"  {trainer} N={n} seed={seed}: mean Dice {dice['mean']:.3f} ("
        + ", ".join(f"{c} {dice[c]:.3f}" for c in prep.classes)
        + f"); train {times['train_s']:.0f} s, predict {times['predict_s']:.0f} s, evaluate "
          f"{times['evaluate_s']:.0f} s")
    return res


# ------------------------------------------------------------------------------------------------ report
def _loadavg() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def code_version() -> str:
    """This package's version and, in a git checkout, its commit (with '-dirty' for uncommitted changes): which code
    made a run, kept in its result.json (runs imported from another session may come from other code)."""
    import subprocess

    from nnunet_contrastive import __version__

    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=os.path.dirname(os.path.abspath(__file__)),
                             capture_output=True, text=True, timeout=10)
        commit = out.stdout.strip() if out.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return __version__ + (f"+{commit}" if commit else "")


def machine_info() -> dict:
    model = platform.processor() or ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {"cpu_count": os.cpu_count(), "cpu_model": model, "platform": platform.platform(),
            "python": platform.python_version()}
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
    except ImportError:
        pass
    try:
        info["loadavg_at_start"] = list(os.getloadavg())
    except OSError:
        pass
    return info


def write_report(cfg: Config, prep: Prepared, trainers: list[str], results: list[dict], failures: list[dict],
                 cost: dict | None, wall: dict, machine: dict, finished: bool, pending: list | None = None) -> dict:
    """Write results.md, results.json and the plot. `wall`: {"this_s", "total_s", "invocations"} (see WallClock)."""
    from nnunet_contrastive.bench import report as R

    os.makedirs(cfg.out, exist_ok=True)
    rows = R.summarize(results, trainers, cfg.num_labeled, prep.classes, BASELINE) if results else []
    staged = [t for t in trainers if two_stage(t)]
    budget_text = cfg.budget.describe(staged, prep.plans, prep.batch_size)
    md = [f"# nnunet-contrastive benchmark: label efficiency and cost on {prep.title}", ""]
    if cfg.quick:
        md += ["**QUICK MODE: a smoke test of the benchmark's code path (tiny data, a few iterations). Its numbers "
               "mean nothing.**", ""]
    if not finished:
        md += ["**Partial report: the benchmark has not finished (or some runs failed).**", ""]
    md += [f"- command: `{cfg.command}`",
           f"- machine: {machine.get('cpu_count')} CPU cores ({machine.get('cpu_model')}), device `{cfg.device}`, "
           f"torch {machine.get('torch', '?')} with {machine.get('torch_threads', '?')} threads; load average at "
           f"start {', '.join(f'{v:.2f}' for v in machine.get('loadavg_at_start', []))}",
           (f"- wall time: {wall['total_s'] / 60:.1f} min over the {wall['invocations']} invocations that trained "
            f"in this work folder at this budget and plans (runs outside this report included; per-run times in "
            f"results.json); this report was written with --report-only" if cfg.report_only else
            f"- wall time: {wall['total_s'] / 60:.1f} min" + ("" if finished else " so far")
            + (f" over {wall['invocations']} invocations of the command (resumed; this one "
               f"{wall['this_s'] / 60:.1f} min)" if wall["invocations"] > 1 else "")
            + " (preparation, cost measurements and all runs)"),
           f"- data: {cfg.data}: {len(prep.test)} held-out test volumes (moved to imagesTs/labelsTs before planning, "
           f"seed {cfg.split_seed}); training pool {len(prep.train) + len(prep.val)} = {len(prep.train)} train + "
           f"{len(prep.val)} validation volumes (one fold, our splits_final.json); labeled subsets drawn from the "
           f"train cases with the run's seed",
           f"- budget: {budget_text}",
           f"- predictions: `nnUNetv2_predict` with checkpoint_final.pth"
           + (" without test-time mirroring" if cfg.budget.disable_tta else " (test-time mirroring on)")
           + "; scores: `nnUNetv2_evaluate_folder` (Dice per class, mean over test volumes)",
           f"- seeds: {', '.join(map(str, cfg.seeds))} (mean ± sample std over seeds when more than one)"]
    loads = [v[0] for r in results for v in (r.get("loadavg_1_5_15min") or {}).values() if v]
    if loads:
        md += [f"- machine load: the 1-min load average at the start / end of the runs ranged {min(loads):.1f} – "
               f"{max(loads):.1f} on {machine.get('cpu_count')} cores (above {machine.get('cpu_count')}: other jobs "
               f"shared the CPU and wall times are longer than on an idle machine)"]
    resumed = [f"{r['trainer']} N={r['num_labeled']} seed={r['seed']} (epoch {r['resumed_at_epoch']})"
               for r in results if r.get("resumed_at_epoch") is not None]
    reused = sorted({os.path.basename(os.path.dirname(os.path.dirname(r["reused_from"])))
                     for r in results if r.get("reused_from")})
    if reused:
        md += [f"- runs of trainers without pre-training reused from {', '.join(reused)} (same budget, other "
               f"pre-training settings, which do not reach them: identical runs)"]
    imported = sorted({r["imported_from"] for r in results if r.get("imported_from")})
    if imported:
        md += ["- runs imported from earlier reports with --import-results (same dataset, cases, labeled cases, plans "
               "and budget; trained in another work folder, their time not in the wall time above): "
               + ", ".join(f"{r['trainer']} N={r['num_labeled']} seed={r['seed']}" for r in results
                           if r.get("imported_from")) + " from " + ", ".join(f"`{p}`" for p in imported)]
    if resumed:
        md += ["- resumed mid-training with `--c` after an interruption (its checkpoint carries the random "
               "generators, so with nnUNet_n_proc_DA=0 the run continues the uninterrupted run's batches; with "
               "augmentation workers, or from a checkpoint older than that, the stream after the resume differs; its "
               "train time counts the last part only): "
               + ", ".join(resumed)]
    shared = [f"{r['trainer']} N={r['num_labeled']} seed={r['seed']} (from {r['warmup_from']['trainer']}, epoch "
              f"{r['warmup_from']['epoch']})" for r in results if r.get("warmup_from")]
    if shared:
        md += ["- started from another trainer's end-of-warm-up checkpoint with --share-warmup (same budget, N, seed "
               "and labeled cases; equal warm-up declarations, `warmup_key`; its train time counts the stages after "
               "the warm-up only): " + ", ".join(shared)]
    if prep.ceiling:
        names = {str(v): k for k, v in prep.labels.items()}
        md += [f"- resolution ceiling of the plans: their 2d spacing {prep.ceiling['inplane_spacing']} mm (nnU-Net's "
               f"own: {[round(v, 3) for v in prep.ceiling['own_spacing']]} mm) caps the test Dice a perfect network "
               f"could score at " + ", ".join(f"{names.get(str(k), k)} {v:.3f}" for k, v in
                                              prep.ceiling["mean"].items())
               + " (ground truth resampled there and back as nnU-Net does; nnunet_contrastive.bench.resolution)"]
    md += [""]
    if rows:
        md += [f"## Label efficiency (held-out Dice; {budget_text})", "",
               R.label_efficiency_markdown(rows, prep.classes, BASELINE, len(prep.train)), "",
               f"gain = mean Dice − {BASELINE}'s at the same N (paired by seed); gap closed = (ours − few) / "
               f"(full − few) with full = {BASELINE} with all {len(prep.train)} train cases labeled. 95 % CI over "
               f"seeds: Student's t of the per-seed paired gains (what another seed and labeled subset may give; "
               f"none with one seed). 95 % CI over test volumes: percentile bootstrap of the per-volume paired "
               f"gains (each averaged over the seeds; what another test set may give for these same runs).", "",
               "Per seed (each seed draws its labeled cases; gain = the run's test mean Dice − the baseline's of the "
               "same seed):", "",
               R.per_seed_markdown(results, trainers, cfg.num_labeled, BASELINE, len(prep.train)), ""]
    pre = {}
    for r in results:
        if r.get("pretraining"):
            pre[(r["trainer"], r["seed"])] = r["pretraining"]
    if pre:
        md += ["## Label-free pre-training (once per trainer and seed, reused by every N)", "",
               "| trainer | seed | stage epochs | iterations | wall time |", "|---|---|---|---|---|"]
        md += [f"| {t} | {sd} | {p.get('stage_epochs', '')} | {p['iterations']} | {p['wall_s'] / 60:.1f} min |"
               for (t, sd), p in sorted(pre.items())]
        md += [""]
    curves = R.plot_learning_curves(results, BASELINE, os.path.join(cfg.out, "learning_curve.png"),
                                    f"{BASELINE}: validation pseudo-Dice per epoch ({prep.title})") if results else None
    if curves:
        md += ["## Has the supervised baseline converged?", "",
               f"nnU-Net's online validation pseudo-Dice of {BASELINE} per epoch at the smallest and the largest N "
               f"(mean over seeds): a flat end means more iterations would not help it.", "",
               "![learning curve](learning_curve.png)", ""]
    if pending:
        md += ["Runs without a result yet (report written with --report-only; run the command without it to train "
               "them): " + "; ".join(f"{t} N={n} seed={sd}" for t, n, sd in pending), ""]
    if failures:
        md += ["Failed runs: " + "; ".join(f"{f['trainer']} N={f['num_labeled']} seed={f['seed']}: {f['error']}"
                                          for f in failures), ""]
    if cost:
        md += ["## Cost per training iteration (same plans and batch, ratio to stock nnUNetTrainer)", "",
               R.cost_markdown(cost["trainers"]), "",
               "Median over the timed iterations after warm-up, one fresh process per row; s/it = "
               f"next(dataloader_train) + train_step ({R.augmentation_note(cost['trainers'])}); peak RSS = "
               "ru_maxrss of that process (interpreter, torch and nnU-Net included)"
               + ("; on CUDA nnU-Net trains under autocast with a GradScaler (AMP) and the GPU memory is "
                  "torch.cuda.max_memory_allocated" if any(r.get("amp") for r in cost["trainers"]) else "")
               + "; loss = mean training loss of the measured iterations.", ""]
        if cost.get("loss"):
            ref = cost["loss"]["step_reference"]
            label = f"{ref['trainer']} step" + (f" (stage {ref['stage']})" if ref["stage"] else "")
            md += ["## Contrastive loss alone (forward + backward, D = 256, 3 meta-labels, float32)", "",
                   R.loss_markdown(cost["loss"]["rows"], label), "",
                   f"Fractions are of the measured {label} at batch {ref['batch_size']} ({ref['step_s']:.3f} s, "
                   f"the only step size measured here); the training-batch row is the loss as it runs inside that "
                   f"step. Larger 2N would come with larger, slower steps, so their fractions are upper bounds.", ""]
    md_text = "\n".join(md)
    png = None
    if rows:
        png = R.plot_dice_vs_labeled(rows, trainers, BASELINE, len(prep.train),
                                     os.path.join(cfg.out, "dice_vs_labeled.png"),
                                     ("QUICK MODE, numbers mean nothing: " if cfg.quick else "")
                                     + f"{prep.title}, {len(prep.test)} test volumes, "
                                       f"{cfg.budget.total_iterations} it/run, {len(cfg.seeds)} seed(s)")
        if png:
            md_text += "\n![mean Dice vs labeled volumes](dice_vs_labeled.png)\n"
    with open(os.path.join(cfg.out, "results.md"), "w", encoding="utf-8") as f:
        f.write(md_text)
    out = {"quick": cfg.quick, "finished": finished, "command": cfg.command, "machine": machine,
           "wall_s": wall["total_s"], "wall": wall,
           "config": {k: v for k, v in dataclasses.asdict(cfg).items() if k != "budget"},
           "budget": {**dataclasses.asdict(cfg.budget), "total_iterations": cfg.budget.total_iterations,
                      "description": budget_text},
           "data": {"train": prep.train, "val": prep.val, "test": prep.test, "plans": prep.plans,
                    "classes": prep.classes, "resolution_ceiling": prep.ceiling and prep.ceiling["mean"]},
           "trainers": trainers, "summary": rows, "runs": results, "failures": failures, "cost": cost,
           "pending": [{"trainer": t, "num_labeled": n, "seed": sd} for t, n, sd in pending or []],
           "plot": png}
    with open(os.path.join(cfg.out, "results.json"), "w", encoding="utf-8") as f:
        json.dump(out, f, indent=1)
    return out


# ------------------------------------------------------------------------------------------------ main
class WallClock:
    """Wall time of a benchmark summed over the invocations that built it (a resumed run is not 0 minutes):
    one entry per invocation in `path`, updated as it goes."""

    def __init__(self, path: str, t_start: float, command: str):
        self.path, self.t_start = path, t_start
        self.previous = []
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                self.previous = json.load(f)
        self.entry = {"started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t_start)), "command": command,
                      "wall_s": 0.0}

    def update(self, record: bool = True) -> dict:
        """The wall time so far; `record`: this invocation counts (a --report-only invocation does not)."""
        if not record:
            total = sum(e["wall_s"] for e in self.previous)
            return {"this_s": time.time() - self.t_start, "total_s": total, "invocations": len(self.previous)}
        self.entry["wall_s"] = time.time() - self.t_start
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        with open(self.path, "w", encoding="utf-8") as f:
            json.dump(self.previous + [self.entry], f, indent=1)
        return {"this_s": self.entry["wall_s"], "total_s": sum(e["wall_s"] for e in self.previous + [self.entry]),
                "invocations": len(self.previous) + 1}


def run_benchmark(cfg: Config, log=print) -> int:
    """The whole benchmark; returns 0 when every run succeeded, 1 otherwise."""
    from nnunet_contrastive.prep import pipeline
    from nnunet_contrastive.bench.cost import STOCK, measure_costs

    t_start = time.time()
    machine = machine_info()

    def step(msg):
        log(f"[benchmark {time.time() - t_start:6.0f} s] {msg}")

    cfg.data = check_data(cfg.data, cfg.dataset)
    trainers = resolve_trainers(cfg.trainers)
    check_budget(cfg.budget, trainers)
    os.makedirs(cfg.workdir, exist_ok=True)
    folders = pipeline.nnunet_folders(cfg.workdir)
    os.environ.update({k: v for k, v in folders.items() if k != "nnUNet_results"})  # in-process steps
    base_env = pipeline.small_machine_env(**folders)
    step(f"{'QUICK MODE (numbers mean nothing); ' if cfg.quick else ''}trainers {trainers}, N {cfg.num_labeled}, "
         f"seeds {cfg.seeds}; budget {cfg.budget.tag}; plans override {cfg.override}; workdir {cfg.workdir}")
    prep = prepare_data(cfg, base_env, log=step)
    clock = WallClock(os.path.join(cfg.workdir, "runs", cfg.tag, "invocations.json"), t_start, cfg.command)
    check_meta_labels(trainers, prep)
    too_many = [n for n in cfg.num_labeled if n != ALL and n > len(prep.train)]
    if too_many:
        raise BenchmarkError(f"--num-labeled {too_many}: the training set has only {len(prep.train)} cases.")

    if cfg.imports:
        step(f"importing finished runs of {', '.join(cfg.imports)}")
        import_results(cfg, prep, cfg.imports, log=step)
    # the full-supervision baseline first: every "gap closed" needs it
    order = sorted(cfg.num_labeled, key=lambda n: (0,) if n == ALL else (1, int(n)))
    todo = [(tr, n, s) for s in cfg.seeds for n in order for tr in trainers]
    cost = None
    if cfg.report_only:
        results, pending = [], []
        for tr, n, seed in todo:
            res = finished_result(cfg, prep, tr, n, seed)
            results.append(res) if res is not None else pending.append((tr, n, seed))
        wall = clock.update(record=False)
        write_report(cfg, prep, trainers, results, [], None, wall, machine, finished=not pending, pending=pending)
        step(f"report of {len(results)} finished runs ({len(pending)} without a result): "
             f"{os.path.join(cfg.out, 'results.md')}")
        return 0
    if not cfg.skip_cost:
        step(f"cost: {cfg.cost_warmup} warm-up + {cfg.cost_iterations} timed iterations per trainer and stage")
        numeric = [n for n in cfg.num_labeled if n != ALL]
        write_split(prep, min(numeric) if numeric else ALL, 0, cfg.spec)  # stage 2 with unlabeled rows if possible
        cost = measure_costs(
            trainers, lambda tr, res: run_env(base_env, tr, cost_budget(cfg.budget, tr), res) if tr != STOCK else
            dict(base_env, nnUNet_results=res), prep.dataset, prep.plans, cfg.device, cfg.cost_warmup,
            cfg.cost_iterations, cfg.loss_sizes, cfg.loss_reps,
            os.path.join(cfg.workdir, "cost", cfg.tag), log=step)

    results, failures = [], []
    if not cfg.skip_label_efficiency:
        for i, (tr, n, seed) in enumerate(todo, 1):
            step(f"run {i}/{len(todo)}: {tr}, N={n}, seed {seed}")
            try:
                results.append(run_one(cfg, prep, base_env, tr, n, seed, log=step))
            except (pipeline.CommandFailed, OSError) as e:
                msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                step(f"  FAILED: {msg} (log {os.path.join(run_dir(cfg, tr, n, seed), 'log.txt')})")
                failures.append({"trainer": tr, "num_labeled": n, "seed": seed, "error": msg})
            write_report(cfg, prep, trainers, results, failures, cost, clock.update(), machine, finished=False)
    machine["loadavg_at_end"] = _loadavg()
    wall = clock.update()
    out = write_report(cfg, prep, trainers, results, failures, cost, wall, machine, finished=not failures)
    step(f"done in {wall['this_s'] / 60:.1f} min ({wall['total_s'] / 60:.1f} min over {wall['invocations']} "
         f"invocation(s)): {os.path.join(cfg.out, 'results.md')}, results.json"
         + (", dice_vs_labeled.png" if out["plot"] else ""))
    if cfg.quick:
        log("QUICK MODE: the numbers above only show that the benchmark runs; they mean nothing.")
    return 1 if failures else 0


def command_line(argv: list[str] | None = None) -> str:
    argv = sys.argv[1:] if argv is None else argv
    return "nnunet-contrastive " + shlex.join(argv)
