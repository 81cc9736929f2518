"""nnUNet_contrastive_seed makes a run reproducible in one process: same weights, same batches, same step."""
import numpy as np
import pytest
import torch

from conftest import build_trainer, phantom_in_process

pytestmark = pytest.mark.slow


def _first_step(prepared, name):
    t = build_trainer(prepared, name)
    t.initialize()
    w0 = {k: v.clone() for k, v in t.network.state_dict().items()}
    t.on_train_start()
    t.on_epoch_start()
    t.on_train_epoch_start()
    batch = next(t.dataloader_train)
    loss = float(t.train_step(batch)["loss"])
    t._finish_loaders() if hasattr(t, "_finish_loaders") else None
    return w0, batch, loss


@pytest.mark.parametrize("name", ["nnUNetTrainerFewLabels", "nnUNetTrainerMeanTeacher",
                                  "nnUNetTrainerMeanTeacherCutMixHard", "nnUNetTrainerBCP"])
def test_same_seed_same_run_other_seed_other_run(phantom_prepared, monkeypatch, tmp_path, name):
    env = dict(nnUNet_contrastive_epochs=2, nnUNet_contrastive_iterations=2, nnUNet_contrastive_val_iterations=1,
               nnUNet_n_proc_DA=0)
    phantom_in_process(phantom_prepared, monkeypatch, str(tmp_path / "a"), nnUNet_contrastive_seed=7, **env)
    w_a, b_a, l_a = _first_step(phantom_prepared, name)
    phantom_in_process(phantom_prepared, monkeypatch, str(tmp_path / "b"), nnUNet_contrastive_seed=7, **env)
    w_b, b_b, l_b = _first_step(phantom_prepared, name)
    assert all(torch.equal(w_a[k], w_b[k]) for k in w_a)
    assert list(b_a["keys"]) == list(b_b["keys"]) and torch.equal(b_a["data"], b_b["data"])
    assert l_a == l_b
    phantom_in_process(phantom_prepared, monkeypatch, str(tmp_path / "c"), nnUNet_contrastive_seed=8, **env)
    w_c, b_c, _ = _first_step(phantom_prepared, name)
    assert any(not torch.equal(w_a[k], w_c[k]) for k in w_a)
    assert not torch.equal(b_a["data"], b_c["data"])
    assert np.isfinite(l_a)
