"""Cost part of `nnunet-contrastive benchmark`: seconds per training iteration and peak memory of each trainer,
and the cost of the contrastive loss alone.

Each measurement runs in its own subprocess (`python -m nnunet_contrastive.bench.cost trainer|loss SPEC`), so
the peak resident set size (`resource.getrusage(RUSAGE_SELF).ru_maxrss`) belongs to that trainer alone (interpreter,
torch, nnU-Net, network, optimizer, data loader, activations). In the subprocess the trainer is built exactly as
`nnUNetv2_train` builds it (same plans, fold 0, same environment: schedule variables, `nnUNet_n_proc_DA`: 0 on a
small machine, so data augmentation runs in the same process; the value is recorded per row), `initialize()` and
`on_train_start()` run (its own data loaders), and then
`warmup` + `iterations` training iterations: `batch = next(trainer.dataloader_train)` then
`trainer.train_step(batch)`. Reported: median wall time per iteration (load + step, what an nnU-Net epoch spends per
iteration) and median of the step alone, over the timed iterations. Two-stage trainers (nnUNetTrainerSPCon, ...)
are measured once per stage of their declared plan (each by starting at that stage's first epoch).

The loss measurement times `supcon_loss` against the slow per-meta-label reference `per_label_loop_supcon` on random
embeddings (forward + backward, float32, the trainer's temperature, self-paced gammas and meta-label weights).
"""
from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

RESULT_PREFIX = "BENCHMARK_COST_RESULT "
STOCK = "nnUNetTrainer"


def trainer_class(name: str):
    if name == STOCK:
        from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

        return nnUNetTrainer
    import nnunet_contrastive.trainers as trainers

    return getattr(trainers, name)


def _peak_rss_mib() -> float:
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return kib / 1024.0 if sys.platform != "darwin" else kib / 2 ** 20


def loss_summary(losses: list[float], epoch_stats: dict) -> dict:
    """The total loss of every measured iteration (warm-up included) and each named loss term of our trainers
    (`<term>_loss` in their epoch stats): mean and whether every value was finite, so a trainer that yields NaN or
    inf on a device (e.g. under CUDA AMP) is seen in the cost table rather than only timed."""
    terms = {}
    for key, values in epoch_stats.items():
        if not key.endswith("_loss") or not values:
            continue
        vals = np.array([float(np.asarray(v.detach().float().cpu() if hasattr(v, "detach") else v,
                                          dtype=np.float64).mean()) for v in values])
        ok = np.isfinite(vals)
        terms[key] = {"mean": float(vals[ok].mean()) if ok.any() else None, "finite": bool(ok.all())}
    finite = [bool(np.all(np.isfinite(losses)))] if losses else []
    finite += [t["finite"] for t in terms.values()]
    return {"loss_mean": float(np.mean(losses)) if losses else None, "loss_finite": all(finite) if finite else None,
            "term_losses": terms}


