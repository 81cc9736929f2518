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

`check_dataset(raw_folder)` never raises for problems of the dataset: it returns a `CheckReport` whose `errors` name
the file, case and column and say how to fix it (`report.raise_for_errors()` turns them into one `MetadataError`).
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field

from nnunet_contrastive.data.metadata import (DATASET_JSON_KEY, METADATA_FILENAME, MetadataError, MetadataTable,
                                         read_metadata, validate_against_cases)

UNLABELED_FOLDER = "imagesUnlabeled"
_CHANNEL_RE = re.compile(r"^(.+)_(\d{4})$")


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
            raise MetadataError(f"{self.raw_folder}: {len(self.errors)} problem(s):\n  " + "\n  ".join(self.errors))

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


def load_raw_dataset_json(raw_folder: str) -> dict:
    path = os.path.join(raw_folder, "dataset.json")
    if not os.path.isfile(path):
        raise MetadataError(f"{path} is missing: not an nnU-Net raw dataset folder.")
    try:
        with open(path, encoding="utf-8") as f:
            dj = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MetadataError(f"{path} cannot be read as JSON ({e}).") from None
    for key in ("channel_names", "labels", "file_ending"):
        if key not in dj:
            raise MetadataError(f"{path} has no '{key}' (nnU-Net v2 needs channel_names, labels, numTraining, "
                                f"file_ending).")
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


def check_dataset(raw_folder: str) -> CheckReport:
    """Validate cases and metadata of `nnUNet_raw/DatasetXXX_Name` (see the module docstring)."""
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

    try:
        table = read_metadata(raw_folder, dj)
    except MetadataError as e:
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
