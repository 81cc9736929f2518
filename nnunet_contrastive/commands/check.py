"""`nnunet-contrastive check`: cases (imagesTr, imagesUnlabeled) against metadata.csv; copy it to preprocessed.

Labeled cases are nnU-Net's `imagesTr/<case>_0000<ending>`. Truly unlabeled images live in
`nnUNet_raw/DatasetXXX_Name/imagesUnlabeled/<case>_XXXX<ending>` (same naming as imagesTr, no labels): this folder
is our convention; nnU-Net never reads it, so its planning, `--verify_dataset_integrity` and validation keep working
on the labeled part, and `nnunet-contrastive preprocess-unlabeled` preprocesses it with the dataset's plans.
The checks themselves are `nnunet_contrastive.prep.dataset_check.check_dataset` (usable from trainers).
"""
from __future__ import annotations

import os


def register(sub) -> None:
    p = sub.add_parser(
        "check", help="check a raw dataset's metadata.csv against its cases and print counts per meta-label",
        description="Read nnUNet_raw/DatasetXXX_Name: labeled cases (imagesTr/<case>_0000<ending>), unlabeled cases "
                    "(imagesUnlabeled/, our convention; nnU-Net ignores it), metadata.csv and dataset.json "
                    "'meta_labels'. Every case needs a metadata row, every row a case, values must be non-empty and "
                    "of one type per column. Prints the number of cases per meta-label value. On success, copies "
                    "metadata.csv into nnUNet_preprocessed/DatasetXXX_Name if that folder exists (run check again "
                    "after nnUNetv2_plan_and_preprocess). Also reads every image and label file completely: "
                    "truncated or corrupt files, 4D images in a one-channel dataset, image/label grid mismatches and "
                    "label values outside dataset.json 'labels' are errors. Exit code 1 and every problem listed "
                    "otherwise.")
    p.add_argument("-d", "--dataset", required=True, help="dataset id or name (DatasetXXX_Name)")
    p.set_defaults(func=run)


def run(args) -> int:
    from nnunet_contrastive.data.metadata import METADATA_FILENAME, copy_metadata
    from nnunet_contrastive.errors import UserInputError
    from nnunet_contrastive.prep.dataset_check import check_dataset
    from nnunet_contrastive.prep.nnunet_paths import raw_folder

    raw = raw_folder(args.dataset)
    report = check_dataset(raw)
    print(f"dataset {raw}")
    for w in report.warnings:
        print(f"note: {w}")
    report.raise_for_errors()
    print(report.format_counts())
    pre_root = os.environ.get("nnUNet_preprocessed")
    pre = os.path.join(pre_root, os.path.basename(raw)) if pre_root else None
    if pre and os.path.isdir(pre):
        try:
            dst = copy_metadata(raw, pre)
        except OSError as e:
            raise UserInputError(f"could not copy {METADATA_FILENAME} to {pre} ({e}).") from None
        print(f"copied {METADATA_FILENAME} to {dst}")
    else:
        print(f"note: {pre or 'nnUNet_preprocessed (not set)'} does not exist yet: run this check again after "
              f"nnUNetv2_plan_and_preprocess so that {METADATA_FILENAME} reaches the preprocessed folder.")
    print("OK")
    return 0
