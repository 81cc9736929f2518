"""`nnunet-contrastive convert-msd` and `convert-acdc`: public layouts -> nnU-Net v2 raw format + metadata.csv."""
from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser(
        "convert-msd", help="convert a Medical Segmentation Decathlon task folder to nnU-Net v2 raw format",
        description="Convert an MSD task folder (imagesTr/, labelsTr/, optional imagesTs/, dataset.json with "
                    "'modality' and 'labels'; one file per case) to $nnUNet_raw/DatasetXXX_NAME: images as "
                    "<case>_0000.nii.gz (copied, or hard-linked with --link; multi-modal 4D images are split into "
                    "_0000, _0001, ...), labels, a v2 dataset.json and metadata.csv. MSD has one volume per subject, "
                    "so metadata.csv has patient = case id. Hidden and macOS '._*' files are skipped.")
    p.add_argument("src", metavar="SRC", help="MSD task folder, e.g. Task04_Hippocampus")
    _common(p, name_help="dataset name (default: the SRC folder name without 'TaskNN_', e.g. Hippocampus)")
    p.set_defaults(func=run_msd)

    p = sub.add_parser(
        "convert-acdc", help="convert the ACDC cardiac MRI dataset (ED and ES frames) to nnU-Net v2 raw format",
        description="Convert ACDC (SRC/.../patientXXX/ with patientXXX_frameYY.nii.gz, patientXXX_frameYY_gt.nii.gz "
                    "and Info.cfg giving 'ED:' and 'ES:' frame numbers) to $nnUNet_raw/DatasetXXX_NAME. Only the ED "
                    "and ES frames are used (cases patientXXX_frameYY; the 4D file and other frames are ignored). "
                    "Frames with a _gt file go to imagesTr/labelsTr (labels 0 background, 1 RV, 2 MYO, 3 LV), frames "
                    "without one to imagesUnlabeled/ (ignored by nnU-Net, used by our trainers). metadata.csv gets "
                    "patient, phase (ED/ES) and, if every Info.cfg has it, group.")
    p.add_argument("src", metavar="SRC", help="ACDC folder (containing training/ and/or testing/, or patient folders)")
    _common(p, name_help="dataset name (default ACDC)")
    p.set_defaults(func=run_acdc)


def _common(p, name_help: str) -> None:
    p.add_argument("-d", "--dataset-id", type=int, required=True, help="nnU-Net dataset id (1-999) for DatasetXXX")
    p.add_argument("--name", default=None, help=name_help)
    p.add_argument("--overwrite", action="store_true", help="replace an existing DatasetXXX_NAME folder")
    p.add_argument("--link", action="store_true",
                   help="hard-link files instead of copying them (saves space; an in-place edit of the raw dataset "
                        "then also changes the source files)")


def run_msd(args) -> int:
    from nnunet_contrastive.prep.converters import convert_msd

    return _run(convert_msd, args, args.name)


def run_acdc(args) -> int:
    from nnunet_contrastive.prep.converters import convert_acdc

    return _run(convert_acdc, args, args.name or "ACDC")


def _run(convert, args, name) -> int:
    import os

    from nnunet_contrastive.errors import UserInputError

    try:
        res = convert(args.src, args.dataset_id, name, raw_root=os.environ.get("nnUNet_raw", ""),
                      overwrite=args.overwrite, link=args.link, log=print)
    except OSError as e:  # e.g. no permission or no space left: nothing was written (see write_dataset)
        raise UserInputError(f"{e.__class__.__name__}: {e}") from None
    print(f"wrote {res.folder}")
    print(f"  {res.num_labeled} labeled training cases (imagesTr/labelsTr), {res.num_test} test images (imagesTs), "
          f"{res.num_unlabeled} unlabeled (imagesUnlabeled)")
    print(f"  files: {res.linked} hard-linked, {res.copied} copied, {res.written} written (split channels)")
    for note in res.notes:
        print(f"  note: {note}")
    print(f"next: nnunet-contrastive check -d {args.dataset_id}; then nnUNetv2_plan_and_preprocess -d "
          f"{args.dataset_id} --verify_dataset_integrity")
    return 0
