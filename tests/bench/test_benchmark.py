"""`nnunet-contrastive benchmark`: table arithmetic against hand-computed numbers, input checks, and the --quick path
end to end on the shared hippocampus data (slow; skipped when the data are absent)."""
from __future__ import annotations

import json
import math
import os
import subprocess
import time

import pytest

from nnunet_contrastive.bench import report as R
from nnunet_contrastive.bench.benchmark import (BASELINE, Budget, BenchmarkError, check_budget, check_data,
                                          parse_num_labeled, resolve_trainers)

SP = "nnUNetTrainerSPCon"


# ------------------------------------------------------------------------------------------------ arithmetic
def test_mean_std_hand_computed():
    assert R.mean_std([]) == (None, None)
    assert R.mean_std([0.7]) == (0.7, None)  # one seed: no std
    m, s = R.mean_std([1, 2, 3, 4])
    assert m == 2.5 and math.isclose(s, math.sqrt(5 / 3))  # sample std, ddof = 1
    m, s = R.mean_std([0.5, 0.6, 0.7])
    assert math.isclose(m, 0.6) and math.isclose(s, 0.1)


def test_gap_closed_hand_computed():
    assert math.isclose(R.gap_closed(0.65, 0.60, 0.80), 0.25)
    assert math.isclose(R.gap_closed(0.80, 0.60, 0.80), 1.0)
    assert math.isclose(R.gap_closed(0.50, 0.60, 0.80), -0.5)  # worse than the baseline
    assert math.isclose(R.gap_closed(0.90, 0.60, 0.80), 1.5)  # better than full supervision
    assert R.gap_closed(0.7, 0.6, 0.6) is None  # no gap
    assert R.gap_closed(0.7, 0.6, 0.5) is None  # "full" worse than few: meaningless
    assert R.gap_closed(None, 0.6, 0.8) is None


def _run(trainer, n, seed, a, p):
    return {"trainer": trainer, "num_labeled": n, "seed": seed, "dice": {"A": a, "P": p, "mean": (a + p) / 2}}


def _results():
    # FewLabels N=1: means 0.50, 0.60, 0.70; all: 0.80 x3; SPCon N=1: 0.55, 0.70, 0.70; SPCon all: 0.82, 0.80
    return [
        _run(BASELINE, 1, 0, 0.40, 0.60), _run(BASELINE, 1, 1, 0.50, 0.70), _run(BASELINE, 1, 2, 0.60, 0.80),
        _run(BASELINE, "all", 0, 0.80, 0.80), _run(BASELINE, "all", 1, 0.70, 0.90),
        _run(BASELINE, "all", 2, 0.90, 0.70),
        _run(SP, 1, 0, 0.50, 0.60), _run(SP, 1, 1, 0.60, 0.80), _run(SP, 1, 2, 0.70, 0.70),
        _run(SP, "all", 0, 0.82, 0.82), _run(SP, "all", 1, 0.80, 0.80),
    ]


def test_summarize_hand_computed():
    rows = R.summarize(_results(), [BASELINE, SP], [1, "all"], ["A", "P"], BASELINE)
    by = {(r["trainer"], r["num_labeled"]): r for r in rows}
    assert [(r["num_labeled"], r["trainer"]) for r in rows] == [(1, BASELINE), (1, SP), ("all", BASELINE),
                                                               ("all", SP)]
    few = by[(BASELINE, 1)]
    assert few["n_seeds"] == 3 and few["seeds"] == [0, 1, 2]
    assert math.isclose(few["dice"]["mean"]["mean"], 0.60) and math.isclose(few["dice"]["mean"]["std"], 0.10)
    assert math.isclose(few["dice"]["A"]["mean"], 0.50) and math.isclose(few["dice"]["A"]["std"], 0.10)
    assert few["gain"]["mean"] is None and few["gap_closed"] is None  # the reference itself
    sp = by[(SP, 1)]
    assert math.isclose(sp["dice"]["mean"]["mean"], 0.65)
    assert math.isclose(sp["dice"]["mean"]["std"], math.sqrt(0.0075))  # deviations -0.1, 0.05, 0.05
    assert math.isclose(sp["dice"]["P"]["mean"], 0.70) and math.isclose(sp["dice"]["P"]["std"], 0.10)
    # paired gains 0.05, 0.10, 0.00 -> mean 0.05, std 0.05
    assert math.isclose(sp["gain"]["mean"], 0.05) and math.isclose(sp["gain"]["std"], 0.05)
    # gap closed = (0.65 - 0.60) / (0.80 - 0.60)
    assert math.isclose(sp["gap_closed"], 0.25)
    full = by[(BASELINE, "all")]
    assert math.isclose(full["dice"]["mean"]["mean"], 0.80) and math.isclose(full["dice"]["mean"]["std"], 0.0,
                                                                             abs_tol=1e-12)
    assert math.isclose(full["dice"]["A"]["std"], 0.10)
    sp_all = by[(SP, "all")]
    # two seeds only: gain paired over seeds 0 and 1 (0.02, 0.00); no gap closed at N = all
    assert sp_all["n_seeds"] == 2 and sp_all["gain"]["seeds"] == [0, 1]
    assert math.isclose(sp_all["gain"]["mean"], 0.01) and math.isclose(sp_all["gain"]["std"], math.sqrt(0.0002))
    assert sp_all["gap_closed"] is None


