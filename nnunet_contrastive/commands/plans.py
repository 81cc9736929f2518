"""`nnunet-contrastive plans`: derive a plans identifier from a dataset's plans and a JSON override."""
from __future__ import annotations

from nnunet_contrastive.prep.plans_override import available_overrides, derive_plans


def register(sub) -> None:
    p = sub.add_parser(
        "plans", help="derive new nnU-Net plans from a JSON override (use them with -p)",
        description="Merge a JSON override into a dataset's plans and write them as <source>_<override>.json in "
                    "nnUNet_preprocessed/DatasetXXX, for nnUNetv2_train/predict -p <source>_<override>. "
                    f"Built-in overrides: {', '.join(sorted(available_overrides()))}.")
    p.add_argument("-d", "--dataset", required=True, help="dataset id or name (e.g. 990 or Dataset990_X)")
    p.add_argument("-o", "--override", required=True, help="built-in override name or path to a JSON file")
    p.add_argument("-p", "--plans", default="nnUNetPlans", help="source plans identifier (default nnUNetPlans)")
    p.add_argument("--name", default=None, help="new plans identifier (default <source>_<override>)")
    p.set_defaults(func=run)


def run(args) -> int:
    from nnunet_contrastive.prep.nnunet_paths import preprocessed_folder

    new = derive_plans(preprocessed_folder(args.dataset), args.override, args.plans, args.name)
    print(f"wrote plans '{new}': use -p {new}")
    return 0
