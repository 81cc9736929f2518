"""`nnunet-contrastive benchmark`: label efficiency and cost on MSD hippocampus or ACDC (nnunet_contrastive.bench)."""
from __future__ import annotations

import os
import shutil


def register(sub) -> None:
    from nnunet_contrastive.bench.benchmark import BASELINE, DEFAULT_TRAINERS, FULL, QUICK
    from nnunet_contrastive.bench.datasets import ACDC, HIPPOCAMPUS

    H, A = {**FULL, **HIPPOCAMPUS.full}, {**FULL, **ACDC.full}
    p = sub.add_parser(
        "benchmark", help="label-efficiency and cost benchmark on MSD hippocampus or ACDC (unattended)",
        description="Convert Task04_Hippocampus (convert-msd) or ACDC (convert-acdc), hold out a fixed test set (moved "
                    "to imagesTs/labelsTs before nnUNetv2_plan_and_preprocess; ACDC: the test patients of "
                    "ssl4mis_split.json), then for each number of labeled volumes (ACDC: patients) N, seed and "
                    "trainer train with nnUNetv2_train under the same budget (the dataset's CPU-tier plans or "
                    "--plans-override, the same iterations "
                    "with labels; label-free pre-training runs once per seed and is reused by every N, its cost "
                    "reported apart; runs seeded), predict the test set with nnUNetv2_predict and "
                    "score it with nnUNetv2_evaluate_folder. Also measures seconds per iteration and peak memory of "
                    "each trainer against stock nnUNetTrainer, and the contrastive loss alone. Writes results.md, "
                    "results.json and dice_vs_labeled.png. Re-running the same command resumes: finished runs are "
                    "skipped.",
        epilog=f"Defaults (full / --quick): epochs {H['epochs']} (hippocampus), {A['epochs']} (ACDC) / "
               f"{QUICK['epochs']}, iterations {FULL['iterations']} / {QUICK['iterations']}, pretrain epochs "
               f"{H['pretrain_epochs']} (hippocampus), {A['pretrain_epochs']} (ACDC) / {QUICK['pretrain_epochs']}; "
               f"hippocampus: N {' '.join(HIPPOCAMPUS.full['num_labeled'])} / "
               f"{' '.join(HIPPOCAMPUS.quick['num_labeled'])}, test cases {HIPPOCAMPUS.full['test_cases']} / "
               f"{HIPPOCAMPUS.quick['test_cases']}, training pool all remaining / {HIPPOCAMPUS.quick['pool_size']}; "
               f"ACDC: N {' '.join(ACDC.full['num_labeled'])} patients / "
               f"{' '.join(ACDC.quick['num_labeled'])}, the "
               f"ssl4mis split (70 / 10 / 20 patients) / {ACDC.quick['pool_size']} train, 1 val, 1 test patient.")
    p.add_argument("--dataset", default="hippocampus", choices=("hippocampus", "acdc"),
                   help="hippocampus (MSD Task04) or acdc (ACDC training patients, ssl4mis split); default "
                        "hippocampus")
    p.add_argument("--data", default=None,
                   help="the dataset's folder (default <repository>/../shared/data/Task04_Hippocampus or .../ACDC)")
    p.add_argument("--workdir", default=None,
                   help=f"work folder: nnU-Net folders, runs, cost (default ./{FULL['workdir']}, "
                        f"--quick ./{QUICK['workdir']})")
    p.add_argument("--out", default=None, help="report folder (default <workdir>/report)")
    p.add_argument("--trainers", nargs="+", default=None,
                   help=f"trainers to compare (default {' '.join(DEFAULT_TRAINERS)}); {BASELINE} is always added as "
                        f"the reference, e.g. --trainers nnUNetTrainerSPCon nnUNetTrainerMeanTeacher "
                        f"nnUNetTrainerUnsupCon")
    p.add_argument("--num-labeled", nargs="+", default=None,
                   help="numbers of labeled training volumes (ACDC: patients) and/or 'all' (default hippocampus 1 2 "
                        "4 all, ACDC 1 3 7 all; ACDC seed 0 = the first N patients of the published train list)")
    p.add_argument("--seeds", nargs="+", type=int, default=None,
                   help="seeds of the labeled subsets (default 0; e.g. 0 1 2 for a report)")
    p.add_argument("--epochs", type=int, default=None,
                   help="epochs per run (with --pretraining inside: pre-training included)")
    p.add_argument("--iterations", type=int, default=None, help="training iterations per epoch")
    p.add_argument("--val-iterations", type=int, default=None, help="validation iterations per epoch")
    p.add_argument("--pretrain-epochs", type=int, default=None,
                   help="epochs of each label-free pre-training stage of two-stage trainers (nnUNetTrainerSPCon, "
                        "nnUNetTrainerUnsupCon, ...)")
    p.add_argument("--pretraining", default="separate", choices=("separate", "inside"),
                   help="separate (default): pre-training runs once per seed, outside the budget, and every N "
                        "fine-tunes from it; inside: pre-training epochs count inside --epochs (older rule)")
    p.add_argument("--disable-tta", action="store_true", default=None,
                   help="predict without test-time mirroring (faster; always on with --quick)")
    p.add_argument("--test-cases", type=int, default=None, help="held-out test volumes")
    p.add_argument("--val-cases", type=int, default=None, help="validation volumes of the training pool")
    p.add_argument("--split-seed", type=int, default=0, help="seed of the test / validation draw (default 0)")
    p.add_argument("--cost-iterations", type=int, default=None, help="timed iterations per trainer and stage")
    p.add_argument("--cost-warmup", type=int, default=None, help="warm-up iterations before timing")
    p.add_argument("--loss-sizes", nargs="*", type=int, default=None,
                   help="2N values for the loss timing (default 64 128 256 512)")
    p.add_argument("--skip-cost", action="store_true", help="no cost measurements")
    p.add_argument("--skip-label-efficiency", action="store_true", help="cost measurements only")
    p.add_argument("--plans-override", default=None,
                   help="plans override of every run: a built-in (cpu_small, acdc_cpu) or a JSON file, or 'none' for "
                        "nnU-Net's own plans and batch size (the GPU tier). Default: the dataset's CPU tier "
                        "(hippocampus cpu_small: batch 8; ACDC acdc_cpu: 2.5 mm in-plane, patch 128 x 128, half the features, batch 8)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="training/inference device (default cpu)")
    p.add_argument("--quick", action="store_true",
                   help="exercise the whole path in CI time (12 training volumes, a few iterations, N 1 and all); "
                        "its numbers mean nothing")
    p.add_argument("--report-only", action="store_true",
                   help="write the report from the runs that have finished (nothing trains, no cost measurement); "
                        "the runs without a result are listed")
    p.add_argument("--import-results", nargs="+", default=[], metavar="RESULTS_JSON",
                   help="import the finished runs of earlier reports (their results.json) that this command would "
                        "make under the same conditions (dataset, cases, labeled cases, plans, budget), instead of "
                        "training them again: a campaign spread over sessions whose work folders do not survive")
    p.add_argument("--share-warmup", action="store_true",
                   help="start a trainer's run from the end-of-warm-up checkpoint of another trainer's run with the "
                        "same N and seed whose warm-up is declared the same (e.g. the PLCon variants with an equal "
                        "warmup_fraction), instead of training that warm-up again; recorded per run and in the report")
    p.add_argument("--fresh", action="store_true", help="delete --workdir first (only a benchmark work folder)")
    p.set_defaults(func=run)


def build_config(args):
    from nnunet_contrastive.bench.benchmark import (FULL, QUICK, SETUP_FILE, BenchmarkError, Budget, Config, command_line,
                                              default_data_dir, parse_num_labeled)

    from nnunet_contrastive.bench.datasets import DATASETS

    spec = DATASETS[args.dataset]
    preset = {**(QUICK if args.quick else FULL), **(spec.quick if args.quick else spec.full)}
    preset["workdir"] = preset["workdir"] + ("" if spec.key == "hippocampus" else f"_{spec.key}")

    def pick(name):
        value = getattr(args, name)
        return preset[name] if value is None else value

    workdir = os.path.abspath(pick("workdir"))
    for name in ("test_cases", "val_cases", "cost_iterations"):
        if pick(name) is not None and pick(name) < 1:
            raise BenchmarkError(f"--{name.replace('_', '-')} must be >= 1, got {pick(name)}.")
    if pick("cost_warmup") < 0:
        raise BenchmarkError(f"--cost-warmup must be >= 0, got {pick('cost_warmup')}.")
    from nnunet_contrastive.data.labeled import check_seed

    for seed in args.seeds or []:
        check_seed(seed, "--seeds")
    check_seed(args.split_seed, "--split-seed")
    bad = [s for s in pick("loss_sizes") if s < 2 or s % 2]
    if bad:
        raise BenchmarkError(f"--loss-sizes: {bad} — 2N must be an even number >= 2.")
    return Config(
        data=args.data or default_data_dir(args.dataset), workdir=workdir, dataset=args.dataset,
        out=os.path.abspath(args.out) if args.out else os.path.join(workdir, "report"),
        trainers=args.trainers, num_labeled=parse_num_labeled(pick("num_labeled")), seeds=args.seeds or [0],
        budget=Budget(epochs=pick("epochs"), iterations=pick("iterations"), val_iterations=pick("val_iterations"),
                      pretrain_epochs=pick("pretrain_epochs"), disable_tta=bool(pick("disable_tta")),
                      pretraining=args.pretraining),
        dataset_id=preset["dataset_id"], test_cases=pick("test_cases"), val_cases=pick("val_cases"),
        pool_size=preset["pool_size"], split_seed=args.split_seed, device=args.device, quick=args.quick,
        skip_cost=args.skip_cost, skip_label_efficiency=args.skip_label_efficiency,
        cost_warmup=pick("cost_warmup"), cost_iterations=pick("cost_iterations"), loss_sizes=list(pick("loss_sizes")),
        loss_reps=preset["loss_reps"], command=command_line(), plans_override=plans_override(args.plans_override),
        report_only=args.report_only, imports=[os.path.abspath(p) for p in args.import_results],
        share_warmup=args.share_warmup), \
        SETUP_FILE


def plans_override(value: str | None) -> str | None:
    """--plans-override checked before anything runs: None (the dataset's default), 'none', a built-in or a file."""
    from nnunet_contrastive.bench.benchmark import NO_OVERRIDE
    from nnunet_contrastive.prep.plans_override import load_override

    if value is None:
        return None
    if value.lower() == NO_OVERRIDE:
        return NO_OVERRIDE
    load_override(value)  # unknown name, missing file or bad JSON: a clear error now
    return os.path.abspath(value) if os.path.isfile(value) else value


def run(args) -> int:
    from nnunet_contrastive.bench.benchmark import BenchmarkError, check_data, run_benchmark, resolve_trainers

    cfg, setup_file = build_config(args)
    if len(set(cfg.seeds)) != len(cfg.seeds):
        raise BenchmarkError(f"--seeds: {cfg.seeds} repeats a seed.")
    # fail on bad input before deleting or converting anything
    check_data(cfg.data, cfg.dataset)
    resolve_trainers(cfg.trainers)
    if args.fresh and os.path.isdir(cfg.workdir):
        if os.listdir(cfg.workdir) and not os.path.isfile(os.path.join(cfg.workdir, setup_file)) \
                and not os.path.isdir(os.path.join(cfg.workdir, "nnUNet_raw")):
            raise BenchmarkError(f"--fresh: {cfg.workdir} does not look like a benchmark work folder (no "
                                 f"{setup_file}); not deleting it.")
        shutil.rmtree(cfg.workdir)
    return run_benchmark(cfg)