def test_summarize_missing_runs_and_single_seed():
    res = [_run(BASELINE, 2, 0, 0.5, 0.7), _run(SP, 2, 0, 0.6, 0.8)]
    rows = R.summarize(res, [BASELINE, SP], [2, "all"], ["A", "P"], BASELINE)
    sp = [r for r in rows if r["trainer"] == SP and r["num_labeled"] == 2][0]
    assert sp["dice"]["mean"]["std"] is None  # one seed
    assert math.isclose(sp["gain"]["mean"], 0.1) and sp["gain"]["std"] is None
    assert sp["gap_closed"] is None  # no full-supervision run
    missing = [r for r in rows if r["num_labeled"] == "all"]
    assert all(r["n_seeds"] == 0 and r["dice"]["mean"]["mean"] is None for r in missing)


def test_markdown_table_cells():
    rows = R.summarize(_results(), [BASELINE, SP], [1, "all"], ["A", "P"], BASELINE)
    md = R.label_efficiency_markdown(rows, ["A", "P"], BASELINE, num_train=156)
    lines = md.splitlines()
    assert lines[0] == (f"| N labeled | trainer | seeds | Dice A | Dice P | mean Dice | validation mean Dice | "
                        f"gain vs {BASELINE} | 95 % CI over seeds | 95 % CI over test volumes | gap closed |")
    assert lines[2] == (f"| 1 | {BASELINE} | 3 | 0.500 ± 0.100 | 0.700 ± 0.100 | 0.600 ± 0.100 | — | (reference) | — "
                        f"| — | — |")
    # gains 0.05, 0.10, 0.00: 0.05 ± t(0.975, 2) = 4.3027 (table value) x 0.05 / sqrt(3) = 0.1242; no per-case Dice
    assert lines[3] == (f"| 1 | {SP} | 3 | 0.600 ± 0.100 | 0.700 ± 0.100 | 0.650 ± 0.087 | — | +0.050 ± 0.050 | "
                        f"[-0.074, +0.174] | — | 0.25 |")
    assert lines[5].startswith(f"| all (156) | {SP} | 2 | 0.810 ± 0.014 |")
    # gains 0.02, 0.00: 0.01 ± t(0.975, 1) = 12.706 x 0.01414 / sqrt(2) = 0.1271
    assert lines[5].endswith("| +0.010 ± 0.014 | [-0.117, +0.137] | — | — |")


def test_intervals_hand_computed_and_invariants():
    import numpy as np

    lo, hi = R.t_interval([1.0, 2.0, 3.0])  # mean 2, std 1, t(0.975, 2) = 4.302653 from the t table
    assert math.isclose(lo, 2 - 4.302653 / math.sqrt(3), abs_tol=1e-5)
    assert math.isclose(hi, 2 + 4.302653 / math.sqrt(3), abs_tol=1e-5)
    assert R.t_interval([0.3]) is None and R.bootstrap_interval([]) is None
    assert R.bootstrap_interval([0.1] * 12) == pytest.approx((0.1, 0.1))
    x = np.random.default_rng(5).normal(0.05, 0.2, size=400)
    lo, hi = R.bootstrap_interval(x)
    half = 1.96 * x.std(ddof=1) / math.sqrt(x.size)  # normal approximation of the mean's interval
    assert lo < x.mean() < hi
    assert math.isclose(hi - lo, 2 * half, rel_tol=0.1)
    assert math.isclose((lo + hi) / 2, x.mean(), abs_tol=0.1 * half)
    assert R.bootstrap_interval(x) == (lo, hi)  # reproducible
    assert R.bootstrap_interval(x + 1.0) == pytest.approx((lo + 1.0, hi + 1.0))  # shifts with the data


def test_paired_case_differences_average_over_common_seeds():
    ours = {0: {"a": 0.5, "b": 0.7}, 1: {"a": 0.6, "b": None}, 3: {"a": 0.9}}
    base = {0: {"a": 0.4, "b": 0.6, "c": 0.1}, 1: {"a": 0.4, "b": 0.5}, 2: {"a": 0.0}}
    # a: seeds 0, 1 -> (0.1 + 0.2) / 2; b: seed 0 only (seed 1 has no Dice) -> 0.1; c: only in base -> left out
    d = R.paired_case_differences(ours, base)
    assert d == pytest.approx([0.15, 0.1])
    res = [dict(_run(BASELINE, 1, s, 0.5, 0.5), dice_per_case={c: {"mean": v} for c, v in base[s].items()})
           for s in (0, 1)]
    res += [dict(_run(SP, 1, s, 0.6, 0.6), dice_per_case={c: {"mean": v} for c, v in ours[s].items()})
            for s in (0, 1)]
    res[2]["val_dice"], res[3]["val_dice"] = {"mean": 0.4}, {"mean": 0.6}  # SPCon's validation Dice, seeds 0, 1
    sp = [r for r in R.summarize(res, [BASELINE, SP], [1], ["A", "P"], BASELINE) if r["trainer"] == SP][0]
    assert sp["val_dice"]["mean"] == pytest.approx(0.5) and sp["val_dice"]["std"] == pytest.approx(math.sqrt(0.02))
    assert sp["gain"]["n_cases"] == 2 and sp["gain"]["ci_cases"] == pytest.approx(R.bootstrap_interval([0.15, 0.1]))


