"""The benchmark's datasets: where the data lie, how they are converted, split and how labeled subsets are drawn.

hippocampus  MSD Task04_Hippocampus (one volume per subject). A seeded draw of `test_cases` volumes is held out,
             `val_cases` more are nnU-Net's validation cases, the rest is the training pool. Labeled subsets: N
             volumes drawn with the run's seed (`select-labeled`'s rule).
acdc         ACDC training patients (ED and ES frame each, cases `patientXXX_frameYY`). The split is the one most
             semi-supervised papers report on (`ssl4mis_split.json`: 70 train, 10 validation, 20 test patients; the
             40 test volumes are held out before planning). Labeled subsets count PATIENTS (both frames): seed 0 is
             the published protocol (the first N patients of the split's train list), other seeds draw N patients
             with `select-labeled`'s rule. Citation required (the data folder's MANDATORY_CITATION.md).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np

__all__ = ["BenchDataset", "DATASETS", "HIPPOCAMPUS", "ACDC", "ALL"]

ALL = "all"


def _shared_data_dir(name: str) -> str:
    """`<repository>/../shared/data/<name>` (a source checkout), else `<cwd>/../shared/data/<name>`."""
    here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    candidates = [os.path.join(os.path.dirname(here), "shared", "data", name),
                  os.path.join(os.path.dirname(os.getcwd()), "shared", "data", name)]
    for c in candidates:
        if os.path.isdir(c):
            return c
    return candidates[0]


@dataclass(frozen=True)
class BenchDataset:
    key: str
    name: str  # nnU-Net dataset name
    folder: str  # under shared/data
    title: str
    unit: str  # what N counts: "volumes" or "patients"
    full: dict
    quick: dict
    plans_override: str = "cpu_small"  # the CPU tier's plans override (a built-in of plans_overrides/)

    def default_dir(self) -> str:
        return _shared_data_dir(self.folder)

    # -------------------------------------------------------------- per-dataset behaviour
    def check(self, path: str) -> str:
        path = os.path.abspath(path)
        if self.key == "hippocampus":
            ok = os.path.isdir(os.path.join(path, "imagesTr")) and os.path.isdir(os.path.join(path, "labelsTr"))
            what = "the Medical Segmentation Decathlon Task04_Hippocampus folder (imagesTr/, labelsTr/, dataset.json)"
        else:
            ok = os.path.isdir(os.path.join(path, "training")) and \
                os.path.isfile(os.path.join(path, "ssl4mis_split.json"))
            what = "the ACDC folder with training/patientXXX/ and ssl4mis_split.json"
        if not ok:
            from nnunet_contrastive.bench.benchmark import BenchmarkError

            raise BenchmarkError(f"{self.title} data not found at {path}. The benchmark needs {what}; pass it with "
                                 f"--data PATH.")
        return path

    def convert(self, src: str, dataset_id: int, raw_root: str):
        if self.key == "hippocampus":
            from nnunet_contrastive.prep.converters import convert_msd

            return convert_msd(src, dataset_id, self.name, raw_root=raw_root, overwrite=True)
        from nnunet_contrastive.prep.converters import convert_acdc

        return convert_acdc(os.path.join(src, "training"), dataset_id, self.name, raw_root=raw_root, overwrite=True)

    def split(self, src: str, cases: list, groups: dict, test_cases: int, val_cases: int, pool_size, seed: int):
        """(test, pool, val, dropped) case lists. hippocampus: seeded draw; acdc: ssl4mis_split.json by patient
        (test_cases / val_cases / pool_size then count patients; None = the split's own lists)."""
        from nnunet_contrastive.bench.benchmark import BenchmarkError

        if self.key == "hippocampus":
            need = test_cases + val_cases + 1
            if len(cases) < need:
                raise BenchmarkError(f"{src} has {len(cases)} cases; --test-cases {test_cases} + --val-cases "
                                     f"{val_cases} leave fewer than 1 training case.")
            order = [cases[i] for i in np.random.default_rng(seed).permutation(len(cases))]
            test = sorted(order[:test_cases])
            rest = order[test_cases:]
            pool = sorted(rest if pool_size is None else rest[:pool_size])
            if len(pool) <= val_cases:
                raise BenchmarkError(f"the training pool has {len(pool)} cases: not enough for {val_cases} "
                                     f"validation cases and at least one training case.")
            val = sorted(np.random.default_rng(seed + 1).choice(pool, val_cases, replace=False).tolist())
            return test, pool, val, sorted(set(rest) - set(pool))
        split = self.published_split(src)
        by_patient = {}
        for c in cases:
            by_patient.setdefault(groups[c], []).append(c)
        missing = [p for k in ("train", "val", "test") for p in split[k] if p not in by_patient]
        if missing:
            raise BenchmarkError(f"{src}/ssl4mis_split.json names patients {missing[:5]} that the converted data do "
                                 f"not have.")
        test_p = split["test"][:test_cases] if test_cases else split["test"]
        val_p = split["val"][:val_cases] if val_cases else split["val"]
        train_p = split["train"][:pool_size] if pool_size else split["train"]
        test = sorted(c for p in test_p for c in by_patient[p])
        val = sorted(c for p in val_p for c in by_patient[p])
        pool = sorted(val + [c for p in train_p for c in by_patient[p]])
        dropped = sorted(set(cases) - set(test) - set(pool))
        return test, pool, val, dropped

    def published_split(self, src: str) -> dict:
        with open(os.path.join(src, "ssl4mis_split.json"), encoding="utf-8") as f:
            split = json.load(f)
        return {k: list(split[k]) for k in ("train", "val", "test")}

    def labeled(self, train: list, num_labeled, seed: int, groups: dict, train_order: list | None = None) -> list:
        """The labeled training cases of one run."""
        from nnunet_contrastive.data.labeled import select_labeled

        if self.key == "hippocampus":
            return select_labeled(list(train), num_labeled, seed, 0)
        if num_labeled == ALL:
            return sorted(train)
        if seed == 0 and train_order:  # the published protocol: the first N patients of the split's train list
            chosen = set(train_order[:int(num_labeled)])
            return sorted(c for c in train if groups[c] in chosen)
        return select_labeled(list(train), num_labeled, seed, 0, groups)


HIPPOCAMPUS = BenchDataset(
    key="hippocampus", name="Hippocampus", folder="Task04_Hippocampus", title="MSD hippocampus", unit="volumes",
    # 50 x 100 iterations: FewLabels' validation Dice is flat from about 1500 iterations at N = 1 and gains < 0.02
    # per 1000 at the end with all labels (docs/results/hippocampus_curve); pre-training 10 x 100 per stage, as ACDC
    full=dict(dataset_id=941, test_cases=40, val_cases=4, pool_size=None, num_labeled=["1", "2", "4", "all"],
              epochs=50, pretrain_epochs=10),
    quick=dict(dataset_id=942, test_cases=2, val_cases=1, pool_size=12, num_labeled=["1", "all"]))
ACDC = BenchDataset(
    key="acdc", name="ACDC", folder="ACDC", title="ACDC", unit="patients",
    # 30 x 100 iterations: FewLabels' validation Dice is flat from about 1200 (N = 1) and 1500 (N = all)
    # iterations on (acdc_cpu plans; docs/results/acdc_cpu). Pre-training runs once per seed outside that budget:
    # 10 x 100 iterations per pre-training stage (towards the papers' far longer schedules than 2 x 100; not
    # tuned); trainers without pre-training reuse their runs of any pre-training setting (equivalent_run)
    full=dict(dataset_id=943, test_cases=None, val_cases=None, pool_size=None, num_labeled=["1", "3", "7", "all"],
              epochs=30, pretrain_epochs=10),
    quick=dict(dataset_id=944, test_cases=1, val_cases=1, pool_size=3, num_labeled=["1", "all"]),
    plans_override="acdc_cpu")
DATASETS = {d.key: d for d in (HIPPOCAMPUS, ACDC)}
