"""`nnunet-contrastive preprocess-unlabeled`: imagesUnlabeled/ -> <data_identifier>_unlabeled/ with the dataset's
plans (nnunet_contrastive.prep.preprocess_unlabeled)."""
from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser(
        "preprocess-unlabeled", help="preprocess imagesUnlabeled/ with the dataset's nnU-Net plans",
        description="Preprocess the truly unlabeled images of nnUNet_raw/DatasetXXX_Name/imagesUnlabeled/ "
                    "(<case>_0000<ending>, ...; nnU-Net itself ignores this folder) with nnU-Net's own preprocessor "
                    "and the dataset's plans, exactly like the labeled cases, into "
                    "nnUNet_preprocessed/DatasetXXX_Name/<data_identifier>_unlabeled/ (e.g. nnUNetPlans_2d_unlabeled; "
                    "replaced if present). Run nnUNetv2_plan_and_preprocess first. The saved seg files only hold the "
                    "nonzero mask (-1 outside, 0 inside) and are never a label.")
    p.add_argument("-d", "--dataset", required=True, help="dataset id or name (DatasetXXX_Name)")
    p.add_argument("-p", "--plans", default="nnUNetPlans", help="plans identifier (default nnUNetPlans)")
    p.add_argument("-c", "--configuration", default="2d", help="configuration (default 2d)")
    p.add_argument("-np", "--num-processes", type=int, default=1,
                   help="worker processes (default 1; each one imports torch)")
    p.set_defaults(func=run)


def run(args) -> int:
    from nnunet_contrastive.prep.nnunet_paths import preprocessed_folder, raw_folder
    from nnunet_contrastive.prep.preprocess_unlabeled import UnlabeledPreprocessError, preprocess_unlabeled

    if args.num_processes < 1:
        raise UnlabeledPreprocessError(f"-np must be >= 1, got {args.num_processes}.")
    raw, pre = raw_folder(args.dataset), preprocessed_folder(args.dataset)
    res = preprocess_unlabeled(raw, pre, args.plans, args.configuration, args.num_processes)
    print(f"wrote {len(res.cases)} unlabeled case(s) to {res.folder}")
    print(f"note: run 'nnunet-contrastive check -d {args.dataset}' to validate metadata.csv and copy it to {pre}")
    return 0