def test_dice_per_case_from_an_nnunet_summary():
    from nnunet_contrastive.prep.pipeline import dice_per_case

    summary = {"metric_per_case": [
        {"prediction_file": "/p/patient001_frame01.nii.gz", "reference_file": "/r/x.nii.gz",
         "metrics": {"1": {"Dice": 0.5}, "2": {"Dice": float("nan")}, "3": {"Dice": 0.9}}},
        {"prediction_file": "/p/case_2.png", "metrics": {"1": {"Dice": 0.2}, "2": {"Dice": 0.4},
                                                          "3": {"Dice": 0.0}}}]}
    out = dice_per_case(summary, {"background": 0, "RV": 1, "MYO": 2, "LV": 3})
    assert out["patient001_frame01"] == {"RV": 0.5, "MYO": None, "LV": 0.9, "mean": pytest.approx(0.7)}
    assert out["case_2"]["mean"] == pytest.approx(0.2)


def test_plot_is_written_and_small(tmp_path):
    rows = R.summarize(_results(), [BASELINE, SP], [1, "all"], ["A", "P"], BASELINE)
    path = R.plot_dice_vs_labeled(rows, [BASELINE, SP], BASELINE, 156, str(tmp_path / "p.png"), "t")
    assert path and os.path.getsize(path) < 200_000


# ------------------------------------------------------------------------------------------------ input checks
def test_parse_num_labeled():
    assert parse_num_labeled(["all", "4", "1", "2", "4"]) == [1, 2, 4, "all"]
    assert parse_num_labeled(["ALL"]) == ["all"]
    for bad in (["0"], ["-1"], ["two"], ["1.5"], []):
        with pytest.raises(BenchmarkError):
            parse_num_labeled(bad)


def test_resolve_trainers():
    assert resolve_trainers(None) == [BASELINE, SP]
    assert resolve_trainers([SP, "nnUNetTrainerMeanTeacher"]) == [BASELINE, SP, "nnUNetTrainerMeanTeacher"]
    with pytest.raises(BenchmarkError, match="unknown trainer 'nnUNetTrainerNope'"):
        resolve_trainers(["nnUNetTrainerNope"])
    with pytest.raises(BenchmarkError, match="segments nothing"):
        resolve_trainers(["nnUNetTrainerSPConPretrain"])


def test_budget_statement_and_checks():
    b = Budget(epochs=10, iterations=60, val_iterations=4, pretrain_epochs=2, pretraining="inside")
    text = b.describe([SP])
    assert b.total_iterations == 600
    assert "10 epochs x 60 iterations = 600" in text and "2x60 = 120 contrastive pre-training + 8x60 = 480" in text
    check_budget(b, [BASELINE, SP])
    with pytest.raises(BenchmarkError, match="pretrain-epochs"):
        check_budget(Budget(2, 5, 1, 2, pretraining="inside"), [BASELINE, SP])
    sep = Budget(epochs=10, iterations=60, val_iterations=4, pretrain_epochs=2)  # the default regime
    text = sep.describe([SP])
    assert "the same 10x60 = 600 iterations after 2x60 = 120 label-free pre-training" in text
    check_budget(Budget(2, 5, 1, 2), [BASELINE, SP])  # separate: pre-training may be as long as the run
    with pytest.raises(BenchmarkError, match="pretrain-epochs must be >= 1"):
        check_budget(Budget(2, 5, 1, 0), [BASELINE, SP])
    check_budget(Budget(2, 5, 1, 2), [BASELINE])  # no two-stage trainer: no constraint
    with pytest.raises(BenchmarkError, match="--iterations"):
        check_budget(Budget(2, 0, 1, 1), [BASELINE])


def test_missing_data_is_a_clear_error(tmp_path):
    with pytest.raises(BenchmarkError, match="--data"):
        check_data(str(tmp_path / "nowhere"))
    with pytest.raises(BenchmarkError, match="ssl4mis_split.json"):
        check_data(str(tmp_path / "nowhere"), "acdc")


def test_acdc_split_and_labeled_patients_follow_the_published_protocol():
    """Split by patient from ssl4mis_split.json; seed 0 labels the first N patients of its train list (both
    frames), other seeds draw N whole patients."""
    from nnunet_contrastive.bench.datasets import ACDC

    split = {"train": ["patient003", "patient001", "patient004", "patient002"], "val": ["patient005"],
             "test": ["patient006"]}
    groups = {f"patient{p:03d}_frame{f:02d}": f"patient{p:03d}" for p in range(1, 7) for f in (1, 12)}
    cases = sorted(groups)

    class Spec(type(ACDC)):
        def published_split(self, src):
            return split

    spec = Spec(**{f.name: getattr(ACDC, f.name) for f in ACDC.__dataclass_fields__.values()})
    test, pool, val, dropped = spec.split("src", cases, groups, None, None, None, 0)
    assert test == ["patient006_frame01", "patient006_frame12"] and val == ["patient005_frame01", "patient005_frame12"]
    assert len(pool) == 10 and not dropped and not set(test) & set(pool)
    train = [c for c in pool if c not in val]
    first = spec.labeled(train, 1, 0, groups, split["train"])
    assert first == ["patient003_frame01", "patient003_frame12"]
    assert {groups[c] for c in spec.labeled(train, 2, 0, groups, split["train"])} == {"patient003", "patient001"}
    other = spec.labeled(train, 2, 1, groups, split["train"])
    assert len(other) == 4 and len({groups[c] for c in other}) == 2  # whole patients
    assert spec.labeled(train, "all", 3, groups, split["train"]) == sorted(train)
    _, small_pool, _, small_dropped = spec.split("src", cases, groups, 1, 1, 2, 0)
    assert {groups[c] for c in small_pool} == {"patient003", "patient001", "patient005"} and small_dropped


