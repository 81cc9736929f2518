"""Per-case metadata (meta-labels) of a raw nnU-Net dataset: the one definition of the format.

Format (documented in docs/data_format.md)
-----------------------------------------
`metadata.csv` in the raw dataset folder (`nnUNet_raw/DatasetXXX_Name/metadata.csv`), UTF-8 (a byte-order mark is
accepted), comma-separated, one header row, one row per case, labeled (`imagesTr/`) and unlabeled
(`imagesUnlabeled/`) alike::

    case,patient,phase
    patient001_frame01,patient001,ED
    patient001_frame12,patient001,ES

- `case` (required): the nnU-Net case identifier (image file name without `_0000` and file ending).
- `patient` (optional column): subject id. When the column is absent every case is its own patient.
- `phase` (optional column): e.g. `ED` / `ES`.
- any further column (site, scanner, ...) is a categorical meta-label.
- `dataset.json` may declare the meta-label columns: `"meta_labels": ["patient", "phase"]`. Without that key every
  column except `case` is a meta-label. Slice position is not a column: it comes from each slice's index
  (see `nnunet_contrastive.data.slices`).

Values are strings, non-empty, and of one type per column (all integers, all numbers or all text). Meta-label
values are encoded as integers by rank in the sorted unique values of the whole table, so ids are consistent across
the dataset, folds and processes.

Column names are case-sensitive. A column that differs from `case`, `patient` or `phase` only in case, separators
or a plural (`Patient`, `patient_id`, `Phases`) is an error: it would otherwise be ignored without a word (every
case its own patient). `nnunet-contrastive check` copies the raw table into the preprocessed dataset folder for the
trainers; reading that copy while the raw table differs from it is an error (the copy is stale: run the check again).
"""
from __future__ import annotations

import csv
import io
import os
import re
from dataclasses import dataclass

from nnunet_contrastive.data.files import atomic_copy, read_json, read_text
from nnunet_contrastive.errors import UserInputError

METADATA_FILENAME = "metadata.csv"
CASE_COLUMN = "case"
PATIENT_COLUMN = "patient"
PHASE_COLUMN = "phase"
DATASET_JSON_KEY = "meta_labels"
# names our samplers derive per slice; a table column must not shadow them
RESERVED_COLUMNS = ("position", "partition", "labeled", "slice")
# spellings that mean one of our columns: a column named like this is a mistake, not a new meta-label
NEAR_MISSES = {PATIENT_COLUMN: ("patientid", "patientname", "subject", "subjectid"), PHASE_COLUMN: ("cardiacphase",)}


class MetadataError(UserInputError):
    """Bad or missing metadata. The message names the file, case and column, and says how to fix it."""


@dataclass
class MetadataTable:
    """The parsed table: `rows[case][column] -> str`, columns in file order (without `case`)."""

    columns: list[str]
    rows: dict[str, dict[str, str]]
    source: str = "<memory>"
    meta_label_columns: list[str] | None = None  # None: every column

    @property
    def cases(self) -> list[str]:
        return list(self.rows)

    def value(self, case: str, column: str) -> str:
        """Meta-label value of a case. `patient` defaults to the case id when the table has no such column."""
        if case not in self.rows:
            raise MetadataError(f"{self.source}: case '{case}' has no row. Add a row for it (column '{CASE_COLUMN}').")
        if column == PATIENT_COLUMN and column not in self.columns:
            return case
        if column not in self.columns:
            raise MetadataError(f"{self.source}: there is no column '{column}' (columns: {self.columns}).")
        return self.rows[case][column]

    def available_meta_labels(self) -> list[str]:
        """Meta-labels this table provides (always includes `patient`, which defaults to the case id)."""
        cols = list(self.columns if self.meta_label_columns is None else self.meta_label_columns)
        if PATIENT_COLUMN not in cols:
            cols = [PATIENT_COLUMN] + cols
        return cols

    def encoding(self, column: str) -> dict[str, int]:
        """value -> integer id, by rank in the sorted unique values of the whole table (LabelEncoder convention)."""
        values = sorted({self.value(c, column) for c in self.rows}, key=_sort_key(self._column_type(column)))
        return {v: i for i, v in enumerate(values)}

    def encoded(self, column: str) -> dict[str, int]:
        """case -> integer id of its value in `column`."""
        enc = self.encoding(column)
        return {c: enc[self.value(c, column)] for c in self.rows}

    def _column_type(self, column: str) -> str:
        if column == PATIENT_COLUMN and column not in self.columns:
            return "text"
        return _infer_type([r[column] for r in self.rows.values()])

    def to_csv(self) -> str:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow([CASE_COLUMN] + self.columns)
        for case, row in self.rows.items():
            w.writerow([case] + [row[c] for c in self.columns])
        return buf.getvalue()


def _infer_type(values: list[str]) -> str:
    def is_int(v):
        try:
            int(v)
            return True
        except ValueError:
            return False

    def is_float(v):
        try:
            float(v)
            return True
        except ValueError:
            return False

    if all(is_int(v) for v in values):
        return "integer"
    if all(is_float(v) for v in values):
        return "number"
    return "text"


