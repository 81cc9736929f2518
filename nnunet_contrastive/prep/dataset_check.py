"""Check a raw dataset's cases against its metadata (`nnunet-contrastive check`; trainers can call it at start).

Cases
-----
- labeled: `imagesTr/<case>_0000<file_ending>` (nnU-Net's own training cases; each needs `labelsTr/<case><ending>`).
- unlabeled: `imagesUnlabeled/<case>_0000<file_ending>` (+ `_0001`, ... per channel of `dataset.json`
  `channel_names`). `imagesUnlabeled/` is this project's convention for truly unlabeled images: same naming as
  imagesTr, no labels, never read by nnU-Net itself (planning, `--verify_dataset_integrity`, preprocessing,
  validation only see imagesTr/labelsTr). `nnunet-contrastive preprocess-unlabeled` preprocesses it with the
  dataset's plans. A case id must not be both labeled and unlabeled.

Metadata (`metadata.csv`, format in `nnunet_contrastive.data.metadata`): every labeled and unlabeled case has a row, no row
names an unknown case, values are non-empty and of one type per column, `dataset.json` `meta_labels` (if present)
names existing columns.

Images (`nnunet_contrastive.prep.image_check`): every image and label file is read completely (a truncated
`.nii.gz` is an error, not zeros), holds one channel in 2D or 3D, the channels of a case and its label share one
voxel grid, and label values are among `dataset.json` `labels`.

`check_dataset(raw_folder)` never raises for problems of the dataset: it returns a `CheckReport` whose `errors` name
the file, case and column and say how to fix it (`report.raise_for_errors()` turns them into one `MetadataError`).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

from nnunet_contrastive.data.files import read_json
from nnunet_contrastive.data.metadata import (DATASET_JSON_KEY, METADATA_FILENAME, MetadataError, MetadataTable,
                                              read_metadata, validate_against_cases)
from nnunet_contrastive.errors import UserInputError
from nnunet_contrastive.prep.image_check import case_problems, declared_label_values

UNLABELED_FOLDER = "imagesUnlabeled"
_CHANNEL_RE = re.compile(r"^(.+)_(\d{4})$")


class DatasetCheckError(MetadataError):
    """A raw dataset with problems; the message lists every one."""


@dataclass
class CheckReport:
    raw_folder: str
    labeled: list[str] = field(default_factory=list)
    unlabeled: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    table: MetadataTable | None = None
    # column -> value -> (labeled cases, unlabeled cases)
    counts: dict[str, dict[str, tuple[int, int]]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.errors

    def raise_for_errors(self) -> None:
        if self.errors:
            raise DatasetCheckError(f"{self.raw_folder}: {len(self.errors)} problem(s):\n  " + "\n  ".join(self.errors)
                                    + f"\nFix them and run 'nnunet-contrastive check' again.")

    def format_counts(self, max_values: int = 20) -> str:
        """Human-readable counts per meta-label value (long columns such as `patient` are summarised)."""
        lines = [f"{len(self.labeled)} labeled (imagesTr) + {len(self.unlabeled)} unlabeled ({UNLABELED_FOLDER}) "
                 f"cases"]
        for col, values in self.counts.items():
            totals = {v: a + b for v, (a, b) in values.items()}
            if len(values) > max_values:
                lo, hi = min(totals.values()), max(totals.values())
                per = f"{lo}" if lo == hi else f"{lo} to {hi}"
                lines.append(f"{col}: {len(values)} values, {per} case(s) each")
                continue
            lines.append(f"{col}: {len(values)} value(s)")
            for v, (a, b) in values.items():
                lines.append(f"  {v}: {a + b} ({a} labeled, {b} unlabeled)")
        return "\n".join(lines)


def list_image_cases(folder: str, file_ending: str, num_channels: int) -> tuple[dict[str, list[str]], list[str]]:
    """case -> its channel files (`_0000`, `_0001`, ...) in an nnU-Net images folder, plus error messages."""
    errors: list[str] = []
    channels: dict[str, dict[int, str]] = {}
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if name.startswith(".") or not os.path.isfile(path):
            continue
        if not name.endswith(file_ending):
            errors.append(f"{path}: does not end with the dataset's file_ending '{file_ending}'. Convert or remove it.")
            continue
        m = _CHANNEL_RE.match(name[: -len(file_ending)])
        if not m:
            errors.append(f"{path}: name must be <case>_XXXX{file_ending} (XXXX = 4-digit channel, e.g. _0000).")
            continue
        channels.setdefault(m.group(1), {})[int(m.group(2))] = path
    cases: dict[str, list[str]] = {}
    for case, chans in channels.items():
        missing = [c for c in range(num_channels) if c not in chans]
        extra = sorted(c for c in chans if c >= num_channels)
        if missing:
            errors.append(f"{folder}: case '{case}' lacks channel file(s) "
                          f"{', '.join(f'{case}_{c:04d}{file_ending}' for c in missing)} (dataset.json "
                          f"'channel_names' has {num_channels} channel(s)).")
            continue
        if extra:
            errors.append(f"{folder}: case '{case}' has channel file(s) "
                          f"{', '.join(f'{case}_{c:04d}{file_ending}' for c in extra)} beyond dataset.json "
                          f"'channel_names' ({num_channels} channel(s)). Remove them or add the channels.")
            continue
        cases[case] = [chans[c] for c in range(num_channels)]
    return cases, errors


def dataset_json_problems(dj, path: str = "dataset.json") -> list[str]:
    """What nnU-Net v2 needs of `dataset.json` and the checks here rely on: key presence and types."""
    if not isinstance(dj, dict):
        return [f"{path}: expected a JSON object, got {type(dj).__name__}."]
    errors = [f"{path} has no '{key}' (nnU-Net v2 needs channel_names, labels, numTraining, file_ending)."
              for key in ("channel_names", "labels", "file_ending") if key not in dj]
    if errors:
        return errors
    if not isinstance(dj["channel_names"], dict) or not dj["channel_names"]:
        errors.append(f"{path}: 'channel_names' must be a non-empty object such as {{\"0\": \"MRI\"}}.")
    labels = dj["labels"]
    if not isinstance(labels, dict) or not labels:
        errors.append(f"{path}: 'labels' must be a non-empty object such as {{\"background\": 0, \"LV\": 1}}.")
    else:
        bad = [k for k, v in labels.items() if not all(isinstance(x, int) and not isinstance(x, bool)
                                                        for x in (v if isinstance(v, (list, tuple)) else [v]))]
        if bad:
            errors.append(f"{path}: label(s) {bad} must map to integers (or lists of integers for regions).")
    if not isinstance(dj["file_ending"], str) or not dj["file_ending"].startswith("."):
        errors.append(f"{path}: 'file_ending' must be a string such as \".nii.gz\", got {dj['file_ending']!r}.")
    n = dj.get("numTraining")
    if n is not None and (not isinstance(n, int) or isinstance(n, bool)):
        errors.append(f"{path}: 'numTraining' must be an integer, got {n!r}.")
    return errors


def load_raw_dataset_json(raw_folder: str) -> dict:
    path = os.path.join(raw_folder, "dataset.json")
    if not os.path.isfile(path):
        raise MetadataError(f"{path} is missing: not an nnU-Net raw dataset folder.")
    dj = read_json(path, MetadataError)
    errors = dataset_json_problems(dj, path)
    if errors:
        raise MetadataError("\n".join(errors))
    return dj


def unlabeled_cases(raw_folder: str, dataset_json: dict | None = None) -> dict[str, list[str]]:
    """case -> channel files of `imagesUnlabeled/` ({} when the folder is absent); MetadataError on bad names."""
    dj = dataset_json if dataset_json is not None else load_raw_dataset_json(raw_folder)
    folder = os.path.join(raw_folder, UNLABELED_FOLDER)
    if not os.path.isdir(folder):
        return {}
    cases, errors = list_image_cases(folder, dj["file_ending"], len(dj["channel_names"]))
    if errors:
        raise MetadataError("\n".join(errors))
    return cases


def image_problems(labeled: dict[str, list[str]], unlabeled: dict[str, list[str]], labels_folder: str,
                   dataset_json: dict) -> list[str]:
    """Every image problem of the labeled cases (with their labels) and the unlabeled cases."""
    allowed = declared_label_values(dataset_json["labels"])
    ending = dataset_json["file_ending"]
    errors = []
    for case in sorted(labeled):
        label = os.path.join(labels_folder, case + ending)
        errors += case_problems(labeled[case], label if os.path.isfile(label) else None, allowed)
    for case in sorted(unlabeled):
        errors += case_problems(unlabeled[case])
    return errors


def check_dataset(raw_folder: str, images: bool = True) -> CheckReport:
    """Validate cases and metadata of `nnUNet_raw/DatasetXXX_Name` (see the module docstring). `images=False` skips
    reading the image files (names and metadata only)."""
    report = CheckReport(raw_folder=raw_folder)
    if not os.path.isdir(raw_folder):
        report.errors.append(f"{raw_folder} does not exist.")
        return report
    try:
        dj = load_raw_dataset_json(raw_folder)
    except MetadataError as e:
        report.errors.append(str(e))
        return report
    ending, n_ch = dj["file_ending"], len(dj["channel_names"])

    images_tr = os.path.join(raw_folder, "imagesTr")
    labeled: dict[str, list[str]] = {}
    if not os.path.isdir(images_tr):
        report.errors.append(f"{images_tr} does not exist: nnU-Net needs labeled training cases.")
    else:
        labeled, errs = list_image_cases(images_tr, ending, n_ch)
        report.errors += errs
        labels_tr = os.path.join(raw_folder, "labelsTr")
        for case in sorted(labeled):
            if not os.path.isfile(os.path.join(labels_tr, case + ending)):
                report.errors.append(f"labeled case '{case}' (imagesTr) has no label "
                                     f"{os.path.join(labels_tr, case + ending)}. Add it, or move the case's images "
                                     f"to {UNLABELED_FOLDER}/.")
        if os.path.isdir(labels_tr):
            for name in sorted(os.listdir(labels_tr)):
                if name.endswith(ending) and not name.startswith(".") and name[: -len(ending)] not in labeled:
                    report.errors.append(f"label {os.path.join(labels_tr, name)} has no image in imagesTr.")
        if dj.get("numTraining") is not None and dj["numTraining"] != len(labeled):
            report.errors.append(f"dataset.json numTraining is {dj['numTraining']} but imagesTr holds {len(labeled)} "
                                 f"cases. Set numTraining to {len(labeled)}.")
    unlabeled: dict[str, list[str]] = {}
    folder_u = os.path.join(raw_folder, UNLABELED_FOLDER)
    if os.path.isdir(folder_u):
        unlabeled, errs = list_image_cases(folder_u, ending, n_ch)
        report.errors += errs
    for case in sorted(set(labeled) & set(unlabeled)):
        report.errors.append(f"case '{case}' is in imagesTr and in {UNLABELED_FOLDER}: a case id must be unique. "
                             f"Rename or remove one.")
    report.labeled, report.unlabeled = sorted(labeled), sorted(unlabeled)
    if images:
        report.errors += image_problems(labeled, unlabeled, os.path.join(raw_folder, "labelsTr"), dj)

    try:
        table = read_metadata(raw_folder, dj)
    except UserInputError as e:
        report.errors.append(str(e))
        return report
    report.table = table
    report.errors += validate_against_cases(table, report.labeled, report.unlabeled)
    if DATASET_JSON_KEY not in dj:
        report.warnings.append(f"dataset.json has no '{DATASET_JSON_KEY}': every {METADATA_FILENAME} column is a "
                               f"meta-label ({table.columns or ['patient (= case id)']}).")
    unl = set(report.unlabeled)
    for col in table.available_meta_labels():
        values: dict[str, list[int]] = {}
        for case in table.cases:
            counts = values.setdefault(table.value(case, col), [0, 0])
            counts[1 if case in unl else 0] += 1
        order = table.encoding(col)  # sorted like the integer ids our trainers use
        report.counts[col] = {v: tuple(values[v]) for v in sorted(values, key=order.__getitem__)}
    return report