# ------------------------------------------------------------------------------------------------ workers
def measure_trainer(spec: dict) -> dict:
    """Runs in the worker process. spec: trainer, stage (None/1/2), plans, dataset, device, warmup, iterations."""
    import torch
    from nnunetv2.run.run_training import get_trainer_from_args

    rss_before = _peak_rss_mib()
    device = torch.device(spec["device"])
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # nnU-Net's prints must not mix with the result line
        # found by name and built as nnUNetv2_train does (our trainers through nnUNet_extTrainer)
        trainer = get_trainer_from_args(spec["dataset"], "2d", 0, spec["trainer"], spec["plans"], False, device)
        trainer.initialize()
        if spec.get("stage") is not None:  # the first epoch of that stage of the trainer's own plan
            trainer.current_epoch = int(trainer.plan.starts[int(spec["stage"]) - 1])
        trainer.on_train_start()
        trainer.on_epoch_start()
        trainer.on_train_epoch_start()
    setup_s = time.perf_counter() - t0
    load_s, step_s, losses = [], [], []
    with contextlib.redirect_stdout(sys.stderr):
        for i in range(spec["warmup"] + spec["iterations"]):
            t1 = time.perf_counter()
            batch = next(trainer.dataloader_train)
            t2 = time.perf_counter()
            res = trainer.train_step(batch)
            if device.type == "cuda":
                torch.cuda.synchronize()
            t3 = time.perf_counter()
            losses.append(float(np.asarray(res["loss"], dtype=np.float64).mean()))
            if i >= spec["warmup"]:
                load_s.append(t2 - t1)
                step_s.append(t3 - t2)
    total = [a + b for a, b in zip(load_s, step_s)]
    out = {"trainer": spec["trainer"], "stage": spec.get("stage"), "batch_size": int(trainer.batch_size),
           "patch_size": [int(p) for p in trainer.configuration_manager.patch_size],
           "s_per_it": statistics.median(total), "step_s": statistics.median(step_s),
           "load_s": statistics.median(load_s), "timed_iterations": len(total), "warmup_iterations": spec["warmup"],
           "setup_s": setup_s, "peak_rss_mib": _peak_rss_mib(), "rss_after_import_mib": rss_before,
           "torch_threads": torch.get_num_threads(), "device": str(device),
           # nnU-Net (and our trainers) train under autocast + GradScaler on CUDA
           "amp": device.type == "cuda", "n_proc_DA": os.environ.get("nnUNet_n_proc_DA"),
           **loss_summary(losses, getattr(trainer, "_epoch_stats", {}))}
    if device.type == "cuda":
        out["cuda_max_allocated_mib"] = torch.cuda.max_memory_allocated() / 2 ** 20
    return out


def measure_loss(spec: dict) -> dict:
    """Runs in the worker process. spec: sizes (2N values), dim, warmup, reps, device."""
    import torch

    from nnunet_contrastive.losses import supcon_loss
    from nnunet_contrastive.losses.reference import per_label_loop_supcon
    from nnunet_contrastive.framework.schedules import pair_loss_bounds
    from nnunet_contrastive.trainers.spcon import nnUNetTrainerSPCon as S

    device = torch.device(spec["device"])
    names = ("partition", "patient", "phase")
    tau = S.temperature
    rows = []
    gen = torch.Generator().manual_seed(0)
    for two_n in spec["sizes"]:
        n = two_n // 2
        k = S.num_partitions
        labels = torch.stack([torch.arange(n) % k, torch.arange(n) // k, torch.randint(0, 2, (n,), generator=gen)],
                             dim=1).to(device)
        upper = pair_loss_bounds(n, tau).upper
        gammas = [upper * 0.5 * (S.gamma_start[m] + S.gamma_end[m]) for m in names]  # mid-stage pace
        lambdas = [S.meta_label_weights[m] for m in names]
        base1 = torch.randn(n, spec["dim"], generator=gen).to(device)
        base2 = (base1 + 0.5 * torch.randn(n, spec["dim"], generator=gen).to(device))

        def run(fn):
            z1 = base1.clone().requires_grad_(True)
            z2 = base2.clone().requires_grad_(True)
            loss = fn(z1, z2)
            loss.backward()
            if device.type == "cuda":
                torch.cuda.synchronize()
            return float(loss.detach())

        def ours(z1, z2):
            return supcon_loss(z1, z2, labels, temperature=tau, gamma=gammas, weighting=S.weighting,
                               label_weights=lambdas, validate=False).loss

        def ref(z1, z2):
            return per_label_loop_supcon(z1, z2, labels, temperature=tau, gamma=gammas, weighting=S.weighting,
                                         label_weights=lambdas)[0]

        diff = abs(run(ours) - run(ref))
        times = {"ours": [], "ref": []}
        for i in range(spec["warmup"] + spec["reps"]):
            for key, fn in (("ours", ours), ("ref", ref)):  # alternate, so both see the same machine load
                t0 = time.perf_counter()
                run(fn)
                if i >= spec["warmup"]:
                    times[key].append(time.perf_counter() - t0)
        rows.append({"two_n": two_n, "dim": spec["dim"], "meta_labels": len(names),
                     "supcon_ms": 1000 * statistics.median(times["ours"]),
                     "reference_ms": 1000 * statistics.median(times["ref"]), "reps": spec["reps"],
                     "max_abs_diff": diff})
    return {"rows": rows, "torch_threads": torch.get_num_threads(), "device": str(device)}


def _worker_main(argv: list[str]) -> int:
    kind, spec = argv[0], json.loads(argv[1])
    result = measure_trainer(spec) if kind == "trainer" else measure_loss(spec)
    sys.stdout.write(RESULT_PREFIX + json.dumps(result) + "\n")
    sys.stdout.flush()
    return 0


# ------------------------------------------------------------------------------------------------ driver side
def run_worker(kind: str, spec: dict, env: dict, log_file: str, timeout: float | None = None) -> dict:
    """Run one measurement in a fresh interpreter; its stderr goes to `log_file`. Returns its result dict."""
    with open(log_file, "w", encoding="utf-8") as err:
        proc = subprocess.run([sys.executable, "-m", "nnunet_contrastive.bench.cost", kind, json.dumps(spec)],
                              env=env, stdout=subprocess.PIPE, stderr=err, text=True, timeout=timeout)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_PREFIX)]
    if proc.returncode != 0 or not lines:
        with open(log_file, encoding="utf-8", errors="replace") as f:
            tail = "".join(f.readlines()[-30:])
        raise RuntimeError(f"cost measurement {kind} {spec.get('trainer', '')} failed (exit code {proc.returncode}); "
                           f"log {log_file}:\n{tail}")
    return json.loads(lines[-1][len(RESULT_PREFIX):])


