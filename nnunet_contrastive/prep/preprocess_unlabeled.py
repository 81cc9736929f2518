"""Preprocess truly unlabeled images (`imagesUnlabeled/`) with a dataset's own nnU-Net plans.

nnU-Net never reads `imagesUnlabeled/`. This module runs nnU-Net's own preprocessor (the configuration's
`preprocessor_class`, normally `DefaultPreprocessor`) on those images with the dataset's plans, so they get exactly
the transpose, crop to nonzero, normalisation and resampling of the labeled cases, and saves them with nnU-Net's
dataset class (`nnUNetDatasetBlosc2.save_case`, blosc2 chunking as nnU-Net computes it) into a sibling of the
configuration folder::

    nnUNet_preprocessed/DatasetXXX_Name/nnUNetPlans_2d/             <- nnU-Net (labeled cases)
    nnUNet_preprocessed/DatasetXXX_Name/nnUNetPlans_2d_unlabeled/   <- this module

Each case has the files nnU-Net writes for a labeled case (`<case>.b2nd`, `<case>_seg.b2nd`, `<case>.pkl`), so
`nnUNetDatasetBlosc2(folder)` and `nnUNetDataLoader` load them unchanged.

The seg file is not a label. It is what nnU-Net's preprocessor returns for an image without a label file: -1 outside
the image's nonzero region (nnU-Net's "outside" value), 0 inside. We keep that instead of an all -1 array because
nnU-Net's training transforms read it as the nonzero mask (`MaskImageTransform` zeroes the image where seg < 0 when
`use_mask_for_norm` is set): an all -1 seg would blank the image of such datasets. It carries no annotation and must
never be used as a target (nnU-Net's transforms turn -1 into 0 = background anyway). `properties['unlabeled']` is
True, and `properties['class_locations']` has the keys nnU-Net would write, each with no locations, so foreground
oversampling falls back to random patches (and datasets with an ignore label find their key).

Before anything is written, every unlabeled image is read completely and checked (`nnunet_contrastive.prep.
image_check`: a truncated file is an error, not a case with missing slices), and no unlabeled case id may also be a
labeled case (imagesTr, or the configuration's preprocessed folder): it would put a validation case into the
training pool. The output is written into a temporary folder that replaces the previous output only when every case
succeeded, so a failed run leaves the previous output byte-identical.
"""
from __future__ import annotations

import multiprocessing
import os
from dataclasses import dataclass

from nnunet_contrastive.data.files import read_json, replaced_folder
from nnunet_contrastive.errors import UserInputError
from nnunet_contrastive.prep.dataset_check import (UNLABELED_FOLDER, list_image_cases, load_raw_dataset_json,
                                                   unlabeled_cases)
from nnunet_contrastive.prep.image_check import case_problems

UNLABELED_SUFFIX = "_unlabeled"


class UnlabeledPreprocessError(UserInputError):
    """Missing plans, configuration or images; the message says what to run or fix."""


@dataclass
class UnlabeledResult:
    folder: str
    cases: list[str]
    data_identifier: str


def unlabeled_folder(preprocessed_dataset_folder: str, data_identifier: str) -> str:
    """`<preprocessed>/<data_identifier>_unlabeled`, e.g. `.../Dataset990_X/nnUNetPlans_2d_unlabeled`."""
    return os.path.join(preprocessed_dataset_folder, data_identifier + UNLABELED_SUFFIX)


def empty_class_locations(plans_manager, dataset_json: dict) -> dict:
    """The `class_locations` keys nnU-Net's preprocessor would write, each without any location."""
    lm = plans_manager.get_label_manager(dataset_json)
    keys = list(lm.foreground_regions if lm.has_regions else lm.foreground_labels)
    if lm.has_ignore_label:
        keys.append([-1] + lm.all_labels)
    return {tuple(k) if isinstance(k, (list, tuple)) else int(k): [] for k in keys}


def preprocess_case(image_files: list[str], output_filename_truncated: str, plans_manager, configuration_manager,
                    dataset_json: dict, dataset_class=None) -> tuple:
    """Preprocess one unlabeled case like nnU-Net preprocesses a labeled one and save it. Returns the data shape."""
    import numpy as np
    from nnunetv2.training.dataloading.nnunet_dataset import comp_blosc2_params, nnUNetDatasetBlosc2

    dataset_class = dataset_class or nnUNetDatasetBlosc2
    preprocessor = configuration_manager.preprocessor_class(verbose=False)
    data, seg, properties = preprocessor.run_case(list(image_files), None, plans_manager, configuration_manager,
                                                  dataset_json)
    properties["class_locations"] = empty_class_locations(plans_manager, dataset_json)
    properties["unlabeled"] = True
    data = data.astype(np.float32, copy=False)
    seg = seg.astype(np.int16, copy=False)  # nonzero mask: -1 outside, 0 inside (see the module docstring)
    if dataset_class is nnUNetDatasetBlosc2:
        patch = tuple(configuration_manager.patch_size)
        blocks, chunks = comp_blosc2_params(data.shape, patch, data.itemsize)
        blocks_seg, chunks_seg = comp_blosc2_params(seg.shape, patch, seg.itemsize)
        nnUNetDatasetBlosc2.save_case(data, seg, properties, output_filename_truncated, chunks=chunks, blocks=blocks,
                                      chunks_seg=chunks_seg, blocks_seg=blocks_seg)
    else:
        dataset_class.save_case(data, seg, properties, output_filename_truncated)
    return data.shape


