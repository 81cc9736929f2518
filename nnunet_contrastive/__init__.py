"""nnunet-contrastive: contrastive and semi-supervised trainers for nnU-Net v2.

This module is imported at interpreter start by the installed `.pth` hook: keep it free of heavy imports.
"""
__version__ = "0.1.0"
