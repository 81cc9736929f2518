"""README command 1: `nnunet-contrastive demo` runs the whole pipeline and prints its table (tiny settings here)."""
import re

import pytest

from conftest import cli_env, run_cli

pytestmark = pytest.mark.slow


def test_demo_prints_a_dice_table_for_both_trainers(tmp_path):
    env = cli_env({})
    out = run_cli(["nnunet-contrastive", "demo", "--workdir", str(tmp_path / "demo"), "--patients", "5",
                   "--test-patients", "1", "--epochs", "2", "--pretrain-epochs", "1", "--iterations", "3",
                   "--size", "32", "--device", "cpu"], env, timeout=1200)
    assert "| trainer | Dice RV | Dice MYO | Dice LV | mean Dice | wall (s) |" in out
    for trainer in ("nnUNetTrainerFewLabels", "nnUNetTrainerSPCon"):
        row = re.search(rf"^\| {trainer} \| ([0-9.]+) \| ([0-9.]+) \| ([0-9.]+) \| ([0-9.]+) \| [0-9]+ \|$", out,
                        re.MULTILINE)
        assert row, f"no table row for {trainer}:\n{out[-2000:]}"
        dice = [float(x) for x in row.groups()]
        assert all(0.0 <= d <= 1.0 for d in dice)
        assert dice[3] == pytest.approx(sum(dice[:3]) / 3, abs=2e-3)  # mean Dice = mean over the three classes
    assert "not a benchmark" in out