def _preprocess_named(files, out, plans_manager, configuration_manager, dataset_json, dataset_class) -> tuple:
    """`preprocess_case`; an unexpected failure names the case (its traceback is kept as the cause)."""
    try:
        return preprocess_case(files, out, plans_manager, configuration_manager, dataset_json, dataset_class)
    except Exception as e:
        raise RuntimeError(f"preprocessing unlabeled case '{os.path.basename(out)}' ({', '.join(files)}) failed: "
                           f"{e.__class__.__name__}: {e}") from e


def _worker(job):
    files, out, plans, configuration, dataset_json, dataset_class = job
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    pm = PlansManager(plans)
    return _preprocess_named(files, out, pm, pm.get_configuration(configuration), dataset_json, dataset_class)


def labeled_case_ids(raw_dataset_folder: str, labeled_preprocessed_folder: str, dataset_json: dict) -> set[str]:
    """Case ids of the labeled cases: `imagesTr/` of the raw dataset and the configuration's preprocessed folder."""
    ids = set()
    images_tr = os.path.join(raw_dataset_folder, "imagesTr")
    if os.path.isdir(images_tr):
        ids |= set(list_image_cases(images_tr, dataset_json["file_ending"], len(dataset_json["channel_names"]))[0])
    if os.path.isdir(labeled_preprocessed_folder):
        ids |= {f[:-4] for f in os.listdir(labeled_preprocessed_folder) if f.endswith(".pkl")}
    return ids


def unlabeled_input_problems(cases: dict[str, list[str]], labeled_ids: set[str]) -> list[str]:
    """Every problem of the unlabeled cases: ids that are also labeled cases, unreadable or inconsistent images."""
    errors = [f"case '{c}' is in {UNLABELED_FOLDER}/ and is also a labeled case (imagesTr or the preprocessed "
              f"folder): a case id must be unique, or a validation case would enter the training pool. Rename or "
              f"remove one." for c in sorted(set(cases) & labeled_ids)]
    for case in sorted(cases):
        errors += case_problems(cases[case])
    return errors


def _dataset_class(labeled_folder: str):
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class, nnUNetDatasetBlosc2

    if os.path.isdir(labeled_folder) and any(f.endswith((".b2nd", ".npz")) for f in os.listdir(labeled_folder)):
        try:
            return infer_dataset_class(labeled_folder)
        except AssertionError:
            pass
    return nnUNetDatasetBlosc2


def preprocess_unlabeled(raw_dataset_folder: str, preprocessed_dataset_folder: str, plans: str = "nnUNetPlans",
                         configuration: str = "2d", num_processes: int = 1, log=print) -> UnlabeledResult:
    """Preprocess every case of `imagesUnlabeled/` into `<data_identifier>_unlabeled/` (replaced if present)."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    name = os.path.basename(os.path.normpath(raw_dataset_folder))
    plans_file = os.path.join(preprocessed_dataset_folder, plans + ".json")
    if not os.path.isfile(plans_file):
        raise UnlabeledPreprocessError(
            f"{plans_file} not found: run nnUNetv2_plan_and_preprocess -d {name} -c {configuration} first (or pass "
            f"-p with the plans identifier you trained with).")
    plans_dict = read_json(plans_file, UnlabeledPreprocessError)
    pm = PlansManager(plans_dict)
    if configuration not in pm.available_configurations:
        raise UnlabeledPreprocessError(f"{plans_file} has no configuration '{configuration}' "
                                       f"(available: {pm.available_configurations}). Pass -c with one of them.")
    cm = pm.get_configuration(configuration)
    dj_pre = os.path.join(preprocessed_dataset_folder, "dataset.json")
    if os.path.isfile(dj_pre):  # what nnU-Net's own preprocessing uses
        dataset_json = read_json(dj_pre, UnlabeledPreprocessError)
    else:
        dataset_json = load_raw_dataset_json(raw_dataset_folder)
    cases = unlabeled_cases(raw_dataset_folder, dataset_json)
    if not cases:
        raise UnlabeledPreprocessError(
            f"{os.path.join(raw_dataset_folder, UNLABELED_FOLDER)} is missing or holds no images: put unlabeled "
            f"images there as <case>_0000{dataset_json['file_ending']} (same naming as imagesTr).")
    labeled_folder = os.path.join(preprocessed_dataset_folder, cm.data_identifier)
    errors = unlabeled_input_problems(cases, labeled_case_ids(raw_dataset_folder, labeled_folder, dataset_json))
    if errors:
        where = os.path.join(raw_dataset_folder, UNLABELED_FOLDER)
        raise UnlabeledPreprocessError(f"{len(errors)} problem(s) in {where}; nothing was written:\n  "
                                       + "\n  ".join(errors))
    out = unlabeled_folder(preprocessed_dataset_folder, cm.data_identifier)
    dataset_class = _dataset_class(labeled_folder)
    names = sorted(cases)
    log(f"preprocessing {len(names)} unlabeled case(s) of {name} with {plans} / {configuration} "
        f"(data identifier {cm.data_identifier}) into {out}")
    # the whole folder is replaced, like nnU-Net's configuration folders (stale cases must not survive), but only
    # once every case succeeded
    with replaced_folder(out) as tmp:
        jobs = [(cases[c], os.path.join(tmp, c), plans_dict, configuration, dataset_json, dataset_class)
                for c in names]
        if num_processes > 1 and len(jobs) > 1:
            with multiprocessing.get_context("spawn").Pool(min(num_processes, len(jobs))) as pool:
                pool.map(_worker, jobs)
        else:
            for i, (case, job) in enumerate(zip(names, jobs)):
                shape = _preprocess_named(job[0], job[1], pm, cm, dataset_json, dataset_class)
                log(f"  [{i + 1}/{len(names)}] {case}: {tuple(shape)}")
    return UnlabeledResult(folder=out, cases=names, data_identifier=cm.data_identifier)
