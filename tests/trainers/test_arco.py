"""nnUNetTrainerARCO and its sampler variants: declarations, and nnU-Net's CLI end to end on the phantoms."""
from __future__ import annotations

import os

import pytest
import torch

from conftest import predict_and_dice, train_phantom_cli


def test_variants_differ_only_in_the_sampler_and_are_exported():
    import nnunet_contrastive.trainers as T
    from nnunet_contrastive.components.samplers import NSSampler, SAGSampler, SGSampler

    for name in ("nnUNetTrainerARCO", "nnUNetTrainerARCOSAG", "nnUNetTrainerARCONS"):
        assert name in T.__all__ and hasattr(T, name)
    assert (T.nnUNetTrainerARCO.sampler, T.nnUNetTrainerARCOSAG.sampler, T.nnUNetTrainerARCONS.sampler) == \
        ("sg", "sag", "ns")
    assert T.nnUNetTrainerARCO.needs_unlabeled()
    (stage,) = T.nnUNetTrainerARCO.declare_stages()
    assert [(u.term, u.rows) for u in stage.terms] == [("sup", "labeled"), ("arco", "all"), ("unsup", "unlabeled")]
    assert stage.loader.views == 2 and stage.loader.share_spatial and "arco" in stage.trains
    from nnunet_contrastive.components.samplers import build_sampler
    assert isinstance(build_sampler("sg", grid=4), SGSampler) and isinstance(build_sampler("sag"), SAGSampler)
    assert isinstance(build_sampler("ns"), NSSampler)


@pytest.mark.slow
def test_arco_cli_train_predict_evaluate(phantom_prepared):
    prepared = phantom_prepared
    out, env, fold = train_phantom_cli(prepared, "nnUNetTrainerARCO", nnUNet_contrastive_epochs=4)
    assert "ARCO: sampler SGSampler" in out and "arco_loss" in out and "unsup_loss" in out
    for f in ("checkpoint_final.pth", "checkpoint_teacher.pth", "progress_contrastive.png"):
        assert os.path.isfile(os.path.join(fold, f)), f
    ckpt = torch.load(os.path.join(fold, "checkpoint_final.pth"), map_location="cpu", weights_only=False)
    extra = ckpt["nnunet_contrastive"]
    # head, predictor, key memory and the head's EMA copy beside the network, never inside network_weights
    assert any(k.startswith("arco.head.") for k in extra["terms"])
    assert "arco.predictor.weight" in extra["terms"] and "arco.memory.keys" in extra["terms"]
    assert int(extra["terms"]["arco.memory.filled"].min()) > 0  # every phantom class reached the memory
    assert "arco.head" in extra["head_teachers"] and extra["teacher"]
    assert not any(k.startswith(("arco", "head", "unsup", "teacher", "memory")) for k in ckpt["network_weights"])
    log = ckpt["logging"]
    assert all(v > 0 for v in log["arco_loss"]) and all(v >= 2 for v in log["arco_classes_used"])
    assert log["arco_entropy_percent"][0] > log["arco_entropy_percent"][-1]
    dice = predict_and_dice(prepared, "nnUNetTrainerARCO", env, out_name="pred_arco")
    # an untrained network (random init) scores ~0 on the phantoms; SPCon's test uses the same bar
    assert dice > 0.15, dice
