"""The ARCO sampler-variance measurement (nnunet_contrastive.bench.arco_variance)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from nnunet_contrastive.bench import arco_variance as V


def test_welford_trace_cov_and_ratio_match_numpy():
    rng = np.random.default_rng(0)
    g = rng.normal(size=(30, 7)) * np.arange(1, 8)
    wf = V._Welford()
    for row in g:
        wf.add(torch.tensor(row))
    assert wf.trace_cov == pytest.approx(np.var(g, axis=0, ddof=1).sum(), rel=1e-10)
    a, b = rng.normal(size=50) * 2, rng.normal(size=60)
    r, lo, hi = V._ratio_ci(list(a), list(b))
    assert r == pytest.approx(np.var(a, ddof=1) / np.var(b, ddof=1)) and lo < r < hi


def test_fit_pads_and_crops_centred():
    a = np.arange(12).reshape(3, 4)
    out = V._fit(a, (5, 2))
    assert out.shape == (5, 2) and out[0].sum() == 0 and out[1].tolist() == [1, 2] and out[3].tolist() == [9, 10]


def test_measurement_runs_on_hippocampus(hippocampus_dir, tmp_path, capsys):
    out = tmp_path / "v.json"
    assert V.main(["--data", hippocampus_dir, "--cases", "3", "--labeled", "2", "--unlabeled", "2", "--draws", "4",
                   "--grad-draws", "2", "--anchors", "16", "--keys", "8", "--train-steps", "1", "--threads", "2",
                   "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "SG/NS: Var[L]" in text and "SAG/SG" in text and "trained 1 CE steps" in text
    res = json.loads(out.read_text())
    for s in ("ns", "sg", "sag"):
        assert len(res[s]["losses"]) == 4 and len(res[s]["gnorms"]) == 2
        assert res[s]["loss_var"] >= 0 and res[s]["grad_trace_cov"] >= 0
    assert res["sizes"]["draws"] == 4 and len(res["sizes"]["valid_pixels_per_class"]) == 3


def test_missing_data_is_a_clear_error(tmp_path, capsys):
    assert V.main(["--data", str(tmp_path)]) == 2
    assert "no imagesTr" in capsys.readouterr().err