def loss_step_reference(rows: list[dict]) -> dict:
    """The step the contrastive loss alone is compared with: the first measured stage-1 (pre-training) row of a
    trainer that trains with that loss (SPCon, UnsupCon and their variants), else stock nnUNetTrainer (rows[0])."""
    from nnunet_contrastive.trainers.spcon import nnUNetTrainerSPCon
    from nnunet_contrastive.trainers.unsup_con import nnUNetTrainerUnsupCon

    for r in rows:
        if r["trainer"] != STOCK and r.get("stage") == 1 and \
                issubclass(trainer_class(r["trainer"]), (nnUNetTrainerSPCon, nnUNetTrainerUnsupCon)):
            return r
    return rows[0]


def trainer_stages(name: str) -> list[int | None]:
    """[None] for one-stage trainers (stock loop), else the 1-based stages of the trainer's declared plan."""
    cls = trainer_class(name)
    plan = getattr(cls, "stage_plan", None)
    if plan is None:
        return [None]
    stages = plan(environ={}).stages
    return [None] if len(stages) == 1 and not hasattr(cls, "build_terms") else list(range(1, len(stages) + 1))


def measure_costs(trainers: list[str], env_for, dataset: str, plans: str, device: str, warmup: int, iterations: int,
                  loss_sizes: list[int], loss_reps: int, cache_dir: str, log=print) -> dict:
    """Measure stock nnUNetTrainer and every (trainer, stage); cache each result as JSON in `cache_dir`.

    `env_for(trainer_name, results_dir)` returns the subprocess environment for a trainer. Returns
    {"trainers": [rows with ratios to stock], "loss": {...}}."""
    os.makedirs(cache_dir, exist_ok=True)
    rows = []
    specs = [(STOCK, None)] + [(t, s) for t in trainers for s in trainer_stages(t)]
    for name, stage in specs:
        tag = name + ("" if stage is None else f"_stage{stage}")
        cache = os.path.join(cache_dir, tag + ".json")
        if os.path.isfile(cache):
            with open(cache, encoding="utf-8") as f:
                rows.append(json.load(f))
            log(f"  cost {tag}: cached ({rows[-1]['s_per_it']:.3f} s/it)")
            continue
        tmp_results = tempfile.mkdtemp(prefix="cost_results_", dir=cache_dir)
        try:
            t0 = time.time()
            res = run_worker("trainer", {"trainer": name, "stage": stage, "plans": plans, "dataset": dataset,
                                         "device": device, "warmup": warmup, "iterations": iterations},
                             env_for(name, tmp_results), os.path.join(cache_dir, tag + ".log"))
        finally:
            shutil.rmtree(tmp_results, ignore_errors=True)
        with open(cache, "w", encoding="utf-8") as f:
            json.dump(res, f, indent=1)
        log(f"  cost {tag}: {res['s_per_it']:.3f} s/it (step {res['step_s']:.3f} s), peak RSS "
            f"{res['peak_rss_mib']:.0f} MiB" + (f", peak {device} memory {res['cuda_max_allocated_mib']:.0f} MiB"
                                               if "cuda_max_allocated_mib" in res else "")
            + f", loss {res['loss_mean']:.3g}{'' if res['loss_finite'] else ' NOT FINITE'} ({time.time() - t0:.0f} s)")
        rows.append(res)
    stock = rows[0]
    for r in rows:
        r["s_per_it_ratio"] = r["s_per_it"] / stock["s_per_it"]
        r["step_ratio"] = r["step_s"] / stock["step_s"]
        r["peak_rss_ratio"] = r["peak_rss_mib"] / stock["peak_rss_mib"]
        if "cuda_max_allocated_mib" in r and stock.get("cuda_max_allocated_mib"):
            r["cuda_memory_ratio"] = r["cuda_max_allocated_mib"] / stock["cuda_max_allocated_mib"]
    bad = [r["trainer"] + ("" if r.get("stage") is None else f" stage {r['stage']}") for r in rows
           if r.get("loss_finite") is False]
    if bad:
        log(f"  WARNING: non-finite loss on {device} in {', '.join(bad)} (see term_losses in the cost JSON)")

    loss = None
    if loss_sizes:
        batch = stock["batch_size"]
        from nnunet_contrastive.trainers.spcon import nnUNetTrainerSPCon

        train_two_n = 2 * nnUNetTrainerSPCon.stage1_batch_rows(batch)  # two views of a stage-1 batch
        sizes = sorted(set([train_two_n] + list(loss_sizes)))
        cache = os.path.join(cache_dir, "loss_" + "_".join(map(str, sizes)) + f"_r{loss_reps}.json")
        if os.path.isfile(cache):
            with open(cache, encoding="utf-8") as f:
                loss = json.load(f)
            log("  loss cost: cached")
        else:
            t0 = time.time()
            loss = run_worker("loss", {"sizes": sizes, "dim": 256, "warmup": 2, "reps": loss_reps, "device": device},
                              env_for(STOCK, cache_dir), os.path.join(cache_dir, "loss.log"))
            with open(cache, "w", encoding="utf-8") as f:
                json.dump(loss, f, indent=1)
            log(f"  loss cost: {len(sizes)} sizes ({time.time() - t0:.0f} s)")
        step_ref = loss_step_reference(rows)
        loss["step_reference"] = {"trainer": step_ref["trainer"], "stage": step_ref["stage"],
                                  "step_s": step_ref["step_s"], "batch_size": batch}
        for r in loss["rows"]:
            r["training_batch"] = r["two_n"] == train_two_n
            r["fraction_of_step"] = r["supcon_ms"] / 1000.0 / step_ref["step_s"]
            r["reference_fraction_of_step"] = r["reference_ms"] / 1000.0 / step_ref["step_s"]
    return {"trainers": rows, "loss": loss}


if __name__ == "__main__":
    sys.exit(_worker_main(sys.argv[1:]))
