"""`nnunet-contrastive`: one command with subcommands (`nnunet-contrastive SUBCOMMAND --help`).

Each subcommand lives in its own module, which defines `register(subparsers)`: it adds its parser and sets
`func(args) -> int` as the parser default. Add a module to `SUBCOMMAND_MODULES` to add a subcommand.
Modules are imported lazily by name so `--help` stays fast and a broken optional piece names itself.

Bad input raises `nnunet_contrastive.errors.UserInputError` (or a subclass) anywhere below a subcommand: `main`
prints it as one `error:` message and returns 1, without a traceback. Any other exception is a bug and keeps its
traceback. Command-line syntax errors are argparse's (usage message, exit code 2).
"""
from __future__ import annotations

import argparse
import importlib
import sys

from nnunet_contrastive import __version__
from nnunet_contrastive.errors import UserInputError

SUBCOMMAND_MODULES = [
    "nnunet_contrastive.commands.env",
    "nnunet_contrastive.commands.demo",
    "nnunet_contrastive.commands.plans",
    "nnunet_contrastive.commands.select_labeled",
    "nnunet_contrastive.commands.convert",
    "nnunet_contrastive.commands.check",
    "nnunet_contrastive.commands.preprocess_unlabeled",
    "nnunet_contrastive.commands.benchmark",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nnunet-contrastive",
        description="Contrastive and semi-supervised trainers for nnU-Net v2. Train with nnU-Net's own CLI "
                    "(nnUNetv2_train D 2d F -tr nnUNetTrainerFewLabels); this command prepares data and runs demos.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="SUBCOMMAND")
    for name in SUBCOMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except UserInputError as e:
        sys.stdout.flush()
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
