"""`nnunet-contrastive demo`: phantom data -> nnU-Net plan/preprocess -> train -> predict -> evaluate -> table.

Everything runs through nnU-Net's own commands (nnunet_contrastive.prep.pipeline). The training schedule is shortened
with the `nnUNet_contrastive_*` environment variables (trainers/base.py) and the `cpu_small` plans override, so the
default run takes a few minutes on 2 CPU cores. The numbers of such a short run are a smoke test, not a benchmark.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import time

DEFAULT_TRAINERS = ["nnUNetTrainerFewLabels", "nnUNetTrainerSPCon"]
DATASET_ID = 990


def register(sub) -> None:
    p = sub.add_parser(
        "demo", help="short end-to-end demo on synthetic cardiac phantoms (a few minutes on 2 CPU cores)",
        description="Generate cardiac-cine-like phantoms in nnU-Net raw format, run nnUNetv2_plan_and_preprocess "
                    "(2d), keep only --num-labeled patients labeled, train each trainer with a short schedule via "
                    "nnUNetv2_train, predict held-out phantoms with nnUNetv2_predict, score them with "
                    "nnUNetv2_evaluate_folder and print Dice per class and wall time per trainer.")
    p.add_argument("--workdir", default="nnunet_contrastive_demo",
                   help="folder for nnUNet_raw/preprocessed/results of the demo (default ./nnunet_contrastive_demo)")
    p.add_argument("--trainers", nargs="+", default=None, help=f"trainers to run (default {DEFAULT_TRAINERS})")
    p.add_argument("--patients", type=int, default=8, help="training patients (2 cases each; default 8)")
    p.add_argument("--test-patients", type=int, default=3, help="held-out test patients (default 3)")
    p.add_argument("--num-labeled", default="1", help="labeled training patients of fold 0, or 'all' (default 1)")
    p.add_argument("--epochs", type=int, default=6,
                   help="epochs per trainer, pre-training included: every trainer gets the same budget (default 6)")
    p.add_argument("--pretrain-epochs", type=int, default=2,
                   help="of --epochs, contrastive pre-training epochs of two-stage trainers (default 2)")
    p.add_argument("--iterations", type=int, default=20, help="iterations per epoch (default 20)")
    p.add_argument("--size", type=int, default=48, help="in-plane size of the phantoms in pixels (default 48)")
    p.add_argument("--seed", type=int, default=0, help="seed of the phantoms and the labeled subset (a non-negative integer)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="training/inference device")
    p.add_argument("--fresh", action="store_true", help="delete --workdir first (otherwise finished steps are reused)")
    p.set_defaults(func=run)


def run(args) -> int:
    from nnunet_contrastive.prep import pipeline
    from nnunet_contrastive.commands.select_labeled import run as select_labeled
    from nnunet_contrastive.data.labeled import check_seed
    from nnunet_contrastive.data.metadata import copy_metadata
    from nnunet_contrastive.prep.phantom import generate_phantom_dataset
    from nnunet_contrastive.prep.plans_override import derive_plans

    check_seed(args.seed)  # before anything is deleted or written
    t_start = time.time()
    trainers = args.trainers or DEFAULT_TRAINERS
    device = args.device
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    workdir = os.path.abspath(args.workdir)
    if args.fresh and os.path.isdir(workdir):
        shutil.rmtree(workdir)
    folders = pipeline.nnunet_folders(workdir)
    os.environ.update(folders)  # for the in-process steps (plans override, select-labeled)
    env = pipeline.small_machine_env(
        **folders, nnUNet_contrastive_epochs=args.epochs, nnUNet_contrastive_iterations=args.iterations,
        nnUNet_contrastive_val_iterations=max(1, args.iterations // 5),
        nnUNet_contrastive_pretrain_epochs=min(args.pretrain_epochs, args.epochs))

    def step(msg):
        print(f"\n[demo {time.time() - t_start:6.0f} s] {msg}", flush=True)

    name = "CardiacPhantom"
    raw = os.path.join(folders["nnUNet_raw"], f"Dataset{DATASET_ID:03d}_{name}")
    pre = os.path.join(folders["nnUNet_preprocessed"], f"Dataset{DATASET_ID:03d}_{name}")
    if not os.path.isfile(os.path.join(raw, "dataset.json")):
        step(f"1/5 writing {args.patients} + {args.test_patients} phantom patients (ED + ES each) to {raw}")
        generate_phantom_dataset(folders["nnUNet_raw"], DATASET_ID, name, num_train_patients=args.patients,
                                 num_test_patients=args.test_patients, size=args.size, seed=args.seed)
    else:
        step(f"1/5 reusing phantoms in {raw}")
    if not os.path.isfile(os.path.join(pre, "nnUNetPlans.json")) or not os.path.isdir(
            os.path.join(pre, "nnUNetPlans_2d")):
        step("2/5 nnUNetv2_plan_and_preprocess (2d)")
        pipeline.plan_and_preprocess(DATASET_ID, env)
    else:
        step("2/5 reusing nnU-Net's plans and preprocessed data")
    copy_metadata(raw, pre)
    plans = derive_plans(pre, "cpu_small")
    step(f"3/5 plans '{plans}' (cpu_small override); labeled subset: {args.num_labeled} patient(s) in fold 0")
    ns = type("A", (), dict(dataset=str(DATASET_ID), num_labeled=args.num_labeled, seed=args.seed, by="patient",
                            folds=[0]))
    select_labeled(ns)  # raises a UserInputError on bad input

    rows = []
    labels = json.load(open(os.path.join(raw, "dataset.json")))["labels"]
    for tr in trainers:
        t0 = time.time()
        step(f"4/5 nnUNetv2_train {DATASET_ID} 2d 0 -tr {tr} -p {plans} ({args.epochs} epochs x "
             f"{args.iterations} iterations, device {device})")
        shutil.rmtree(os.path.join(folders["nnUNet_results"], f"Dataset{DATASET_ID:03d}_{name}",
                                   f"{tr}__{plans}__2d", "fold_0"), ignore_errors=True)  # a fresh run each time
        pipeline.train(DATASET_ID, tr, plans, 0, env, device=device)
        out = os.path.join(workdir, "predictions", tr)
        shutil.rmtree(out, ignore_errors=True)
        step(f"5/5 nnUNetv2_predict on {args.test_patients * 2} held-out cases, nnUNetv2_evaluate_folder")
        pipeline.predict(DATASET_ID, tr, plans, 0, os.path.join(raw, "imagesTs"), out, env, device=device)
        summary = pipeline.evaluate(os.path.join(raw, "labelsTs"), out, os.path.join(raw, "dataset.json"),
                                    os.path.join(pre, f"{plans}.json"), env)
        rows.append((tr, pipeline.dice_from_summary(summary, labels), time.time() - t0))

    table = format_table(rows, [k for k, v in labels.items() if v != 0])
    step("done")
    print(f"\nHeld-out Dice ({args.test_patients * 2} phantom cases; {args.num_labeled} labeled patient(s), "
          f"{args.epochs}x{args.iterations} iterations per trainer, of which {min(args.pretrain_epochs, args.epochs)}"
          f"x{args.iterations} contrastive pre-training for two-stage trainers; device {device}) — a smoke test on "
          f"synthetic shapes, not a benchmark:\n")
    print(table)
    print(f"\nTotal wall time {time.time() - t_start:.0f} s. Results: {folders['nnUNet_results']}")
    sys.stdout.flush()
    return 0


def format_table(rows, class_names) -> str:
    head = ["trainer"] + [f"Dice {c}" for c in class_names] + ["mean Dice", "wall (s)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for tr, dice, wall in rows:
        cells = [tr] + [f"{dice[c]:.3f}" for c in class_names] + [f"{dice['mean']:.3f}", f"{wall:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