def test_cli_bad_input_exits_1(tmp_path):
    from nnunet_contrastive.cli import main

    wd = str(tmp_path / "wd")
    assert main(["benchmark", "--workdir", wd, "--data", str(tmp_path / "nowhere")]) == 1
    assert main(["benchmark", "--workdir", wd, "--trainers", "nnUNetTrainerNope"]) == 1
    assert main(["benchmark", "--workdir", wd, "--num-labeled", "0"]) == 1
    assert main(["benchmark", "--workdir", wd, "--seeds", "-1"]) == 1
    assert main(["benchmark", "--workdir", wd, "--split-seed", "-3"]) == 1
    assert not os.path.exists(wd)  # nothing written on bad input


# ------------------------------------------------------------------------------------------------ --quick
@pytest.mark.slow
def test_quick_benchmark_end_to_end(hippocampus_dir, tmp_path):
    from conftest import cli_env
    from nnunet_contrastive.prep.pipeline import console_script

    wd = tmp_path / "bench"
    env = cli_env({})
    t0 = time.time()
    out = subprocess.run([console_script("nnunet-contrastive"), "benchmark", "--quick", "--workdir", str(wd),
                          "--data", hippocampus_dir], env=env, capture_output=True, text=True, timeout=600)
    wall = time.time() - t0
    assert out.returncode == 0, f"{out.stdout[-4000:]}\n{out.stderr[-4000:]}"
    assert "QUICK MODE" in out.stdout and "mean nothing" in out.stdout
    report = wd / "report"
    md = (report / "results.md").read_text()
    assert "QUICK MODE" in md and "mean nothing" in md
    assert (report / "dice_vs_labeled.png").stat().st_size < 200_000
    res = json.loads((report / "results.json").read_text())
    assert res["quick"] and res["finished"] and not res["failures"]
    setup = json.loads((wd / "benchmark_setup.json").read_text())
    # the held-out test volumes are never in the training pool, and were never preprocessed
    assert not set(setup["test"]) & set(setup["pool"])
    pre = wd / "nnUNet_preprocessed" / "Dataset942_Hippocampus"
    assert sorted(f[:-len(".nii.gz")] for f in os.listdir(pre / "gt_segmentations")) == sorted(setup["pool"])
    runs = {(r["trainer"], r["num_labeled"]) for r in res["runs"]}
    assert runs == {(BASELINE, 1), (BASELINE, "all"), (SP, 1), (SP, "all")}
    for r in res["runs"]:
        assert r["num_test"] == len(setup["test"]) and set(r["dice"]) == {"Anterior", "Posterior", "mean"}
        assert len(r["labeled"]) == (1 if r["num_labeled"] == 1 else r["num_train"])
    assert res["budget"]["total_iterations"] == res["budget"]["epochs"] * res["budget"]["iterations"]
    # label-free pre-training ran once for the seed and both N fine-tuned from it; FewLabels has a learning curve
    pre = {json.dumps(r["pretraining"], sort_keys=True) for r in res["runs"] if r["trainer"] == SP}
    assert len(pre) == 1 and json.loads(pre.pop())["iterations"] == res["budget"]["pretrain_epochs"] * \
        res["budget"]["iterations"]
    assert all(r["pretraining"] is None and len(r["val_curve"]) == res["budget"]["epochs"]
               for r in res["runs"] if r["trainer"] == BASELINE)
    assert "Label-free pre-training" in md and (report / "learning_curve.png").is_file()
    stages = [(c["trainer"], c["stage"]) for c in res["cost"]["trainers"]]
    assert stages == [("nnUNetTrainer", None), (BASELINE, None), (SP, 1), (SP, 2)]
    assert res["cost"]["trainers"][0]["s_per_it_ratio"] == 1.0
    # every measured step gave a finite loss, and our staged trainer's named loss terms were looked at too
    assert all(c["loss_finite"] is True for c in res["cost"]["trainers"])
    assert res["cost"]["trainers"][2]["term_losses"] and not res["cost"]["trainers"][0]["term_losses"]
    assert all(r["max_abs_diff"] < 1e-4 for r in res["cost"]["loss"]["rows"])
    # resuming: a second invocation skips every finished run and measurement
    out2 = subprocess.run([console_script("nnunet-contrastive"), "benchmark", "--quick", "--workdir", str(wd),
                           "--data", hippocampus_dir], env=env, capture_output=True, text=True, timeout=300)
    assert out2.returncode == 0, out2.stdout[-3000:] + out2.stderr[-3000:]
    assert out2.stdout.count("skipped") == 4 and "nnUNetv2_train" not in out2.stdout
    res2 = json.loads((report / "results.json").read_text())
    assert res2["wall"]["invocations"] == 2 and res2["wall"]["total_s"] >= res["wall"]["total_s"]
    # every test volume's Dice is kept, and the paired gain has its interval over test volumes
    assert all(len(r["dice_per_case"]) == len(setup["test"]) for r in res2["runs"])
    assert all(0 <= r["val_dice"]["mean"] <= 1 for r in res2["runs"])  # nnU-Net's final validation, full volumes
    sp1 = [r for r in res2["summary"] if r["trainer"] == SP and r["num_labeled"] == 1][0]
    assert sp1["gain"]["n_cases"] == len(setup["test"]) and sp1["gain"]["ci_cases"] is not None
    # a run interrupted mid-training continues from checkpoint_latest.pth with --c (here: its last epoch again)
    import torch

    run = next((wd / "runs").glob(f"*/{BASELINE}/N1_seed0"))
    fold = next(run.glob("nnUNet_results/*/*/fold_0"))
    ck = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    last = ck["current_epoch"] - 1
    ck["current_epoch"] = last
    torch.save(ck, fold / "checkpoint_latest.pth")
    os.remove(fold / "checkpoint_final.pth")
    os.remove(run / "result.json")
    out3 = subprocess.run([console_script("nnunet-contrastive"), "benchmark", "--quick", "--workdir", str(wd),
                           "--data", hippocampus_dir], env=env, capture_output=True, text=True, timeout=300)
    assert out3.returncode == 0, out3.stdout[-3000:] + out3.stderr[-3000:]
    assert f"resumed at epoch {last} (--c)" in out3.stdout and out3.stdout.count("skipped") == 3
    assert (fold / "checkpoint_final.pth").is_file() and not (fold / "checkpoint_latest.pth").exists()
    resumed = json.loads((run / "result.json").read_text())
    assert resumed["resumed_at_epoch"] == last and len(resumed["val_curve"]) == res["budget"]["epochs"]
    assert "resumed mid-training" in (report / "results.md").read_text()
    # --report-only: the finished runs' report, nothing trains, the missing runs are listed, no invocation counted
    out4 = subprocess.run([console_script("nnunet-contrastive"), "benchmark", "--quick", "--workdir", str(wd),
                           "--data", hippocampus_dir, "--seeds", "0", "1", "--report-only", "--out",
                           str(tmp_path / "partial")], env=env, capture_output=True, text=True, timeout=300)
    assert out4.returncode == 0, out4.stdout[-3000:] + out4.stderr[-3000:]
    assert "nnUNetv2_train" not in out4.stdout
    part = json.loads((tmp_path / "partial" / "results.json").read_text())
    assert len(part["runs"]) == 4 and {p["seed"] for p in part["pending"]} == {1} and len(part["pending"]) == 4
    assert not part["finished"] and part["wall"]["invocations"] == 3
    assert "Runs without a result yet" in (tmp_path / "partial" / "results.md").read_text()
    print(f"quick benchmark: {wall:.0f} s")


