"""Trainer index for nnU-Net's `nnUNet_extTrainer` lookup.

nnU-Net imports every module of this folder as a top-level module and drops it from `sys.modules` afterwards.
This module therefore only re-exports the classes of `nnunet_contrastive.trainers`: the class nnU-Net finds is
the very class object of our package (picklable, identical under `isinstance`). Keep nothing else in this folder.
"""
from nnunet_contrastive.trainers import *  # noqa: F401,F403
