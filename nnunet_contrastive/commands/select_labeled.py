"""`nnunet-contrastive select-labeled`: simulate few labels on a fully labeled dataset, per fold, reproducibly."""
from __future__ import annotations

import os
import sys

from nnunet_contrastive.data.labeled import (LabeledSubsetError, SPLITS_FILENAME, apply_selection, check_seed,
                                             grouped_crossval_split, patients_across_train_and_val, read_splits,
                                             write_splits)
from nnunet_contrastive.data.metadata import METADATA_FILENAME, MetadataError, load_dataset_json, read_metadata


def register(sub) -> None:
    p = sub.add_parser(
        "select-labeled", help="record per fold which training cases are labeled (the rest are unlabeled)",
        description="Pick N labeled training cases (or patients, --by patient) per fold and record them as an "
                    "extra 'labeled' key in nnU-Net's splits_final.json (created with nnU-Net's own 5-fold rule if "
                    "missing; nnU-Net ignores the extra key). Our trainers never read the labels of the other "
                    "training cases. Reproducible: the draw depends only on --seed, the fold and the case names.")
    p.add_argument("-d", "--dataset", required=True, help="dataset id or name")
    p.add_argument("--num-labeled", required=True,
                   help="number of labeled cases (patients with --by patient) per fold, or 'all'")
    p.add_argument("--seed", type=int, default=0, help="random seed, a non-negative integer (default 0)")
    p.add_argument("--by", choices=("case", "patient"), default="case",
                   help="count and keep together cases (default) or patients (metadata.csv 'patient' column)")
    p.add_argument("-f", "--folds", type=int, nargs="*", default=None, help="folds to set (default: all)")
    p.set_defaults(func=run)


def _identifiers(preprocessed: str) -> list[str]:
    dj = load_dataset_json(preprocessed)
    gt = os.path.join(preprocessed, "gt_segmentations")
    if not os.path.isdir(gt):
        raise LabeledSubsetError(f"{gt} does not exist: run nnUNetv2_plan_and_preprocess for this dataset first.")
    ending = dj["file_ending"]
    return sorted(f[: -len(ending)] for f in os.listdir(gt) if f.endswith(ending))


def ensure_splits(preprocessed: str, groups: dict[str, str] | None = None) -> list[dict]:
    """nnU-Net's splits_final.json, validated against the dataset's cases; when missing, created with nnU-Net's own
    rule (5-fold KFold, seed 12345), over patients instead of cases when `groups` is given (so no patient is in
    both train and val)."""
    cases = _identifiers(preprocessed)
    if os.path.isfile(os.path.join(preprocessed, SPLITS_FILENAME)):
        return read_splits(preprocessed, known_cases=cases)
    if groups is not None:
        missing = [c for c in cases if c not in groups]
        if missing:
            raise MetadataError(f"{METADATA_FILENAME}: training case(s) {missing[:5]} have no row; run "
                                f"'nnunet-contrastive check' for details.")
        splits = grouped_crossval_split(cases, groups)
    else:
        from nnunetv2.utilities.crossval_split import generate_crossval_split

        splits = generate_crossval_split(cases, seed=12345, n_splits=5)
    write_splits(preprocessed, splits)
    print(f"created {SPLITS_FILENAME} (5 folds{' over patients' if groups else ''})")
    return splits


def patient_groups(preprocessed: str, raw: str | None) -> dict[str, str]:
    for folder in (preprocessed, raw):
        if folder and os.path.isfile(os.path.join(folder, METADATA_FILENAME)):
            table = read_metadata(folder, load_dataset_json(folder))
            return {c: table.value(c, "patient") for c in table.cases}
    raise MetadataError(f"--by patient needs {METADATA_FILENAME} (column 'patient') in {preprocessed} or the raw "
                        f"dataset folder.")


def run(args) -> int:
    from nnunet_contrastive.prep.nnunet_paths import NnUNetPathError, preprocessed_folder, raw_folder

    pre = preprocessed_folder(args.dataset)
    try:
        raw = raw_folder(args.dataset)
    except NnUNetPathError:
        raw = None
    n = args.num_labeled if args.num_labeled == "all" else _positive_int(args.num_labeled)
    check_seed(args.seed)
    groups = patient_groups(pre, raw) if args.by == "patient" else None
    splits = ensure_splits(pre, groups)
    if groups is not None:
        missing = sorted({k for s in splits for k in s["train"] if k not in groups})
        if missing:
            raise MetadataError(f"{METADATA_FILENAME}: training case(s) {missing[:5]} have no row; "
                                f"run 'nnunet-contrastive check' for details.")
        for fold, pats in patients_across_train_and_val(splits, groups).items():
            print(f"warning: fold {fold} of {SPLITS_FILENAME} has patient(s) {pats[:5]} in both train and val "
                  f"(a case-level split). Delete the file and re-run with --by patient for a patient-level "
                  f"split.", file=sys.stderr)
    new = apply_selection(splits, n, args.seed, args.by, groups, args.folds)
    path = write_splits(pre, new)
    print(f"wrote {path}")
    for fold, s in enumerate(new):
        if "labeled" in s and (args.folds is None or fold in args.folds):
            print(f"fold {fold}: {len(s['labeled'])} labeled / {len(s['train']) - len(s['labeled'])} unlabeled "
                  f"training cases, {len(s['val'])} validation: labeled = {', '.join(s['labeled'])}")
    return 0


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise LabeledSubsetError(f"--num-labeled must be a positive integer or 'all', got '{text}'.") from None
    if value < 1:
        raise LabeledSubsetError(f"--num-labeled must be a positive integer or 'all', got '{text}'.")
    return value