@pytest.mark.slow
def test_quick_benchmark_acdc(acdc_dir, tmp_path):
    """--dataset acdc: the published split by patient, test patients held out before planning, per-structure Dice."""
    from conftest import cli_env
    from nnunet_contrastive.prep.pipeline import console_script

    wd = tmp_path / "bench_acdc"
    out = subprocess.run([console_script("nnunet-contrastive"), "benchmark", "--dataset", "acdc", "--quick",
                          "--workdir", str(wd), "--data", acdc_dir, "--skip-cost", "--trainers",
                          "nnUNetTrainerMeanTeacher"], env=cli_env({}), capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, f"{out.stdout[-4000:]}\n{out.stderr[-4000:]}"
    res = json.loads((wd / "report" / "results.json").read_text())
    setup = json.loads((wd / "benchmark_setup.json").read_text())
    split = json.load(open(os.path.join(acdc_dir, "ssl4mis_split.json")))
    assert {setup["groups"][c] for c in setup["test"]} == {split["test"][0]}
    assert {setup["groups"][c] for c in setup["val"]} == {split["val"][0]}
    pre = wd / "nnUNet_preprocessed" / "Dataset944_ACDC"
    assert sorted(f[:-len(".nii.gz")] for f in os.listdir(pre / "gt_segmentations")) == sorted(setup["pool"])
    # the CPU tier: the acdc_cpu plans, preprocessed at 2.5 mm in-plane for every pool case
    assert res["data"]["plans"] == "nnUNetPlans_acdc_cpu"
    plans = json.loads((pre / "nnUNetPlans_acdc_cpu.json").read_text())["configurations"]["2d"]
    assert plans["spacing"] == [2.5, 2.5]
    assert sorted(f[:-4] for f in os.listdir(pre / plans["data_identifier"]) if f.endswith(".pkl")) == \
        sorted(setup["pool"])
    ceiling = res["data"]["resolution_ceiling"]  # 2.5 mm caps the Dice a perfect network could reach
    assert set(ceiling) == {"1", "2", "3", "mean"} and 0.8 < ceiling["mean"] < 1.0
    assert "resolution ceiling" in (wd / "report" / "results.md").read_text()
    for r in res["runs"]:
        assert r["num_test"] == 2 and len(r["dice"]) == 4  # three structures + mean
        if r["num_labeled"] == 1:  # seed 0: the first patient of the published train list, both frames
            assert {setup["groups"][c] for c in r["labeled"]} == {split["train"][0]} and len(r["labeled"]) == 2
    assert "ACDC" in (wd / "report" / "results.md").read_text()


def test_plans_override_picks_the_run_folders_and_is_checked(tmp_path):
    """Each plans override gets its own run folders (results of different plans never mix); cpu_small keeps the
    plain budget tag of earlier work folders; a bad --plans-override fails before anything is written."""
    import argparse

    from nnunet_contrastive.bench.benchmark import NO_OVERRIDE
    from nnunet_contrastive.cli import main
    from nnunet_contrastive.commands.benchmark import build_config, register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())

    def cfg(*extra):
        return build_config(parser.parse_args(["benchmark", "--workdir", str(tmp_path / "w"), *extra]))[0]

    hip, acdc = cfg(), cfg("--dataset", "acdc")
    assert hip.override == "cpu_small" and hip.tag == hip.budget.tag
    assert acdc.override == "acdc_cpu" and acdc.tag == acdc.budget.tag + "_acdc_cpu"
    gpu = cfg("--dataset", "acdc", "--plans-override", "none")
    assert gpu.override == NO_OVERRIDE and gpu.tag.endswith("_nnUNetPlans")
    custom = tmp_path / "my_plans.json"
    custom.write_text('{"configurations": {"2d": {"batch_size": 4}}}')
    assert cfg("--plans-override", str(custom)).tag.endswith("_my_plans")
    wd = str(tmp_path / "wd")
    assert main(["benchmark", "--workdir", wd, "--plans-override", "no_such_override"]) == 1
    assert not os.path.exists(wd)


