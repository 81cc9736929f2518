"""JSON overrides of nnU-Net plans, installed as package data (see nnunet_contrastive.prep.plans_override)."""