def _sort_key(kind: str):
    if kind == "integer":
        return int
    if kind == "number":
        return float
    return str


def write_metadata(path: str, rows: dict[str, dict[str, str]], columns: list[str] | None = None) -> str:
    """Write `rows[case][column]` as metadata.csv (`path` is the file or the raw dataset folder). Returns the file."""
    if os.path.isdir(path):
        path = os.path.join(path, METADATA_FILENAME)
    if columns is None:
        columns = []
        for r in rows.values():
            columns += [c for c in r if c not in columns]
    table = MetadataTable(columns=list(columns), rows={c: {k: str(r[k]) for k in columns} for c, r in rows.items()})
    with open(path, "w", encoding="utf-8", newline="") as f:
        f.write(table.to_csv())
    return path


def read_metadata(path: str, dataset_json: dict | None = None) -> MetadataTable:
    """Parse and check the table's own consistency (header, duplicates, empty values, one type per column).

    `path` is the CSV file or a dataset folder that contains it. Cross-checks against the dataset's cases are
    `validate_against_cases`.
    """
    if os.path.isdir(path):
        path = os.path.join(path, METADATA_FILENAME)
    if not os.path.isfile(path):
        raise MetadataError(
            f"No metadata table at {path}. Write a '{METADATA_FILENAME}' with a '{CASE_COLUMN}' column and one row "
            f"per case (docs/data_format.md), or generate one with a nnunet-contrastive converter.")
    refuse_stale_copy(path)
    reader = csv.reader(io.StringIO(read_text(path, MetadataError), newline=""))
    try:
        # blank lines are skipped everywhere (also before the header); line numbers stay the file's own
        lines = [(reader.line_num, row) for row in reader if any(cell.strip() for cell in row)]
    except csv.Error as e:
        raise MetadataError(f"line {reader.line_num}: not valid CSV ({e}).", where=path,
                            fix="Quote values that contain commas or quotes.") from None
    if not lines:
        raise MetadataError(f"{path}: the file is empty; it needs a header row starting with '{CASE_COLUMN}'.")
    header = [h.strip() for h in lines[0][1]]
    body = lines[1:]
    if not header or header[0] != CASE_COLUMN:
        hint = " (column names are case-sensitive)" if header and header[0].lower() == CASE_COLUMN else ""
        raise MetadataError(f"{path}: the first header column must be '{CASE_COLUMN}', got {header[:1]}{hint}.")
    columns = header[1:]
    near = near_miss_columns(columns)
    if near:
        c, ours = next(iter(near.items()))
        default = " and every case would count as its own patient" if ours == PATIENT_COLUMN else ""
        raise MetadataError(f"column '{c}' looks like '{ours}' but is not spelled exactly so (names are "
                            f"case-sensitive): it would not be read as '{ours}'{default}.", where=path,
                            fix=f"Rename it to '{ours}' (or, if it means something else, to a name that does not "
                                f"look like '{ours}').")
    for i, c in enumerate(columns):
        if not c:
            raise MetadataError(f"{path}: header column {i + 2} has no name.")
        if c in RESERVED_COLUMNS:
            raise MetadataError(f"{path}: column '{c}' is reserved (derived per slice: {RESERVED_COLUMNS}); rename it.")
        if columns.count(c) > 1:
            raise MetadataError(f"{path}: column '{c}' appears twice in the header.")
    rows: dict[str, dict[str, str]] = {}
    for line_no, raw in body:
        if len(raw) != len(header):
            raise MetadataError(f"{path}, line {line_no}: expected {len(header)} fields ({header}), got {len(raw)}. "
                                f"Give every row one value per header column (quote values that contain commas).")
        case = raw[0].strip()
        if not case:
            raise MetadataError(f"{path}, line {line_no}: empty '{CASE_COLUMN}'.")
        if case in rows:
            raise MetadataError(f"{path}, line {line_no}: case '{case}' appears twice. Keep one row per case.")
        values = {c: v.strip() for c, v in zip(columns, raw[1:])}
        for c, v in values.items():
            if not v:
                raise MetadataError(f"{path}: case '{case}' has an empty value in column '{c}'. Fill it in.")
        rows[case] = values
    for c in columns:
        kinds = {_infer_type([r[c]]) for r in rows.values()}
        if "text" in kinds and len(kinds) > 1:
            examples = {_infer_type([r[c]]): (case, r[c]) for case, r in rows.items()}
            raise MetadataError(
                f"{path}: column '{c}' mixes numbers and text (e.g. case '{examples['text'][0]}'='"
                f"{examples['text'][1]}'); use one type per column.")
    table = MetadataTable(columns=columns, rows=rows, source=path)
    table.meta_label_columns = declared_meta_labels(table, dataset_json, path)
    return table


def _normalised(name: str) -> str:
    return re.sub(r"[\s_\-]", "", name.lower())


