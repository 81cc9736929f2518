"""One module per `nnunet-contrastive` subcommand; each defines `register(subparsers)` (see cli.py)."""