def test_interrupted_run_resumes_from_its_latest_checkpoint(tmp_path, monkeypatch):
    """An interrupted run continues with `--c` (without -pretrained_weights, which nnU-Net refuses with --c) from
    checkpoint_latest.pth and keeps its folder; a run killed before its first epoch ended starts again from an
    empty folder; a finished one trains nothing. Benchmark runs write checkpoint_latest.pth every epoch."""
    import torch

    from nnunet_contrastive.bench.benchmark import Prepared, run_env, train_or_resume
    from nnunet_contrastive.prep import pipeline
    from nnunet_contrastive.trainers.base import schedule_from_env

    calls = []
    monkeypatch.setattr(pipeline, "train", lambda *a, extra=(), **k: calls.append(list(extra)))
    cfg = Budget(epochs=3, iterations=2, val_iterations=1, pretrain_epochs=1)
    conf = type("C", (), {"dataset_id": 1, "device": "cpu"})()
    prep = Prepared(raw="", pre="", dataset="D", plans="P", labels={}, classes=[], train=[], val=[], test=[])
    results = tmp_path / "nnUNet_results"
    fold = results / "D" / "T__P__2d" / "fold_0"  # nnU-Net's layout inside the run folder
    fold.mkdir(parents=True)
    marker = results / "keep.txt"
    marker.write_text("x")
    logs = []

    def go():
        return train_or_resume(conf, prep, {}, "T", str(tmp_path), ["-pretrained_weights", "w.pth"],
                               str(tmp_path / "log.txt"), logs.append, "T N=1")

    assert go() is None and calls == [["-pretrained_weights", "w.pth"]]  # fresh start
    assert not results.exists()  # the empty leftovers of a run killed before its first epoch are removed
    fold.mkdir(parents=True)
    marker.write_text("x")
    torch.save({"current_epoch": 7, "network_weights": {}, "optimizer_state": {}}, fold / "checkpoint_latest.pth")
    assert go() == 7 and calls[-1] == ["--c"] and marker.exists()
    assert "resumed at epoch 7" in logs[-1]
    (fold / "checkpoint_final.pth").write_bytes(b"")
    n_calls = len(calls)
    assert go() is None and len(calls) == n_calls  # finished: nothing trains
    env = run_env({}, BASELINE, cfg, str(results), seed=0)
    assert schedule_from_env(env)["save_every"] == 1


def test_runs_without_pretraining_are_reused_across_pretraining_settings(tmp_path):
    """A trainer without label-free pre-training runs identically whatever --pretrain-epochs / --pretraining say,
    so its finished run in such a sibling budget folder is reused (recorded); nothing else is."""
    import argparse

    from nnunet_contrastive.bench.benchmark import Prepared, finished_result, run_dir
    from nnunet_contrastive.commands.benchmark import build_config, register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    wd = str(tmp_path / "w")

    def cfg(*extra):
        return build_config(parser.parse_args(["benchmark", "--workdir", wd, "--epochs", "3", "--iterations", "2",
                                               *extra]))[0]

    prep = Prepared(raw="", pre="", dataset="D", plans="P", labels={"a": 1}, classes=["a"], train=[], val=[],
                    test=[])
    old = cfg("--pretrain-epochs", "2")
    for tr in (BASELINE, SP):
        folder = run_dir(old, tr, 1, 0)
        os.makedirs(folder)
        with open(os.path.join(folder, "result.json"), "w") as f:
            json.dump({"trainer": tr, "dice": {"a": 0.5, "mean": 0.5}, "val_dice": None}, f)
    new = cfg("--pretrain-epochs", "10")
    res = finished_result(new, prep, BASELINE, 1, 0)
    assert res["dice"]["mean"] == 0.5 and res["reused_from"] == run_dir(old, BASELINE, 1, 0)
    assert os.path.isfile(os.path.join(run_dir(new, BASELINE, 1, 0), "result.json"))  # copied: found directly next time
    assert finished_result(new, prep, SP, 1, 0) is None  # its pre-training differs: must run
    assert finished_result(cfg("--pretraining", "inside"), prep, BASELINE, 1, 0)["reused_from"]
    assert finished_result(cfg("--pretrain-epochs", "10", "--disable-tta"), prep, BASELINE, 1, 0) is None  # TTA differs
    assert finished_result(build_config(parser.parse_args(
        ["benchmark", "--workdir", wd, "--epochs", "4", "--iterations", "2"]))[0], prep, BASELINE, 1, 0) is None


