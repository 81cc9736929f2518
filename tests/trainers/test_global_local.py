"""nnUNetTrainerGlobalLocal and its variants: declared stages (fast), and on the phantoms (slow): what each stage
trains (gradients, bit-identical frozen encoder), stats, checkpoint keys, the Pretrain hand-off into stock
nnUNetTrainer, every strategy's step, and nnU-Net's CLI train -> predict -> evaluate."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

import nnunet_contrastive.trainers as T
from conftest import build_trainer, phantom_in_process, predict_and_dice, train_phantom_cli
from nnunet_contrastive.trainers.global_local import nnUNetTrainerGlobalLocal

PLANS = "nnUNetPlans_cpu_small"
VARIANTS = ["nnUNetTrainerGlobalLocal", "nnUNetTrainerGlobalLocalGR", "nnUNetTrainerGlobalLocalGDminus",
            "nnUNetTrainerGlobalLocalLD", "nnUNetTrainerGlobalLocalGlobalOnly", "nnUNetTrainerGlobalLocalPretrain"]


# ---------------------------------------------------------------------------------------------- declarations (fast)
def test_variants_are_exported_and_declare_their_stages():
    for name in VARIANTS:
        assert name in T.__all__ and issubclass(getattr(T, name), nnUNetTrainerGlobalLocal)
    plan = T.nnUNetTrainerGlobalLocal.stage_plan(1000, environ={})
    assert [(s.name, s.epochs) for s in plan.stages] == [("global", 333), ("local", 333), ("supervised", 334)]
    g, loc, sup = plan.stages
    assert g.pretraining and loc.pretraining and not sup.pretraining
    assert g.trains == ("encoder", "global") and sup.trains == ("network",)
    assert loc.trains == ("decoder.0", "decoder.1", "decoder.2", "local")  # no encoder: frozen in stage 2
    assert g.loader.sampling == "partition" and g.loader.views == 2 and not g.loader.share_spatial
    assert g.loader.labeled == 0 and g.loader.images_of_labeled  # every image of the fold, no label
    assert loc.loader.views == 2 and loc.loader.share_spatial and loc.loader.sampling == "random"
    assert sup.loader.labeled == "batch" and sup.loader.views == 1 and sup.fresh_lr and sup.fresh_momentum
    assert T.nnUNetTrainerGlobalLocal.pretraining_stage_names() == ["global", "local"]
    assert not T.nnUNetTrainerGlobalLocal.needs_unlabeled()  # pre-training reads labeled cases' images too

    names = lambda cls, env=None: [s.name for s in cls.stage_plan(1000, environ=env or {}).stages]  # noqa: E731
    assert names(T.nnUNetTrainerGlobalLocalPretrain) == ["global", "local"]
    assert names(T.nnUNetTrainerGlobalLocalGlobalOnly) == ["global", "supervised"]
    assert T.nnUNetTrainerGlobalLocalGR.declare_stages()[0].loader.sampling == "random"
    assert T.nnUNetTrainerGlobalLocalGDminus.declare_stages()[0].loader.sampling == "partition"
    assert T.nnUNetTrainerGlobalLocalLD.declare_stages()[1].loader.sampling == "partition"
    assert T.nnUNetTrainerGlobalLocalLD.declare_stages()[1].loader.share_spatial
    short = T.nnUNetTrainerGlobalLocal.stage_plan(1000, environ={"nnUNet_contrastive_pretrain_epochs": "2"})
    assert [s.epochs for s in short.stages] == [2, 2, 996]


# ---------------------------------------------------------------------------------------------- phantoms (slow)
def _params(module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


class RecordingGlobalLocal(nnUNetTrainerGlobalLocal):
    """Records the network / heads at each epoch start and which parameters got a gradient in each epoch."""

    records: dict = {}

    def train_step(self, batch):
        if self._iteration == 0:
            self.records[("start", self.current_epoch)] = {"net": _params(self.network),
                                                           "terms": _params(self.terms)}
        out = super().train_step(batch)
        grads = self.records.setdefault(("grad", self.current_epoch), set())
        for prefix, mod in (("net.", self.network), ("terms.", self.terms)):
            for k, p in mod.named_parameters():
                if p.grad is not None and p.grad.abs().sum() > 0:
                    grads.add(prefix + k)
        return out

    def on_train_end(self):
        self.records["end"] = {"net": _params(self.network), "terms": _params(self.terms)}
        super().on_train_end()


@pytest.fixture
def gl_env(phantom_prepared, monkeypatch, tmp_path):
    return phantom_in_process(phantom_prepared, monkeypatch, str(tmp_path / "results"),
                              nnUNet_contrastive_stage_epochs="1,1,1", nnUNet_contrastive_iterations=2,
                              nnUNet_contrastive_val_iterations=1)


def _stage_of(key: str) -> str:
    if key.startswith("terms."):
        return key.split(".")[1]  # the term owning the head
    parts = key.split(".")
    if parts[1] == "encoder":
        return "encoder"
    if parts[1] == "decoder" and parts[2] in ("stages", "transpconvs", "seg_layers"):
        return f"decoder.{parts[3]}"
    return "other"


@pytest.mark.slow
def test_stages_train_only_their_parts_encoder_bit_identical_and_checkpoint(gl_env):
    RecordingGlobalLocal.records = {}
    t = build_trainer(gl_env, RecordingGlobalLocal)
    assert [(s.name, s.epochs) for s in t.plan.stages] == [("global", 1), ("local", 1), ("supervised", 1)]
    t.run_training()
    rec = RecordingGlobalLocal.records
    n_dec = len(t.network.decoder.stages)
    l_eff = min(3, n_dec)
    trained_local = {f"decoder.{s}" for s in range(l_eff)}

    # gradients: stage 1 encoder + global head only; stage 2 decoder.0..l-1 + local head only (not every stage-2
    # parameter need get a gradient, e.g. seg layers, but nothing else may); stage 3 the network, no head
    g1, g2, g3 = ({_stage_of(k) for k in rec[("grad", e)]} for e in range(3))
    assert g1 == {"encoder", "global"}
    assert "local" in g2 and g2 <= trained_local | {"local"} and "decoder.0" in g2
    assert "encoder" in g3 and not g3 & {"global", "local"}

    # the encoder is bit-identical across the local stage, trained in stages 1 and 3
    s0, s1, s2, end = rec[("start", 0)], rec[("start", 1)], rec[("start", 2)], rec["end"]
    enc = [k for k in s0["net"] if k.startswith("encoder.")]
    assert any(not torch.equal(s0["net"][k], s1["net"][k]) for k in enc)
    assert all(torch.equal(s1["net"][k], s2["net"][k]) for k in enc)
    assert any(not torch.equal(s2["net"][k], end["net"][k]) for k in enc)
    # stage 2 changes the first l decoder stages (convs), never the deeper ones; stage 1 no decoder stage at all
    for k in s0["net"]:
        if k.startswith("decoder.") and _stage_of("net." + k).startswith("decoder."):
            assert torch.equal(s0["net"][k], s1["net"][k]), k
            if _stage_of("net." + k) not in trained_local:
                assert torch.equal(s1["net"][k], s2["net"][k]), k
    assert any(not torch.equal(s1["net"][k], s2["net"][k]) for k in s1["net"] if k.startswith("decoder.stages.0."))
    # heads: the global head only moves in stage 1, the local head only in stage 2
    glob = [k for k in s0["terms"] if k.startswith("global.")]
    loc = [k for k in s0["terms"] if k.startswith("local.") and "num_batches" not in k]
    assert any(not torch.equal(s0["terms"][k], s1["terms"][k]) for k in glob)
    assert all(torch.equal(s1["terms"][k], end["terms"][k]) for k in glob)
    assert all(torch.equal(s0["terms"][k], s1["terms"][k]) for k in loc)
    assert any(not torch.equal(s1["terms"][k], s2["terms"][k]) for k in loc)

    # stats per term and stage, logged by name
    log = t.logger.local_logger.my_fantastic_logging
    assert log["stage"] == [1.0, 2.0, 3.0]
    assert np.isfinite(log["global_loss"][0]) and np.isnan(log["global_loss"][1])
    assert np.isfinite(log["local_loss"][1]) and np.isfinite(log["sup_loss"][2])
    # G^D, 2 volumes x 4 partitions: 2 * 2 - 1 = 3 positives per anchor, 2 * 2 * 3 = 12 negatives
    assert log["global_positives"][0] == pytest.approx(3.0) and log["global_negatives"][0] == pytest.approx(12.0)
    a = log["local_regions"][1]
    assert log["local_positives"][1] == pytest.approx(1.0)
    assert log["local_negatives"][1] == pytest.approx(2 * (a - 1))
    assert 0 < log["global_progress"][0] < 1

    # checkpoint: network weights are exactly nnU-Net's network, the heads live under our key
    ckpt = torch.load(os.path.join(t.output_folder, "checkpoint_final.pth"), map_location="cpu", weights_only=False)
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    fresh = nnUNetTrainer.build_network_architecture(t.plans_manager, t.configuration_manager, t.num_input_channels,
                                                     t.label_manager.num_segmentation_heads, True)
    assert ckpt["network_weights"].keys() == fresh.state_dict().keys()
    terms = ckpt["nnunet_contrastive"]["terms"]
    assert any(k.startswith("global.head.") for k in terms) and any(k.startswith("local.head.") for k in terms)
    assert not any(k.startswith(("global", "local", "head")) for k in ckpt["network_weights"])


@pytest.mark.slow
def test_pretrain_checkpoint_loads_into_stock_nnunet_trainer(gl_env, monkeypatch):
    from nnunetv2.run.load_pretrained_weights import load_pretrained_weights
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    monkeypatch.setenv("nnUNet_contrastive_stage_epochs", "1,1")
    pre = build_trainer(gl_env, "nnUNetTrainerGlobalLocalPretrain")
    assert [s.name for s in pre.plan.stages] == ["global", "local"]
    pre.run_training()
    ckpt = os.path.join(pre.output_folder, "checkpoint_final.pth")
    saved = torch.load(ckpt, map_location="cpu", weights_only=False)["network_weights"]

    plans = json.load(open(os.path.join(gl_env["pre"], f"{PLANS}.json")))
    plans["continue_training"] = False
    stock = nnUNetTrainer(plans, "2d", 0, json.load(open(os.path.join(gl_env["pre"], "dataset.json"))),
                          device=torch.device("cpu"))
    stock.initialize()
    before = _params(stock.network)
    load_pretrained_weights(stock.network, ckpt, verbose=False)
    after = stock.network.state_dict()
    # every pre-trained weight (encoder, the l decoder stages) arrives; nnU-Net skips only the seg layers
    moved = [k for k, v in after.items() if ".seg_layers." not in k]
    assert moved and all(torch.equal(after[k], saved[k]) for k in moved)
    assert any(not torch.equal(before[k], after[k]) for k in moved if k.startswith("decoder.stages.0."))


@pytest.mark.slow
@pytest.mark.parametrize("name,stage_epochs", [("nnUNetTrainerGlobalLocalGR", "1,1,1"),
                                               ("nnUNetTrainerGlobalLocalGDminus", "1,0,1"),
                                               ("nnUNetTrainerGlobalLocalLD", "0,1,1")])
def test_every_strategy_takes_finite_steps(gl_env, monkeypatch, name, stage_epochs):
    monkeypatch.setenv("nnUNet_contrastive_stage_epochs", stage_epochs)
    t = build_trainer(gl_env, name)
    t.initialize()
    t.on_train_start()
    try:
        for stage_index, stage in enumerate(t.plan.stages):
            if not stage.pretraining:
                continue
            t.current_epoch = t.plan.starts[stage_index]
            t.on_epoch_start()
            batch = next(t.dataloader_train)
            if stage.loader.sampling == "partition":  # m volumes x S partitions, every partition once per volume
                part = batch["partition"].numpy()
                assert len(part) % t.num_partitions == 0
                assert (part.reshape(-1, t.num_partitions) == np.arange(t.num_partitions)).all()
            out = t.train_step(batch)
            assert np.isfinite(out["loss"])
            term = stage.terms[0].term
            assert {f"{term}_positives", f"{term}_negatives"} <= set(t._epoch_stats)
    finally:
        t._finish_loaders()


@pytest.mark.slow
def test_global_local_cli_train_predict_evaluate(phantom_prepared):
    prepared = phantom_prepared
    out, env, fold = train_phantom_cli(prepared, "nnUNetTrainerGlobalLocal", nnUNet_contrastive_stage_epochs="1,1,2")
    assert "stage 1: global" in out and "global_loss" in out
    assert "stage 2: local" in out and "local_loss" in out and "stage 3: supervised" in out
    for f in ("checkpoint_final.pth", "progress.png", "progress_contrastive.png"):
        assert os.path.isfile(os.path.join(fold, f)), f
    dice = predict_and_dice(prepared, "nnUNetTrainerGlobalLocal", env, out_name="pred_global_local")
    assert dice > 0.05, dice