def near_miss_columns(columns: list[str]) -> dict[str, str]:
    """column -> our column it was probably meant to be (`Patient`, `patient_id`, `Phases`, ...).

    A near miss of a column that the table also has correctly is left alone (e.g. `patient` and `patient_id`)."""
    out = {}
    for ours in (CASE_COLUMN, PATIENT_COLUMN, PHASE_COLUMN):
        if ours in columns:
            continue
        spellings = {ours, ours + "s"} | set(NEAR_MISSES.get(ours, ()))
        for c in columns:
            if c != ours and _normalised(c) in spellings:
                out[c] = ours
    return out


def refuse_stale_copy(path: str) -> None:
    """Raise if `path` is a copy in `$nnUNet_preprocessed/<dataset>/` of a table in `$nnUNet_raw/<dataset>/` that
    no longer has the same content (edited after `nnunet-contrastive check` copied it)."""
    pre_root, raw_root = os.environ.get("nnUNet_preprocessed"), os.environ.get("nnUNet_raw")
    if not pre_root or not raw_root:
        return
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.dirname(os.path.realpath(folder)) != os.path.realpath(pre_root):
        return
    dataset = os.path.basename(folder)
    raw = os.path.join(raw_root, dataset, os.path.basename(path))
    if not os.path.isfile(raw) or os.path.realpath(raw) == os.path.realpath(path):
        return
    with open(raw, "rb") as a, open(path, "rb") as b:
        if a.read() == b.read():
            return
    raise MetadataError(f"is a stale copy: {raw} has changed since 'nnunet-contrastive check' copied it here, and "
                        f"training or selecting labeled cases on the old table would use outdated meta-labels.",
                        where=path, fix=f"Run 'nnunet-contrastive check -d {dataset}': it validates the raw table "
                                        f"and copies it again.")


def declared_meta_labels(table: MetadataTable, dataset_json: dict | None, source: str = "dataset.json") -> list[str]:
    """The meta-label columns: `dataset.json["meta_labels"]` if present (each must exist), else all columns."""
    declared = (dataset_json or {}).get(DATASET_JSON_KEY)
    if declared is None:
        return list(table.columns)
    if not isinstance(declared, list) or not all(isinstance(d, str) for d in declared):
        raise MetadataError(f"dataset.json: '{DATASET_JSON_KEY}' must be a list of column names, got {declared!r}.")
    for d in declared:
        if d not in table.columns and d != PATIENT_COLUMN:
            raise MetadataError(
                f"dataset.json declares meta-label '{d}' but {source} has no such column (columns: {table.columns}).")
    return list(declared)


def validate_against_cases(table: MetadataTable, labeled: list[str], unlabeled: list[str] = ()) -> list[str]:
    """Every case has a row and every row names a known case. Returns error messages (empty list: all good)."""
    errors = []
    known = set(labeled) | set(unlabeled)
    for case in sorted(labeled):
        if case not in table.rows:
            errors.append(f"{table.source}: labeled case '{case}' (imagesTr) has no metadata row.")
    for case in sorted(unlabeled):
        if case not in table.rows:
            errors.append(f"{table.source}: unlabeled case '{case}' (imagesUnlabeled) has no metadata row.")
    for case in table.rows:
        if case not in known:
            errors.append(f"{table.source}: row '{case}' names no image in imagesTr or imagesUnlabeled "
                          f"(typo, or a removed image?). Remove the row or add the image.")
    return errors


def value_counts(table: MetadataTable) -> dict[str, dict[str, int]]:
    """column -> value -> number of cases (what `nnunet-contrastive check` prints)."""
    out = {}
    for col in table.available_meta_labels():
        counts: dict[str, int] = {}
        for case in table.rows:
            v = table.value(case, col)
            counts[v] = counts.get(v, 0) + 1
        out[col] = dict(sorted(counts.items(), key=lambda kv: _sort_key(table._column_type(col))(kv[0])))
    return out


def copy_metadata(src_folder: str, dst_folder: str) -> str | None:
    """Copy metadata.csv between dataset folders (raw -> preprocessed -> results). Returns the new path or None."""
    src = os.path.join(src_folder, METADATA_FILENAME)
    if not os.path.isfile(src):
        return None
    os.makedirs(dst_folder, exist_ok=True)
    return atomic_copy(src, os.path.join(dst_folder, METADATA_FILENAME))


def load_dataset_json(folder: str) -> dict:
    """`folder/dataset.json`; MetadataError naming the file when it is missing, not UTF-8 or not a JSON object."""
    path = os.path.join(folder, "dataset.json")
    if not os.path.isfile(path):
        raise MetadataError(f"{path} is missing: not an nnU-Net dataset folder (run nnUNetv2_plan_and_preprocess "
                            f"for a preprocessed one).")
    dj = read_json(path, MetadataError)
    if not isinstance(dj, dict):
        raise MetadataError(f"{path}: expected a JSON object, got {type(dj).__name__}.")
    return dj
