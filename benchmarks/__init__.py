"""Benchmarks of nnunet-contrastive (run as modules: `python -m benchmarks.loader_throughput`)."""