def test_import_results_takes_only_runs_made_under_the_same_conditions(tmp_path):
    """--import-results copies an earlier report's runs into a new work folder when they are this benchmark's runs
    under the same conditions (cases, labeled cases, plans, budget; pre-training settings only for trainers that
    pre-train), keeps this folder's own runs, and rejects a report of other cases outright."""
    import argparse

    from nnunet_contrastive.bench.benchmark import Prepared, finished_result, import_results, run_dir
    from nnunet_contrastive.commands.benchmark import build_config, register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())

    def cfg(*extra):
        return build_config(parser.parse_args(["benchmark", "--dataset", "acdc", "--workdir", str(tmp_path / "w"),
                                               "--epochs", "3", "--iterations", "2", "--pretrain-epochs", "1",
                                               "--num-labeled", "1", "--seeds", "0", "1", "--trainers", SP,
                                               *extra]))[0]

    # published order: patient B first, so N = 1, seed 0 labels B's two frames
    train = ["A_f1", "A_f2", "B_f1", "B_f2", "C_f1", "C_f2"]
    groups = {c: c.split("_")[0] for c in train}
    prep = Prepared(raw="", pre="", dataset="D", plans="P", labels={"x": 1}, classes=["x"], train=train,
                    val=["V_f1"], test=["T_f1", "T_f2"], groups=groups, train_order=["B", "A", "C"])
    budget = {"epochs": 3, "iterations": 2, "val_iterations": 4, "pretrain_epochs": 1, "disable_tta": False,
              "pretraining": "separate"}

    def rec(trainer, seed=0, labeled=("B_f1", "B_f2"), **kw):
        r = {"trainer": trainer, "num_labeled": 1, "seed": seed, "labeled": list(labeled), "plans": "P",
             "budget": dict(budget), "dice": {"x": 0.4, "mean": 0.4}, "val_dice": None,
             "dice_per_case": {"T_f1": {"x": 0.3}, "T_f2": {"x": 0.5}}}
        r.update(kw)
        return r

    runs = [rec(BASELINE, budget=dict(budget, pretrain_epochs=9)),  # no pre-training: the setting does not reach it
            rec(SP, budget=dict(budget, pretrain_epochs=9)),  # pre-trains: another pre-training, not imported
            rec(BASELINE, seed=1, labeled=("A_f1", "C_f2")),  # one frame of two patients: never a draw of N = 1
            rec("nnUNetTrainerPLCon"),  # not a trainer of this benchmark: ignored
            rec(SP, seed=1, labeled=("A_f1",), plans="Q")]
    report = tmp_path / "results.json"
    data = {"train": train, "val": ["V_f1"], "test": ["T_f2", "T_f1"]}
    report.write_text(json.dumps({"config": {"dataset": "acdc"}, "data": data, "runs": runs}))
    c = cfg("--import-results", str(report))
    assert c.imports == [str(report)]
    logs = []
    written = import_results(c, prep, c.imports, log=logs.append)
    assert written == [run_dir(c, BASELINE, 1, 0)]
    res = finished_result(c, prep, BASELINE, 1, 0)
    assert res["imported_from"] == str(report) and res["dice"]["mean"] == 0.4
    assert finished_result(c, prep, SP, 1, 0) is None and finished_result(c, prep, BASELINE, 1, 1) is None
    text = "\n".join(logs)
    assert "nnUNetTrainerSPCon N=1 seed=0: budget" in text and "other labeled cases" in text and "plans Q" in text
    assert "PLCon" not in text
    # this folder's own run is kept
    with open(os.path.join(run_dir(c, BASELINE, 1, 0), "result.json"), "w") as f:
        json.dump(rec(BASELINE, dice={"x": 0.9, "mean": 0.9}), f)
    logs.clear()
    assert import_results(c, prep, c.imports, log=logs.append) == []
    assert finished_result(c, prep, BASELINE, 1, 0)["dice"]["mean"] == 0.9
    assert any("N=1 seed=0: already in this work folder" in m and "kept" in m for m in logs)
    # a report of other test cases cannot be compared at all
    report.write_text(json.dumps({"config": {"dataset": "acdc"}, "data": dict(data, test=["T_f1"]), "runs": runs}))
    with pytest.raises(BenchmarkError, match="test cases differ"):
        import_results(c, prep, c.imports)
    report.write_text(json.dumps({"runs": 3}))
    with pytest.raises(BenchmarkError, match="not a benchmark report"):
        import_results(c, prep, c.imports)


def test_warmup_keys_group_the_plcon_variants_that_train_the_same_warmup():
    """Trainers share a warm-up only when it is declared the same: the half-run warm-up of PLConLongWarmup, its
    self-training variant, LowCE and Confident (they differ after it); not OneLR (its warm-up LR decays over the
    whole run; the OneLR variants share theirs), not the quarter warm-up, not another pixel-head size; the key follows
    the run length; trainers without a kept stage have none."""
    from nnunet_contrastive.bench.benchmark import _warmup_key
    from nnunet_contrastive.trainers import nnUNetTrainerPLConLongWarmup

    b = Budget(epochs=30, iterations=100, val_iterations=4, pretrain_epochs=10)
    env = {"nnUNet_contrastive_epochs": "30"}

    def key(t, e=env):
        return _warmup_key(t, b, e)

    stage, lw = key("nnUNetTrainerPLConLongWarmup")
    assert stage == "warmup" and lw is not None
    assert key("nnUNetTrainerPLConSelfTrainLongWarmup")[1] == lw
    assert key("nnUNetTrainerPLConSelfTrainLongWarmupLowCE")[1] == lw
    assert key("nnUNetTrainerPLConLongWarmupConfident")[1] == lw
    assert key("nnUNetTrainerPLConSelfTrainLongWarmupOneLR")[1] not in (None, lw)
    assert key("nnUNetTrainerPLConLongWarmupOneLR")[1] == key("nnUNetTrainerPLConSelfTrainLongWarmupOneLR")[1]
    assert key("nnUNetTrainerPLCon")[1] not in (None, lw)
    assert key("nnUNetTrainerPLCon")[1] == key("nnUNetTrainerPLConSG")[1] == key("nnUNetTrainerPLConSelfTrain")[1]
    assert key("nnUNetTrainerPLConLongWarmup", {"nnUNet_contrastive_epochs": "20"})[1] != lw

    class Wide(nnUNetTrainerPLConLongWarmup):
        embedding_dim = 32

    from unittest import mock

    with mock.patch.dict(os.environ, env, clear=True):
        assert Wide.warmup_key(30, env) not in (None, lw)
    assert key(BASELINE) == (None, None) and key(SP) == (None, None)


