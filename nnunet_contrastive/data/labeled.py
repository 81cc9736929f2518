"""Labeled subsets for research: which training cases of each fold are treated as labeled.

Stored in nnU-Net's own `splits_final.json` (preprocessed dataset folder) as extra keys per fold, which nnU-Net
ignores, so the file stays a valid nnU-Net split::

    [{"train": [...], "val": [...],
      "labeled": ["case_a", "case_b"],
      "labeled_selection": {"num_labeled": 2, "seed": 0, "by": "patient"}}, ...]

A fold without a `labeled` key is fully labeled. The other training cases of the fold are unlabeled: our trainers
never read their label files. Validation cases are untouched (labeled, as in nnU-Net).

`read_splits` validates the file before anything uses it (`split_problems`): valid UTF-8 JSON, a list of folds with
`train` and `val` lists of case names, no case in both lists of a fold, `labeled` within `train`, and, given the
dataset's cases, no name that is not a case of this dataset (a split file copied from another dataset).
"""
from __future__ import annotations

import os

import numpy as np

from nnunet_contrastive.data.files import atomic_write_json, read_json
from nnunet_contrastive.errors import UserInputError

LABELED_KEY = "labeled"
SELECTION_KEY = "labeled_selection"
SPLITS_FILENAME = "splits_final.json"


class LabeledSubsetError(UserInputError):
    """An impossible or inconsistent labeled-subset request; the message says which fold, case and how to fix it."""


def select_labeled(train_keys: list[str], num_labeled: int | str, seed: int, fold: int,
                   groups: dict[str, str] | None = None) -> list[str]:
    """Pick the labeled cases of one fold, reproducibly.

    `groups` maps case -> group (patient) for `--by patient`: `num_labeled` then counts groups and every case of a
    chosen group is labeled. `num_labeled="all"` labels every training case. The draw depends only on
    (seed, fold, sorted keys), never on file order.
    """
    keys = sorted(train_keys)
    check_seed(seed)
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
    check_seed(seed)
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


def check_seed(seed, option: str = "--seed") -> int:
    """A seed must be a non-negative integer (numpy's generators refuse negative ones)."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise LabeledSubsetError(f"{option} must be a non-negative integer, got {seed!r}.")
    return int(seed)


def _names(value) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def split_problems(splits, known_cases=None) -> list[str]:
    """Problems of nnU-Net split data (`[{'train': [...], 'val': [...], 'labeled': [...]?}, ...]`), fold by fold.

    `known_cases`: the dataset's case ids; every name in the file must be one of them."""
    if not isinstance(splits, list) or not splits:
        return [f"expected a non-empty list of folds ({{\"train\": [...], \"val\": [...]}}), got "
                f"{type(splits).__name__}{'' if splits else ' (empty)'}."]
    known = None if known_cases is None else set(known_cases)
    errors = []
    for fold, s in enumerate(splits):
        if not isinstance(s, dict):
            errors.append(f"fold {fold}: expected an object with 'train' and 'val', got {type(s).__name__}.")
            continue
        missing = [k for k in ("train", "val") if k not in s]
        if missing:
            errors.append(f"fold {fold}: no {' and no '.join(repr(k) for k in missing)} key (keys: {sorted(s)}).")
            continue
        bad = [k for k in ("train", "val", LABELED_KEY) if k in s and not _names(s[k])]
        if bad:
            errors.append(f"fold {fold}: {', '.join(repr(k) for k in bad)} must be a list of case names.")
            continue
        both = sorted(set(s["train"]) & set(s["val"]))
        if both:
            errors.append(f"fold {fold}: case(s) {both[:5]} are in both 'train' and 'val' ({len(both)} in all): "
                          f"validation would score training cases (to train on every case, use fold 'all').")
        if not s["train"]:
            errors.append(f"fold {fold}: the 'train' list is empty.")
        if LABELED_KEY in s:
            stray = [k for k in s[LABELED_KEY] if k not in set(s["train"])]
            if stray:
                errors.append(f"fold {fold}: labeled case(s) {stray[:5]} are not in that fold's 'train' list.")
        if known is not None:
            unknown = sorted({k for key in ("train", "val") for k in s[key]} - known)
            if unknown:
                errors.append(f"fold {fold}: {len(unknown)} case(s) are not cases of this dataset (e.g. "
                              f"{unknown[:3]}); is the file from another dataset?")
    return errors


def read_splits(preprocessed_dataset_folder: str, known_cases=None) -> list[dict]:
    """`splits_final.json` of a preprocessed dataset folder, validated (`split_problems`); LabeledSubsetError
    naming the file, fold and key otherwise."""
    path = os.path.join(preprocessed_dataset_folder, SPLITS_FILENAME)
    fix = (f"Fix it, or delete it: 'nnunet-contrastive select-labeled' and nnU-Net then create a new one with "
           f"nnU-Net's own 5-fold rule.")
    splits = read_json(path, LabeledSubsetError, fix=fix)
    errors = split_problems(splits, known_cases)
    if errors:
        raise LabeledSubsetError("\n  ".join([f"{path}:"] + errors) + "\n" + fix)
    return splits


def write_splits(preprocessed_dataset_folder: str, splits: list[dict]) -> str:
    """Write `splits_final.json` (through a temporary file: a failure leaves the old one intact)."""
    return atomic_write_json(os.path.join(preprocessed_dataset_folder, SPLITS_FILENAME), splits, indent=1)


def preprocessed_case_ids(folder: str) -> set[str]:
    """Case ids of an nnU-Net preprocessed data folder (one `<case>.pkl` per case); empty when it does not exist."""
    if not os.path.isdir(folder):
        return set()
    return {f[:-4] for f in os.listdir(folder) if f.endswith(".pkl")}


def check_training_split(preprocessed_dataset_folder: str, data_folder: str) -> None:
    """What a trainer checks at start-up, before nnU-Net reads the split: `splits_final.json` (if present) is
    valid and names only cases of `data_folder` (the configuration's preprocessed folder), and no case id of the
    unlabeled folder (`<data_folder>_unlabeled`, written by preprocess-unlabeled) is also a labeled case."""
    from nnunet_contrastive.prep.preprocess_unlabeled import UNLABELED_SUFFIX

    labeled = preprocessed_case_ids(data_folder)
    if os.path.isfile(os.path.join(preprocessed_dataset_folder, SPLITS_FILENAME)):
        read_splits(preprocessed_dataset_folder, known_cases=labeled or None)
    both = sorted(labeled & preprocessed_case_ids(data_folder + UNLABELED_SUFFIX))
    if both:
        raise LabeledSubsetError(
            f"case(s) {both[:5]} are both labeled cases ({data_folder}) and unlabeled cases "
            f"({data_folder + UNLABELED_SUFFIX}); a validation case could enter the training pool.",
            fix="Give each case one id (rename or remove it in imagesTr or imagesUnlabeled), then run "
                "'nnunet-contrastive check' and 'nnunet-contrastive preprocess-unlabeled' again.")
