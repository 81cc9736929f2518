"""Run nnU-Net's own commands (plan/preprocess, train, predict, evaluate) as subprocesses.

Used by the demo and the benchmarks: nothing of nnU-Net is re-implemented here. The commands are the console
scripts installed next to this interpreter; their output streams to the console so progress is visible.
`small_machine_env()` holds the settings that keep nnU-Net usable on a 2-core CPU.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time

SMALL_MACHINE_ENV = {
    "nnUNet_n_proc_DA": "0",  # augment in the main process (no worker processes)
    "nnUNet_def_n_proc": "2",  # pools of nnU-Net's final validation / export
    "nnUNet_compile": "f",  # torch.compile only pays off on long GPU runs
    "OMP_NUM_THREADS": None,  # leave torch's default
}


class CommandFailed(RuntimeError):
    pass


def small_machine_env(base: dict | None = None, **extra: str) -> dict:
    env = dict(os.environ if base is None else base)
    for k, v in SMALL_MACHINE_ENV.items():
        if v is not None:
            env.setdefault(k, v)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def nnunet_folders(workdir: str) -> dict[str, str]:
    """nnUNet_raw / nnUNet_preprocessed / nnUNet_results below `workdir` (created)."""
    out = {}
    for var, sub in (("nnUNet_raw", "nnUNet_raw"), ("nnUNet_preprocessed", "nnUNet_preprocessed"),
                     ("nnUNet_results", "nnUNet_results")):
        out[var] = os.path.join(os.path.abspath(workdir), sub)
        os.makedirs(out[var], exist_ok=True)
    return out


def console_script(name: str) -> str:
    """Path of an installed console script (nnUNetv2_train, ...) of this environment."""
    candidate = os.path.join(os.path.dirname(sys.executable), name)
    if os.path.isfile(candidate):
        return candidate
    found = shutil.which(name)
    if found is None:
        raise CommandFailed(f"'{name}' not found next to {sys.executable} nor on PATH: is nnunetv2 installed?")
    return found


def run_command(args: list[str], env: dict, log=print, capture: bool = False, output_file: str | None = None) -> str:
    """Run one command, streaming its output (or capturing it); raise CommandFailed with its tail on failure.

    `output_file`: append the command's output to this file instead of the console (the command line is still
    logged with `log`)."""
    exe = console_script(args[0]) if os.sep not in args[0] else args[0]
    log(f"$ {' '.join([os.path.basename(exe)] + [str(a) for a in args[1:]])}")
    t0 = time.time()
    proc = subprocess.Popen([exe] + [str(a) for a in args[1:]], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, bufsize=1)
    lines = []
    assert proc.stdout is not None
    out_f = open(output_file, "a", encoding="utf-8") if output_file else None
    try:
        if out_f is not None:
            out_f.write(f"$ {' '.join([exe] + [str(a) for a in args[1:]])}\n")
        for line in proc.stdout:
            lines.append(line)
            if out_f is not None:
                out_f.write(line)
                out_f.flush()
            elif not capture:
                sys.stdout.write("    " + line)
                sys.stdout.flush()
    finally:
        if out_f is not None:
            out_f.close()
    rc = proc.wait()
    if rc != 0:
        tail = "".join(lines[-40:])
        raise CommandFailed(f"{os.path.basename(exe)} failed with exit code {rc} after {time.time() - t0:.0f} s:\n"
                            f"{tail}")
    return "".join(lines)


def plan_and_preprocess(dataset_id: int, env: dict, configurations=("2d",), log=print,
                        output_file: str | None = None) -> None:
    # nnU-Net 2.8.1's planner calls torch.set_num_threads(nnUNet_n_proc_DA), which fails for 0
    env = {k: v for k, v in env.items() if k != "nnUNet_n_proc_DA"}
    run_command(["nnUNetv2_plan_and_preprocess", "-d", str(dataset_id), "-c", *configurations, "-np", "2",
                 "-npfp", "2", "--verify_dataset_integrity"], env, log, output_file=output_file)


def preprocess(dataset_id: int, plans_name: str, env: dict, configurations=("2d",), log=print,
               output_file: str | None = None) -> None:
    """nnUNetv2_preprocess for plans whose configurations need their own preprocessed data (a plans override that
    changes the spacing, e.g. acdc_cpu)."""
    run_command(["nnUNetv2_preprocess", "-d", str(dataset_id), "-plans_name", plans_name, "-c", *configurations,
                 "-np", "2"], env, log, output_file=output_file)


def train(dataset_id: int, trainer: str, plans: str, fold: int | str, env: dict, device: str = "cpu",
          configuration: str = "2d", extra: list[str] = (), log=print, output_file: str | None = None) -> None:
    run_command(["nnUNetv2_train", str(dataset_id), configuration, str(fold), "-tr", trainer, "-p", plans,
                 "-device", device, *extra], env, log, output_file=output_file)


def predict(dataset_id: int, trainer: str, plans: str, fold: int | str, input_folder: str, output_folder: str,
            env: dict, device: str = "cpu", configuration: str = "2d", checkpoint: str = "checkpoint_final.pth",
            log=print, extra: list[str] = (), output_file: str | None = None) -> None:
    run_command(["nnUNetv2_predict", "-i", input_folder, "-o", output_folder, "-d", str(dataset_id), "-c",
                 configuration, "-tr", trainer, "-p", plans, "-f", str(fold), "-chk", checkpoint, "-npp", "0",
                 "-nps", "0", "-device", device, "--disable_progress_bar", *extra], env, log,
                output_file=output_file)


def evaluate(gt_folder: str, pred_folder: str, dataset_json: str, plans_json: str, env: dict, log=print,
             output_file: str | None = None) -> dict:
    """nnUNetv2_evaluate_folder; returns its summary.json as a dict."""
    out = os.path.join(pred_folder, "summary.json")
    run_command(["nnUNetv2_evaluate_folder", gt_folder, pred_folder, "-djfile", dataset_json, "-pfile", plans_json,
                 "-o", out, "-np", "2"], env, log, output_file=output_file)
    with open(out, encoding="utf-8") as f:
        return json.load(f)


def _dice_by_label(metrics: dict, labels: dict[str, int]) -> dict[str, float]:
    """{foreground label name: Dice} of one block of nnU-Net's summary.json (keys are label values as strings)."""
    by_value = {str(v): k for k, v in labels.items() if v != 0 and k != "ignore"}
    out = {}
    for key, m in metrics.items():
        name = by_value.get(str(key).strip("()").rstrip(",").strip())
        if name is not None:
            out[name] = float(m["Dice"])
    return out


def dice_per_case(summary: dict, labels: dict[str, int]) -> dict[str, dict]:
    """{case: {label name: Dice, 'mean': mean over the labels that have one}} from nnU-Net's summary.json.

    The case is the prediction's file name without its ending; a Dice nnU-Net leaves NaN (label absent from both
    reference and prediction) is None and left out of the case's mean (nnU-Net's per-class means skip it too)."""
    out = {}
    for entry in summary["metric_per_case"]:
        name = os.path.basename(entry["prediction_file"])
        case = name[:-len(".nii.gz")] if name.endswith(".nii.gz") else os.path.splitext(name)[0]
        row = {k: None if math.isnan(v) else v for k, v in _dice_by_label(entry["metrics"], labels).items()}
        present = [v for v in row.values() if v is not None]
        row["mean"] = sum(present) / len(present) if present else None
        out[case] = row
    return out


def dice_from_summary(summary: dict, labels: dict[str, int]) -> dict[str, float]:
    """{label name: mean Dice over cases} for the foreground labels, plus 'mean' (nnU-Net's foreground mean)."""
    return {**_dice_by_label(summary["mean"], labels), "mean": float(summary["foreground_mean"]["Dice"])}
