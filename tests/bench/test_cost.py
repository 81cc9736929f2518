"""The cost table's loss bookkeeping: a trainer whose loss is not finite on a device is flagged, not only timed."""
import math

import torch

from nnunet_contrastive.bench.cost import loss_summary
from nnunet_contrastive.bench.report import cost_markdown


def test_loss_summary_hand_computed_and_flags_non_finite_terms():
    stats = {"supcon_loss": [torch.tensor(1.0), torch.tensor(3.0)], "supcon_weight": [0.5, float("nan")],
             "seg_loss": [torch.tensor([2.0, 4.0]), torch.tensor(float("inf"))]}
    out = loss_summary([1.0, 2.0, 6.0], stats)
    assert out["loss_mean"] == 3.0
    assert out["term_losses"]["supcon_loss"] == {"mean": 2.0, "finite": True}
    # a weight is not a loss: its NaN is not looked at; the infinite seg loss is, and spoils the row
    assert "supcon_weight" not in out["term_losses"]
    assert out["term_losses"]["seg_loss"]["finite"] is False and out["term_losses"]["seg_loss"]["mean"] == 3.0
    assert out["loss_finite"] is False
    assert loss_summary([1.0, float("nan")], {})["loss_finite"] is False
    assert loss_summary([], {}) == {"loss_mean": None, "loss_finite": None, "term_losses": {}}


def test_cost_markdown_shows_gpu_memory_only_when_measured_and_flags_bad_losses():
    base = dict(stage=None, s_per_it=0.2, s_per_it_ratio=1.0, step_s=0.1, peak_rss_mib=1000.0, peak_rss_ratio=1.0,
                timed_iterations=5, loss_mean=0.5, loss_finite=True)
    cpu = cost_markdown([dict(base, trainer="nnUNetTrainer"), dict(base, trainer="X", loss_finite=False,
                                                                 loss_mean=math.nan)])
    assert "GPU memory" not in cpu and cpu.count("**not finite**") == 1
    assert "| nnUNetTrainer (reference) | — | 0.200 | 1.00 | 0.100 | 1000 | 1.00 | 0.5 | 5 |" in cpu
    gpu = cost_markdown([dict(base, trainer="nnUNetTrainer", cuda_max_allocated_mib=2048.0, cuda_memory_ratio=1.0),
                         dict(base, trainer="Y", stage=2, cuda_max_allocated_mib=3072.0, cuda_memory_ratio=1.5),
                         dict(base, trainer="Old", loss_mean=None)])  # a row cached before losses were kept
    assert "peak GPU memory (MiB)" in gpu
    assert "| Y | 2 | 0.200 | 1.00 | 0.100 | 1000 | 1.00 | 3072 | 1.50 | 0.5 | 5 |" in gpu
    assert "| Old | — | 0.200 | 1.00 | 0.100 | 1000 | 1.00 | — | — | — | 5 |" in gpu


def test_cost_budget_leaves_every_trainer_a_stage_after_its_pretraining():
    """--quick's 2 epochs with pre-training inside could not hold GlobalLocal's two pre-training stages: the cost
    measurement failed on it. Every trainer's plan must resolve under the budget the cost stage builds it with."""
    from nnunet_contrastive.bench.benchmark import QUICK, Budget, cost_budget, run_env
    from nnunet_contrastive.bench.cost import trainer_class, trainer_stages

    quick = Budget(epochs=QUICK["epochs"], iterations=QUICK["iterations"], val_iterations=QUICK["val_iterations"],
                   pretrain_epochs=QUICK["pretrain_epochs"])
    for name in ("nnUNetTrainerSPCon", "nnUNetTrainerGlobalLocal", "nnUNetTrainerPLCon", "nnUNetTrainerARCO",
                 "nnUNetTrainerUnsupCon", "nnUNetTrainerMeanTeacher"):
        budget = cost_budget(quick, name)
        env = run_env({}, name, budget, "/nonexistent")
        plan = trainer_class(name).stage_plan(budget.epochs, environ=env)
        assert len(plan.stages) == len(trainer_stages(name)) or trainer_stages(name) == [None]
        assert plan.num_epochs > sum(s.epochs for s in plan.stages if s.pretraining), name


def test_augmentation_note_follows_the_recorded_workers():
    from nnunet_contrastive.bench.report import augmentation_note

    assert "same process" in augmentation_note([{"n_proc_DA": "0"}, {}])  # rows cached before it was recorded
    assert augmentation_note([{"n_proc_DA": "12"}]) == "data augmentation in nnUNet_n_proc_DA=12 background workers"


def test_the_loss_alone_is_compared_with_a_step_that_trains_with_it():
    """The GPU report compared supcon_loss with ARCO's step when SPCon was not measured: the reference is a
    SPCon / UnsupCon pre-training step, else the stock step."""
    from nnunet_contrastive.bench.cost import loss_step_reference

    stock = {"trainer": "nnUNetTrainer", "stage": None}
    arco = {"trainer": "nnUNetTrainerARCO", "stage": 1}
    spcon2 = {"trainer": "nnUNetTrainerSPCon", "stage": 2}
    unsup1 = {"trainer": "nnUNetTrainerUnsupCon", "stage": 1}
    assert loss_step_reference([stock, arco]) is stock
    assert loss_step_reference([stock, arco, spcon2, unsup1]) is unsup1
    assert loss_step_reference([stock, {"trainer": "nnUNetTrainerSPConHard", "stage": 1}, unsup1])["trainer"] == \
        "nnUNetTrainerSPConHard"
