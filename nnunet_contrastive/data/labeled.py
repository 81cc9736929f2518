"""Labeled subsets for research: which training cases of each fold are treated as labeled.

Stored in nnU-Net's own `splits_final.json` (preprocessed dataset folder) as extra keys per fold, which nnU-Net
ignores, so the file stays a valid nnU-Net split::

    [{"train": [...], "val": [...],
      "labeled": ["case_a", "case_b"],
      "labeled_selection": {"num_labeled": 2, "seed": 0, "by": "patient"}}, ...]

A fold without a `labeled` key is fully labeled. The other training cases of the fold are unlabeled: our trainers
never read their label files. Validation cases are untouched (labeled, as in nnU-Net).
"""
from __future__ import annotations

import json
import os

import numpy as np

LABELED_KEY = "labeled"
SELECTION_KEY = "labeled_selection"
SPLITS_FILENAME = "splits_final.json"


class LabeledSubsetError(ValueError):
    """An impossible or inconsistent labeled-subset request; the message says which fold, case and how to fix it."""


def select_labeled(train_keys: list[str], num_labeled: int | str, seed: int, fold: int,
                   groups: dict[str, str] | None = None) -> list[str]:
    """Pick the labeled cases of one fold, reproducibly.

    `groups` maps case -> group (patient) for `--by patient`: `num_labeled` then counts groups and every case of a
    chosen group is labeled. `num_labeled="all"` labels every training case. The draw depends only on
    (seed, fold, sorted keys), never on file order.
    """
    keys = sorted(train_keys)
    if num_labeled == "all":
        return keys
    if isinstance(num_labeled, bool) or not isinstance(num_labeled, (int, np.integer)) or num_labeled < 1:
        raise LabeledSubsetError(f"--num-labeled must be a positive integer or 'all', got {num_labeled!r}.")
    if groups is None:
        groups = {k: k for k in keys}
    missing = [k for k in keys if k not in groups]
    if missing:
        raise LabeledSubsetError(f"fold {fold}: no patient for case(s) {missing[:5]} (metadata.csv 'patient').")
    units = sorted({groups[k] for k in keys})
    what = "patients" if any(groups[k] != k for k in keys) else "cases"
    if num_labeled > len(units):
        raise LabeledSubsetError(
            f"fold {fold}: {num_labeled} labeled {what} requested but its training set has only {len(units)}. "
            f"Ask for at most {len(units)} (or 'all').")
    rng = np.random.default_rng([int(seed), int(fold)])
    chosen = set(rng.choice(units, size=num_labeled, replace=False).tolist())
    return [k for k in keys if groups[k] in chosen]


def apply_selection(splits: list[dict], num_labeled: int | str, seed: int, by: str = "case",
                    groups: dict[str, str] | None = None, folds: list[int] | None = None) -> list[dict]:
    """Return a copy of nnU-Net splits with `labeled` / `labeled_selection` set on the chosen folds."""
    if by not in ("case", "patient"):
        raise LabeledSubsetError(f"--by must be 'case' or 'patient', got {by!r}.")
    if by == "patient" and groups is None:
        raise LabeledSubsetError("--by patient needs the case -> patient mapping (metadata.csv 'patient' column).")
    out = [dict(s) for s in splits]
    for fold in (range(len(out)) if folds is None else folds):
        if not 0 <= fold < len(out):
            raise LabeledSubsetError(f"fold {fold} does not exist: the split file has {len(out)} folds.")
        lab = select_labeled(out[fold]["train"], num_labeled, seed, fold, groups if by == "patient" else None)
        out[fold][LABELED_KEY] = lab
        out[fold][SELECTION_KEY] = {"num_labeled": num_labeled, "seed": int(seed), "by": by}
    return out


def grouped_crossval_split(cases: list[str], groups: dict[str, str], n_splits: int = 5,
                           seed: int = 12345) -> list[dict]:
    """nnU-Net's cross-validation rule (sklearn KFold, shuffled, seed 12345) applied to patients instead of cases.

    All cases of a patient (e.g. both ACDC phases) land in the same fold, so a validation case never shares a
    patient with a training case. Returns nnU-Net's split format (`train`/`val` per fold, cases sorted).
    """
    from sklearn.model_selection import KFold

    patients = sorted({groups[c] for c in cases})
    if len(patients) < n_splits:
        raise LabeledSubsetError(f"{len(patients)} patients cannot make {n_splits} folds; add patients or use "
                                 f"nnU-Net's case-level split.")
    splits = []
    for tr_idx, val_idx in KFold(n_splits=n_splits, shuffle=True, random_state=seed).split(patients):
        tr_p, val_p = {patients[i] for i in tr_idx}, {patients[i] for i in val_idx}
        splits.append({"train": sorted(c for c in cases if groups[c] in tr_p),
                       "val": sorted(c for c in cases if groups[c] in val_p)})
    return splits


def patients_across_train_and_val(splits: list[dict], groups: dict[str, str]) -> dict[int, list[str]]:
    """fold -> patients that have cases in both its train and val lists (leakage under --by patient)."""
    out = {}
    for fold, s in enumerate(splits):
        both = sorted({groups.get(c, c) for c in s["train"]} & {groups.get(c, c) for c in s["val"]})
        if both:
            out[fold] = both
    return out


def labeled_and_unlabeled(split: dict, fold: int | str = "?") -> tuple[list[str], list[str]]:
    """(labeled, unlabeled) training cases of one split entry; fully labeled when it has no `labeled` key."""
    train = list(split["train"])
    if LABELED_KEY not in split:
        return train, []
    labeled = list(split[LABELED_KEY])
    stray = [k for k in labeled if k not in set(train)]
    if stray:
        raise LabeledSubsetError(
            f"{SPLITS_FILENAME}, fold {fold}: labeled case(s) {stray[:5]} are not in that fold's 'train' list. "
            f"Re-run 'nnunet-contrastive select-labeled' after changing the split.")
    if not labeled:
        raise LabeledSubsetError(f"{SPLITS_FILENAME}, fold {fold}: the 'labeled' list is empty.")
    lab = set(labeled)
    return labeled, [k for k in train if k not in lab]


def read_splits(preprocessed_dataset_folder: str) -> list[dict]:
    path = os.path.join(preprocessed_dataset_folder, SPLITS_FILENAME)
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def write_splits(preprocessed_dataset_folder: str, splits: list[dict]) -> str:
    path = os.path.join(preprocessed_dataset_folder, SPLITS_FILENAME)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(splits, f, indent=1)
    return path