def test_share_warmup_starts_a_run_from_an_equal_warmup_of_the_same_labeled_cases(tmp_path):
    """--share-warmup copies another trainer's end-of-warm-up checkpoint (same budget folder, N, seed; equal
    warm-up key; same labeled cases in the checkpoint) to the new run's checkpoint_latest.pth and records it; never
    without the flag, never over a run's own checkpoint, never from an unequal warm-up or other labeled cases."""
    import argparse

    import torch

    from nnunet_contrastive.bench.benchmark import (WARMUP_FILE, Prepared, run_dir, run_env, run_fold_dir,
                                                    start_from_warmup)
    from nnunet_contrastive.commands.benchmark import build_config, register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    wd = str(tmp_path / "w")

    def cfg(*extra):
        return build_config(parser.parse_args(["benchmark", "--workdir", wd, "--epochs", "30", *extra]))[0]

    prep = Prepared(raw="", pre="", dataset="D", plans="P", labels={"x": 1}, classes=["x"], train=[], val=[],
                    test=[])
    on, off = cfg("--share-warmup"), cfg()
    src_tr, tr = "nnUNetTrainerPLConSelfTrainLongWarmup", "nnUNetTrainerPLConLongWarmup"
    src_fold = run_fold_dir(run_dir(on, src_tr, 3, 1), prep, src_tr)
    os.makedirs(src_fold)
    src = os.path.join(src_fold, "checkpoint_warmup_end.pth")
    torch.save({"current_epoch": 15, "network_weights": {}, "optimizer_state": {},
                "nnunet_contrastive": {"labeled_keys": ["b", "a"]}}, src)

    def env(c, t):
        return run_env({}, t, c.budget, os.path.join(run_dir(c, t, 3, 1), "nnUNet_results"), seed=1)

    logs = []
    assert start_from_warmup(off, prep, tr, 3, 1, env(off, tr), ["a", "b"], logs.append) is None
    fold = run_fold_dir(run_dir(on, tr, 3, 1), prep, tr)
    assert not os.path.exists(fold)
    assert start_from_warmup(on, prep, tr, 3, 1, env(on, tr), ["a", "c"], logs.append) is None  # other labels
    info = start_from_warmup(on, prep, tr, 3, 1, env(on, tr), ["a", "b"], logs.append)
    assert info["trainer"] == src_tr and info["epoch"] == 15 and info["stage"] == "warmup"
    with open(os.path.join(fold, "checkpoint_latest.pth"), "rb") as f, open(src, "rb") as g:
        assert f.read() == g.read()
    with open(os.path.join(run_dir(on, tr, 3, 1), WARMUP_FILE)) as f:
        assert json.load(f) == info
    assert "starts from the end of " + src_tr in logs[-1]
    assert start_from_warmup(on, prep, tr, 3, 1, env(on, tr), ["a", "b"]) == info  # recorded: the same again
    one_lr = "nnUNetTrainerPLConSelfTrainLongWarmupOneLR"  # its warm-up differs
    assert start_from_warmup(on, prep, one_lr, 3, 1, env(on, one_lr), ["a", "b"]) is None
    assert start_from_warmup(on, prep, tr, 3, 2, env(on, tr), ["a", "b"]) is None  # another seed
    low = "nnUNetTrainerPLConSelfTrainLongWarmupLowCE"
    own = run_fold_dir(run_dir(on, low, 3, 1), prep, low)
    os.makedirs(own)
    torch.save({"current_epoch": 3}, os.path.join(own, "checkpoint_latest.pth"))
    assert start_from_warmup(on, prep, low, 3, 1, env(on, low), ["a", "b"]) is None  # its own progress is kept
    assert torch.load(os.path.join(own, "checkpoint_latest.pth"))["current_epoch"] == 3


def test_per_seed_table_hand_computed():
    res = _results()
    res[0]["labeled"] = ["case_a", "case_b"]
    res[6]["val_dice"] = {"mean": 0.61}
    md = R.per_seed_markdown(res + [_run(SP, 2, 0, 0.1, 0.1)], [BASELINE, SP], [1, "all", 2], BASELINE, 156)
    lines = md.splitlines()
    assert lines[0] == (f"| N labeled | seed | labeled cases | {BASELINE} test / validation "
                        f"| {SP} test (gain) / validation |")
    # N = 1, seeds 0-2 (baseline 0.50, 0.60, 0.70; SPCon 0.55, 0.70, 0.70); no baseline at N = 2, no all-labeled rows
    assert lines[2:] == [
        "| 1 | 0 | case_a, case_b | 0.500 / — | 0.550 (+0.050) / 0.610 |",
        "| 1 | 1 | — | 0.600 / — | 0.700 (+0.100) / — |",
        "| 1 | 2 | — | 0.700 / — | 0.700 (+0.000) / — |",
    ]
    # a seed where the method did not run shows a dash, not a gain
    md = R.per_seed_markdown([r for r in res if not (r["trainer"] == SP and r["seed"] == 1)], [BASELINE, SP], [1],
                             BASELINE, 156)
    assert md.splitlines()[3] == "| 1 | 1 | — | 0.600 / — | — |"
