"""Samples/second of the slice-aware loader (nnunet_contrastive.data.dataloading) against nnU-Net's stock loader.

Both loaders get the same preprocessed 2d dataset, batch size and nnU-Net training transforms
(`nnUNetTrainer.get_training_transforms` as `get_dataloaders` configures them) and run in this process with one
thread (as nnU-Net's augmentation workers do), so the numbers are per-worker throughput. Modes:

    a  random       nnU-Net's sampling plus slice position / partition / meta-labels
    b  partition    volumes x partitions (batch size must be a multiple of --partitions)
    c  mixed        half the batch from unlabeled cases (image only), half labeled; half the cases are unlabeled
    d  two views    two augmentations per sample (independent; 'd shared' replays the spatial transforms)

Stock and ours alternate for --rounds rounds of --batches batches each; the table shows the median samples/s and
stock/ours (= our time per sample / stock time per sample; target <= 1.2 for a-c; d runs the augmentation twice).

Data (--dataset): `hippocampus` converts ../shared/data/Task04_Hippocampus with `nnunet-contrastive convert-msd` and
preprocesses it with nnU-Net into --workdir (once; reused afterwards); `phantom` does the same with a synthetic
cardiac phantom; a dataset id or name uses an already preprocessed dataset under $nnUNet_preprocessed. `auto`
(default) is hippocampus when the shared data are present, else phantom.

    python -m benchmarks.loader_throughput [--dataset auto|hippocampus|phantom|ID] [--batch-size 30] [--json out]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HIPPOCAMPUS_SRC = os.path.join(os.path.dirname(REPO), "shared", "data", "Task04_Hippocampus")
HIPPOCAMPUS_ID, PHANTOM_ID = 904, 905


def _log(*a):
    print(*a, flush=True)


def prepare(dataset: str, workdir: str) -> tuple[str, str]:
    """(nnUNet_preprocessed root, dataset name) of a preprocessed dataset; converts/preprocesses if needed."""
    from nnunet_contrastive.prep.pipeline import nnunet_folders, plan_and_preprocess, small_machine_env

    if dataset == "auto":
        dataset = "hippocampus" if os.path.isdir(os.path.join(HIPPOCAMPUS_SRC, "imagesTr")) else "phantom"
    if dataset not in ("hippocampus", "phantom"):
        from nnunet_contrastive.prep.nnunet_paths import dataset_name

        root = os.environ.get("nnUNet_preprocessed")
        if not root:
            sys.exit("--dataset ID needs $nnUNet_preprocessed (or use --dataset hippocampus / phantom)")
        return root, dataset_name(dataset)
    folders = nnunet_folders(workdir)
    os.environ.update(folders)
    ident = HIPPOCAMPUS_ID if dataset == "hippocampus" else PHANTOM_ID
    existing = [d for d in os.listdir(folders["nnUNet_preprocessed"]) if d.startswith(f"Dataset{ident:03d}_")]
    if existing and os.path.isfile(os.path.join(folders["nnUNet_preprocessed"], existing[0], "nnUNetPlans.json")) \
            and os.path.isdir(os.path.join(folders["nnUNet_preprocessed"], existing[0], "nnUNetPlans_2d")):
        _log(f"reusing preprocessed {existing[0]} in {workdir}")
        return folders["nnUNet_preprocessed"], existing[0]
    if dataset == "hippocampus":
        from nnunet_contrastive.prep.converters import convert_msd

        raw_name = [d for d in os.listdir(folders["nnUNet_raw"]) if d.startswith(f"Dataset{ident:03d}_")]
        if not raw_name:
            _log(f"converting {HIPPOCAMPUS_SRC} (convert-msd) ...")
            convert_msd(HIPPOCAMPUS_SRC, ident, raw_root=folders["nnUNet_raw"], log=lambda *a: None)
    else:
        from nnunet_contrastive.prep.phantom import generate_phantom_dataset

        _log("writing a phantom dataset ...")
        generate_phantom_dataset(folders["nnUNet_raw"], ident, num_train_patients=8, num_test_patients=0, size=64)
    _log("nnU-Net plan_and_preprocess (2d) ...")
    t0 = time.time()
    plan_and_preprocess(ident, small_machine_env(dict(os.environ)), log=lambda *a: None)
    _log(f"  done in {time.time() - t0:.0f} s")
    from nnunet_contrastive.data.metadata import copy_metadata

    name = [d for d in os.listdir(folders["nnUNet_preprocessed"]) if d.startswith(f"Dataset{ident:03d}_")][0]
    copy_metadata(os.path.join(folders["nnUNet_raw"], name), os.path.join(folders["nnUNet_preprocessed"], name))
    return folders["nnUNet_preprocessed"], name


def build(pre_root: str, name: str, batch_size: int, partitions: int):
    """{mode: (stock loader, our loader)} on the dataset's 2d configuration."""
    import torch
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    from nnunet_contrastive.data.dataloading import SliceAwareDataLoader, find_metadata, nnunet_transforms

    os.environ["nnUNet_preprocessed"] = pre_root
    os.environ["nnUNet_results"] = tempfile.mkdtemp(prefix="loader_bench_results_")
    pre = os.path.join(pre_root, name)
    plans = load_json(os.path.join(pre, "nnUNetPlans.json"))
    plans["continue_training"] = False
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        trainer = nnUNetTrainer(plans, "2d", 0, load_json(os.path.join(pre, "dataset.json")), torch.device("cpu"))
        tr_transforms, _, initial_patch_size, patch_size = nnunet_transforms(trainer)
    folder = trainer.preprocessed_dataset_folder
    cls = infer_dataset_class(folder)
    keys = sorted(cls.get_identifiers(folder))
    half = len(keys) // 2
    lm = trainer.label_manager
    meta = find_metadata(trainer)
    common = dict(label_manager=lm, oversample_foreground_percent=trainer.oversample_foreground_percent,
                  transforms=tr_transforms)

    def stock():
        return nnUNetDataLoader(cls(folder, list(keys)), batch_size, initial_patch_size, patch_size, **common)

    def ours(**kw):
        ds = cls(folder, list(kw.pop("labeled", keys)))
        return SliceAwareDataLoader(ds, batch_size, initial_patch_size, patch_size, metadata=meta,
                                    num_partitions=partitions, **common, **kw)

    loaders = {
        "a random": (stock(), ours(sampling="random")),
        "b partition": (stock(), ours(sampling="partition")),
        "c mixed": (stock(), ours(labeled=keys[:half], unlabeled=[cls(folder, list(keys[half:]))],
                                  num_unlabeled=batch_size // 2)),
        "d two views": (stock(), ours(two_views=True)),
        "d shared": (stock(), ours(two_views=True, share_spatial=True)),
    }
    info = {"dataset": name, "cases": len(keys), "patch_size": list(map(int, patch_size)),
            "initial_patch_size": list(map(int, initial_patch_size)), "batch_size": batch_size,
            "partitions": partitions, "meta_labels": meta.available_meta_labels() if meta else []}
    return loaders, info


def rate(loader, batches: int, batch_size: int, seed: int) -> float:
    import numpy as np
    import torch

    np.random.seed(seed)
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    for _ in range(batches):
        next(loader)
    return batches * batch_size / (time.perf_counter() - t0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset", default="auto", help="auto | hippocampus | phantom | preprocessed dataset id/name")
    ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "nnunet_contrastive_loader_bench"))
    ap.add_argument("--batch-size", type=int, default=30)
    ap.add_argument("--batches", type=int, default=10, help="batches per measurement")
    ap.add_argument("--rounds", type=int, default=3, help="alternating stock/ours rounds (median reported)")
    ap.add_argument("--partitions", type=int, default=3)
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args(argv)
    if args.batch_size % args.partitions or args.batch_size % 2:
        sys.exit("--batch-size must be a multiple of --partitions and of 2")

    import torch

    torch.set_num_threads(1)
    pre_root, name = prepare(args.dataset, args.workdir)
    loaders, info = build(pre_root, name, args.batch_size, args.partitions)
    _log(f"dataset {info['dataset']}: {info['cases']} cases, patch {info['patch_size']} (loader crop "
         f"{info['initial_patch_size']}), batch {args.batch_size}, K={args.partitions}, meta-labels "
         f"{info['meta_labels']}; {args.rounds} rounds x {args.batches} batches, 1 thread")
    for stock, ours in loaders.values():  # warm-up: file cache, first-call allocations
        next(stock)
        next(ours)
    results = {m: {"stock": [], "ours": []} for m in loaders}
    for r in range(args.rounds):
        for mode, (stock, ours) in loaders.items():
            results[mode]["stock"].append(rate(stock, args.batches, args.batch_size, 100 + r))
            results[mode]["ours"].append(rate(ours, args.batches, args.batch_size, 100 + r))
    rows = []
    _log(f"\n{'mode':<13} {'stock samples/s':>16} {'ours samples/s':>15} {'stock/ours':>11}  target")
    for mode, res in results.items():
        s, o = statistics.median(res["stock"]), statistics.median(res["ours"])
        ratio = s / o
        target = "<= 1.20 " + ("ok" if ratio <= 1.2 else "MISSED") if not mode.startswith("d") else "(report)"
        _log(f"{mode:<13} {s:>16.1f} {o:>15.1f} {ratio:>11.2f}  {target}")
        rows.append({"mode": mode, "stock_samples_per_s": s, "ours_samples_per_s": o, "stock_over_ours": ratio,
                     "stock_runs": res["stock"], "ours_runs": res["ours"]})
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"info": info, "results": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
