"""Convert public dataset layouts to the nnU-Net v2 raw format, with per-case metadata (docs/data_format.md).

- `convert_msd`: Medical Segmentation Decathlon (`imagesTr/`, `labelsTr/`, optional `imagesTs/`, `dataset.json` with
  `modality` and `labels`; one file per case, multi-modal cases as one 4D file). MSD has one volume per subject, so
  the metadata is `patient = case id`.
- `convert_acdc`: ACDC (`.../patientXXX/patientXXX_frameYY[_gt].nii.gz` + `Info.cfg` with `ED:` / `ES:`). The ED and
  ES frames become cases `patientXXX_frameYY` with metadata `patient`, `phase` (and `group` when every patient's
  Info.cfg has `Group:`). Frames with a `_gt` file are labeled (imagesTr/labelsTr); frames without one are unlabeled
  (`imagesUnlabeled/`, our convention: nnU-Net ignores that folder).

Both work in two steps: `plan_*` reads the source and collects every problem it can find without writing anything
(`ConversionError` lists them all; every image and label is read completely and checked with
`nnunet_contrastive.prep.image_check`: truncated files, channel counts, image/label grids, label values), then `write_dataset` writes into a temporary sibling folder that is renamed to
`nnUNet_raw/DatasetXXX_NAME` only when everything succeeded, so a failed conversion leaves nothing half-written.
Image files are copied by default (`link=True` hard-links them when on the same file system: saves space, but an in-place edit of the raw dataset then changes the source); multi-modal 4D images are split into
one file per channel (`_0000`, `_0001`, ...) with SimpleITK, keeping the 3D geometry.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass, field

from nnunet_contrastive.data.files import read_json, read_text, replaced_folder
from nnunet_contrastive.data.metadata import DATASET_JSON_KEY, METADATA_FILENAME, PATIENT_COLUMN, PHASE_COLUMN, \
    write_metadata
from nnunet_contrastive.errors import UserInputError
from nnunet_contrastive.prep.image_check import case_problems

NIFTI_ENDINGS = (".nii.gz", ".nii")
ACDC_LABELS = {"background": 0, "RV": 1, "MYO": 2, "LV": 3}
ACDC_PHASES = ("ED", "ES")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
_PATIENT_DIR_RE = re.compile(r"^patient\d+$")


class ConversionError(UserInputError):
    """The source folder cannot be converted. The message names every offending file and says how to fix it."""


@dataclass
class CaseSource:
    """One case to write. `image` is one file per case; `num_channels` > 1 means a 4D file to split."""

    case: str
    image: str
    split: str  # "Tr", "Ts" or "Unlabeled"
    label: str | None = None
    num_channels: int = 1
    meta: dict[str, str] = field(default_factory=dict)


@dataclass
class ConversionPlan:
    cases: list[CaseSource]
    dataset_json: dict  # without numTraining (filled in from the cases)
    meta_columns: list[str]
    file_ending: str
    source: str
    notes: list[str] = field(default_factory=list)

    def split(self, split: str) -> list[CaseSource]:
        return [c for c in self.cases if c.split == split]


@dataclass
class ConversionResult:
    folder: str
    num_labeled: int
    num_test: int
    num_unlabeled: int
    linked: int
    copied: int
    written: int  # split channel files
    notes: list[str]


# ------------------------------------------------------------------------------------------------ helpers
def _is_junk(name: str) -> bool:
    """macOS resource forks (`._x.nii.gz`), `.DS_Store` and other hidden files."""
    return name.startswith(".")


def _split_ending(name: str) -> tuple[str, str] | None:
    for ending in NIFTI_ENDINGS:
        if name.endswith(ending) and len(name) > len(ending):
            return name[: -len(ending)], ending
    return None


def _list_nifti(folder: str) -> tuple[dict[str, list[str]], dict[str, str], list[str]]:
    """case -> [files] (more than one = duplicate case id), file -> ending, ignored non-NIfTI names."""
    by_case: dict[str, list[str]] = {}
    endings: dict[str, str] = {}
    ignored = []
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if _is_junk(name) or not os.path.isfile(path):
            continue
        parts = _split_ending(name)
        if parts is None:
            ignored.append(name)
            continue
        by_case.setdefault(parts[0], []).append(path)
        endings[path] = parts[1]
    return by_case, endings, ignored


def _errors(errors: list[str], source: str) -> None:
    if errors:
        shown = errors[:30]
        more = f"\n  ... and {len(errors) - len(shown)} more" if len(errors) > len(shown) else ""
        raise ConversionError(f"cannot convert {source}:\n  " + "\n  ".join(shown) + more)


def validate_target(raw_root: str, dataset_id: int, name: str, overwrite: bool = False) -> str:
    """`raw_root/DatasetXXX_NAME`, after checking the id, the name and that nothing is in the way."""
    if isinstance(dataset_id, bool) or not isinstance(dataset_id, int) or not 1 <= dataset_id <= 999:
        raise ConversionError(f"dataset id must be an integer from 1 to 999 (nnU-Net's DatasetXXX), "
                              f"got {dataset_id!r}.")
    if not name or not _NAME_RE.match(name):
        raise ConversionError(f"dataset name '{name}' is not usable: use letters, digits, '_', '-' or '.' "
                              f"(pass --name NAME).")
    if not raw_root:
        raise ConversionError("nnUNet_raw is not set: export nnUNet_raw=/path/to/nnUNet_raw (see nnU-Net's "
                              "setting_up_paths.md).")
    target = os.path.join(raw_root, f"Dataset{dataset_id:03d}_{name}")
    if os.path.isdir(raw_root):
        prefix = f"Dataset{dataset_id:03d}_"
        others = sorted(d for d in os.listdir(raw_root)
                        if d.startswith(prefix) and d != os.path.basename(target) and not _is_junk(d))
        if others:
            raise ConversionError(f"dataset id {dataset_id} is already used by {os.path.join(raw_root, others[0])}: "
                                  f"nnU-Net needs unique ids. Pick another -d or remove that folder.")
    if os.path.lexists(target) and not overwrite:
        raise ConversionError(f"{target} already exists. Pass --overwrite to replace it, or pick another -d/--name.")
    return target


def _place(src: str, dst: str, mode: str) -> str:
    """Hard-link (mode 'link', falling back to a copy) or copy `src` to `dst`. Returns 'linked' or 'copied'."""
    if mode == "link":
        try:
            os.link(src, dst)
            return "linked"
        except OSError:
            pass
    shutil.copyfile(src, dst)
    return "copied"


def _split_channels(src: str, dsts: list[str]) -> None:
    """Write channel c of the 4D image `src` (x, y, z, c) as the 3D image `dsts[c]` (same 3D geometry)."""
    import SimpleITK as sitk

    try:
        img = sitk.ReadImage(src)
    except RuntimeError as e:
        raise ConversionError(f"{src}: cannot be read as an image ({str(e).strip().splitlines()[-1]}).") from None
    n = len(dsts)
    if img.GetDimension() != 4 or img.GetSize()[3] != n:
        raise ConversionError(
            f"{src}: expected a 4D image with {n} channels (dataset.json 'modality' lists {n}), got size "
            f"{img.GetSize()}. Fix 'modality' or the image.")
    size = list(img.GetSize())
    for c, dst in enumerate(dsts):
        channel = sitk.Extract(img, size[:3] + [0], [0, 0, 0, c])  # size 0 collapses the channel axis
        sitk.WriteImage(channel, dst, useCompression=True)


# ------------------------------------------------------------------------------------------------ writing
def write_dataset(plan: ConversionPlan, raw_root: str, dataset_id: int, name: str, overwrite: bool = False,
                  link: bool = False, log=None) -> ConversionResult:
    """Write a plan as `raw_root/DatasetXXX_NAME` (atomically: temporary folder, renamed at the end)."""
    target = validate_target(raw_root, dataset_id, name, overwrite)
    os.makedirs(raw_root, exist_ok=True)
    ending = plan.file_ending
    counts = {"linked": 0, "copied": 0, "written": 0}
    with replaced_folder(target) as tmp:  # an existing target (overwrite=True) is replaced only on success
        for split in ("Tr", "Ts", "Unlabeled"):
            cases = plan.split(split)
            if not cases:
                continue
            img_dir = os.path.join(tmp, f"images{split}")
            os.makedirs(img_dir)
            if any(c.label for c in cases):
                os.makedirs(os.path.join(tmp, f"labels{split}"))
            for i, c in enumerate(cases):
                if log and i % 50 == 0:
                    log(f"  images{split}: {i}/{len(cases)}")
                dsts = [os.path.join(img_dir, f"{c.case}_{ch:04d}{ending}") for ch in range(c.num_channels)]
                if c.num_channels == 1:
                    counts[_place(c.image, dsts[0], "link" if link else "copy")] += 1
                else:
                    _split_channels(c.image, dsts)
                    counts["written"] += len(dsts)
                if c.label:
                    counts[_place(c.label, os.path.join(tmp, f"labels{split}", f"{c.case}{ending}"),
                                  "link" if link else "copy")] += 1
        dataset_json = dict(plan.dataset_json)
        dataset_json["numTraining"] = len(plan.split("Tr"))
        dataset_json["file_ending"] = ending
        with open(os.path.join(tmp, "dataset.json"), "w", encoding="utf-8") as f:
            json.dump(dataset_json, f, indent=2)
            f.write("\n")
        meta = {c.case: c.meta for c in plan.cases if c.split in ("Tr", "Unlabeled")}
        write_metadata(os.path.join(tmp, METADATA_FILENAME), meta, plan.meta_columns)
        meta_ts = {c.case: c.meta for c in plan.split("Ts")}
        if meta_ts:
            write_metadata(os.path.join(tmp, "metadata_Ts.csv"), meta_ts, plan.meta_columns)
    return ConversionResult(folder=target, num_labeled=len(plan.split("Tr")), num_test=len(plan.split("Ts")),
                            num_unlabeled=len(plan.split("Unlabeled")), linked=counts["linked"],
                            copied=counts["copied"], written=counts["written"], notes=list(plan.notes))


# ------------------------------------------------------------------------------------------------ MSD
def default_msd_name(src: str) -> str:
    """`Task04_Hippocampus` -> `Hippocampus`; other folder names are kept."""
    base = os.path.basename(os.path.normpath(src))
    m = re.match(r"^Task\d+_(.+)$", base)
    return m.group(1) if m else base


def plan_msd(src: str) -> ConversionPlan:
    """Read an MSD task folder; raise ConversionError listing every problem found."""
    src = os.path.abspath(src)
    if not os.path.isdir(src):
        raise ConversionError(f"{src} is not a folder (expected an MSD task folder such as Task04_Hippocampus).")
    dj_path = os.path.join(src, "dataset.json")
    for required in ("imagesTr", "labelsTr"):
        if not os.path.isdir(os.path.join(src, required)):
            raise ConversionError(f"{src} has no '{required}/' folder: not a Medical Segmentation Decathlon layout "
                                  f"(imagesTr/, labelsTr/, dataset.json).")
    if not os.path.isfile(dj_path):
        raise ConversionError(f"{dj_path} is missing: MSD's dataset.json provides 'modality' and 'labels'.")
    msd = read_json(dj_path, ConversionError)
    if not isinstance(msd, dict):
        raise ConversionError(f"{dj_path}: expected a JSON object.")
    if "channel_names" in msd and "modality" not in msd:
        raise ConversionError(f"{dj_path} has 'channel_names': this already is an nnU-Net v2 dataset, not MSD. "
                              f"Copy it to nnUNet_raw as it is.")
    errors: list[str] = []

    # channels
    modality = msd.get("modality")
    channel_names: dict[str, str] = {}
    if not isinstance(modality, dict) or not modality:
        errors.append(f"{dj_path}: 'modality' must be a non-empty object such as {{\"0\": \"MRI\"}}, got {modality!r}.")
    else:
        try:
            idx = sorted(int(k) for k in modality)
        except (TypeError, ValueError):
            idx = None
        if idx != list(range(len(modality))):
            errors.append(f"{dj_path}: 'modality' keys must be 0, 1, ..., got {sorted(modality)}.")
        else:
            by_int = {int(k): str(v) for k, v in modality.items()}
            channel_names = {str(i): by_int[i] for i in idx}
    # labels: MSD maps value-string -> name, nnU-Net v2 maps name -> int with 'background' = 0
    labels_in = msd.get("labels")
    labels: dict[str, int] = {}
    if not isinstance(labels_in, dict) or not labels_in:
        errors.append(f"{dj_path}: 'labels' must be a non-empty object such as {{\"0\": \"background\", \"1\": ...}}.")
    else:
        for value, lname in labels_in.items():
            try:
                v = int(value)
            except (TypeError, ValueError):
                errors.append(f"{dj_path}: label key '{value}' is not an integer (MSD maps value -> name).")
                continue
            lname = "background" if v == 0 else str(lname)
            if lname in labels:
                errors.append(f"{dj_path}: label name '{lname}' is used for values {labels[lname]} and {v}; "
                              f"nnU-Net needs one name per value. Rename one of them.")
                continue
            labels[lname] = v
        labels.setdefault("background", 0)
        if labels["background"] != 0:
            errors.append(f"{dj_path}: 'background' must be label 0.")
        labels = dict(sorted(labels.items(), key=lambda kv: kv[1]))

    # files
    tr, tr_end, tr_ignored = _list_nifti(os.path.join(src, "imagesTr"))
    lb, lb_end, _ = _list_nifti(os.path.join(src, "labelsTr"))
    ts_dir = os.path.join(src, "imagesTs")
    ts, ts_end, _ = _list_nifti(ts_dir) if os.path.isdir(ts_dir) else ({}, {}, [])
    notes = []
    if tr_ignored:
        notes.append(f"ignored {len(tr_ignored)} non-NIfTI file(s) in imagesTr (e.g. {tr_ignored[0]})")
    if not tr:
        errors.append(f"{os.path.join(src, 'imagesTr')} contains no .nii.gz/.nii images.")
    stems = [c[:-5] for c in tr if re.search(r"_\d{4}$", c)]
    if tr and len(stems) == len(tr) and (all(c.endswith("_0000") for c in tr) or len(set(stems)) < len(stems)):
        errors.append(f"{os.path.join(src, 'imagesTr')}: every image name ends in _XXXX (e.g. {next(iter(tr))}): "
                      f"this looks like an nnU-Net raw dataset already, not MSD (one file per case, no channel "
                      f"suffix).")
    for group in (tr, lb, ts):
        for case, files in group.items():
            if len(files) > 1:
                errors.append(f"duplicate case id '{case}': {', '.join(files)}. Keep one file per case.")
    for case in sorted(set(tr) & set(ts)):
        errors.append(f"duplicate case id '{case}' in imagesTr and imagesTs ({tr[case][0]}, {ts[case][0]}). Rename "
                      f"or remove one.")
    for case in sorted(tr):
        if case not in lb:
            errors.append(f"image {tr[case][0]} has no label: expected labelsTr/{case}"
                          f"{tr_end[tr[case][0]]}. Add the label, or remove the image (after conversion, unlabeled "
                          f"images go to imagesUnlabeled/).")
    for case in sorted(lb):
        if case not in tr:
            errors.append(f"label {lb[case][0]} has no image imagesTr/{case}.nii.gz. Remove it or add the image.")
    all_endings = set(tr_end.values()) | set(lb_end.values()) | set(ts_end.values())
    if len(all_endings) > 1:
        errors.append(f"{src}: mixed file endings {sorted(all_endings)}; nnU-Net needs one file_ending per dataset. "
                      f"Convert the files to one format (e.g. gzip the .nii files).")
    _errors(errors, src)

    n_ch = len(channel_names)
    cases = [CaseSource(case=c, image=tr[c][0], label=lb[c][0], split="Tr", num_channels=n_ch,
                        meta={PATIENT_COLUMN: c}) for c in sorted(tr)]
    cases += [CaseSource(case=c, image=ts[c][0], split="Ts", num_channels=n_ch, meta={PATIENT_COLUMN: c})
              for c in sorted(ts)]
    allowed = set(labels.values())
    for c in cases:
        errors += case_problems([c.image], c.label, allowed, channels_per_file=n_ch,
                                context=f"{dj_path} 'modality'", label_context=f"{dj_path} 'labels'")
    _errors(errors, src)
    notes.append("MSD has one volume per subject: metadata 'patient' = case id")
    keep = {k: msd[k] for k in ("name", "description", "reference", "licence", "license", "release") if k in msd}
    dataset_json = {**keep, "channel_names": channel_names, "labels": labels,
                    "converted_from": f"Medical Segmentation Decathlon layout: {src}",
                    DATASET_JSON_KEY: [PATIENT_COLUMN]}
    return ConversionPlan(cases=cases, dataset_json=dataset_json, meta_columns=[PATIENT_COLUMN],
                          file_ending=all_endings.pop(), source=src, notes=notes)


def convert_msd(src: str, dataset_id: int, name: str | None = None, raw_root: str | None = None,
                overwrite: bool = False, link: bool = False, log=None) -> ConversionResult:
    """MSD task folder -> `nnUNet_raw/DatasetXXX_NAME` (NAME defaults to the folder name without `TaskNN_`)."""
    name = name or default_msd_name(src)
    raw_root = raw_root if raw_root is not None else os.environ.get("nnUNet_raw", "")
    validate_target(raw_root, dataset_id, name, overwrite)  # fail fast, before reading the source
    return write_dataset(plan_msd(src), raw_root, dataset_id, name, overwrite, link, log)


# ------------------------------------------------------------------------------------------------ ACDC
def read_info_cfg(path: str) -> dict[str, str]:
    """ACDC `Info.cfg` (`Key: value` lines) as a dict; ConversionError naming the file if unreadable."""
    if not os.path.isfile(path):
        raise ConversionError(f"{path} is missing: every ACDC patient folder needs an Info.cfg with 'ED: <frame>' and "
                              f"'ES: <frame>' lines.")
    text = read_text(path, ConversionError)  # UTF-8; a byte-order mark is accepted
    fields = {}
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if ":" not in line:
            raise ConversionError(f"{path}, line {line_no}: expected 'Key: value', got {line.strip()[:60]!r}.")
        key, value = line.split(":", 1)
        fields[key.strip()] = value.strip()
    return fields


def _frame_number(info: dict[str, str], key: str, path: str) -> int:
    if key not in info or not info[key]:
        raise ConversionError(f"{path} has no '{key}:' line (found keys: {sorted(info)}). Add '{key}: <frame number>'.")
    try:
        frame = int(info[key])
    except ValueError:
        raise ConversionError(f"{path}: '{key}: {info[key]}' is not a frame number.") from None
    if frame < 1:
        raise ConversionError(f"{path}: '{key}: {frame}' must be a frame number >= 1.")
    return frame


def find_acdc_patients(src: str) -> dict[str, list[str]]:
    """patient name -> folders named like it (more than one = duplicate), anywhere below `src`."""
    found: dict[str, list[str]] = {}
    for dirpath, dirnames, _ in os.walk(src):
        dirnames[:] = sorted(d for d in dirnames if not _is_junk(d))
        for d in dirnames:
            if _PATIENT_DIR_RE.match(d):
                found.setdefault(d, []).append(os.path.join(dirpath, d))
    return found


def plan_acdc(src: str) -> ConversionPlan:
    """Read an ACDC folder (training/ and testing/ alike); raise ConversionError listing every problem found."""
    src = os.path.abspath(src)
    if not os.path.isdir(src):
        raise ConversionError(f"{src} is not a folder (expected the ACDC folder with patientXXX/ subfolders).")
    patients = find_acdc_patients(src)
    if not patients:
        raise ConversionError(f"{src}: no patientXXX folders found below it (ACDC layout: "
                              f".../patientXXX/patientXXX_frameYY.nii.gz and Info.cfg).")
    errors: list[str] = []
    cases: list[CaseSource] = []
    groups: dict[str, str | None] = {}
    for patient in sorted(patients):
        folders = patients[patient]
        if len(folders) > 1:
            errors.append(f"duplicate case ids: patient '{patient}' appears in {len(folders)} folders "
                          f"({', '.join(folders)}). Keep one.")
            continue
        folder = folders[0]
        cfg = os.path.join(folder, "Info.cfg")
        try:
            info = read_info_cfg(cfg)
            frames = {phase: _frame_number(info, phase, cfg) for phase in ACDC_PHASES}
        except ConversionError as e:
            errors.append(str(e))
            continue
        if frames["ED"] == frames["ES"]:
            errors.append(f"{cfg}: ED and ES are both frame {frames['ED']}, which would give duplicate case ids "
                          f"'{patient}_frame{frames['ED']:02d}'. Fix the frame numbers.")
            continue
        groups[patient] = info.get("Group") or None
        for phase in ACDC_PHASES:
            case = f"{patient}_frame{frames[phase]:02d}"
            image = os.path.join(folder, f"{case}.nii.gz")
            gt = os.path.join(folder, f"{case}_gt.nii.gz")
            if not os.path.isfile(image):
                present = sorted(n for n in os.listdir(folder) if "_frame" in n and not _is_junk(n))
                errors.append(f"{phase} frame file {image} is missing (Info.cfg says {phase}: {frames[phase]}; "
                              f"frame files present: {present or 'none'}).")
                continue
            cases.append(CaseSource(case=case, image=image, label=gt if os.path.isfile(gt) else None,
                                    split="Tr" if os.path.isfile(gt) else "Unlabeled",
                                    meta={PATIENT_COLUMN: patient, PHASE_COLUMN: phase}))
    for c in cases:
        errors += case_problems([c.image], c.label, set(ACDC_LABELS.values()), context="ACDC (one cine MRI channel)",
                                label_context="ACDC (0 background, 1 RV, 2 MYO, 3 LV)")
    _errors(errors, src)
    notes = []
    columns = [PATIENT_COLUMN, PHASE_COLUMN]
    if groups and all(groups.values()):
        columns.append("group")
        for c in cases:
            c.meta["group"] = groups[c.meta[PATIENT_COLUMN]]
        notes.append("metadata column 'group' (Info.cfg 'Group') written; it is not declared in dataset.json "
                     "'meta_labels': add it there to use it as a meta-label")
    elif any(groups.values()):
        missing = sorted(p for p, g in groups.items() if not g)
        notes.append(f"Info.cfg 'Group' is missing for {len(missing)} patient(s) (e.g. {missing[0]}): no 'group' "
                     f"column written")
    labeled = [c for c in cases if c.split == "Tr"]
    if not labeled:
        _errors([f"no ED/ES frame has a ground truth file (patientXXX_frameYY_gt.nii.gz): nnU-Net needs labeled "
                 f"training cases."], src)
    dataset_json = {
        "name": "ACDC",
        "description": "Automated Cardiac Diagnosis Challenge, ED and ES frames (converted by nnunet-contrastive).",
        "reference": "Bernard et al., IEEE TMI 2018",
        "channel_names": {"0": "cineMRI"},
        "labels": dict(ACDC_LABELS),
        "converted_from": f"ACDC layout: {src}",
        DATASET_JSON_KEY: [PATIENT_COLUMN, PHASE_COLUMN],
    }
    n_unl = len(cases) - len(labeled)
    if n_unl:
        notes.append(f"{n_unl} frame(s) without ground truth written to imagesUnlabeled/ (ignored by nnU-Net; "
                     f"preprocess them with 'nnunet-contrastive preprocess-unlabeled')")
    return ConversionPlan(cases=cases, dataset_json=dataset_json, meta_columns=columns, file_ending=".nii.gz",
                          source=src, notes=notes)


def convert_acdc(src: str, dataset_id: int, name: str = "ACDC", raw_root: str | None = None,
                 overwrite: bool = False, link: bool = False, log=None) -> ConversionResult:
    """ACDC folder -> `nnUNet_raw/DatasetXXX_NAME` (ED and ES frames; frames without gt go to imagesUnlabeled/)."""
    raw_root = raw_root if raw_root is not None else os.environ.get("nnUNet_raw", "")
    validate_target(raw_root, dataset_id, name or "ACDC", overwrite)
    return write_dataset(plan_acdc(src), raw_root, dataset_id, name or "ACDC", overwrite, link, log)
