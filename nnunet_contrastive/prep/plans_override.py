"""Derive a new nnU-Net plans identifier from a dataset's plans and a JSON override (used with `-p`).

An override is a JSON object merged recursively into the source plans (`nnUNetPlans.json` by default): objects are
merged key by key, any other value (numbers, lists, strings) replaces the source value. Keys starting with `_` are
comments. The result is written beside the source as `<source>_<override name>.json` with its `plans_name` set,
so nnU-Net uses it with `-p <source>_<override name>` (train and predict alike).

Overrides that only change how training samples the data (batch size, patch size) reuse the source plans'
preprocessed data: the configurations keep their `data_identifier`. An override that changes what preprocessing
produces (spacing, normalisation, resampling, ...) must also set a new `data_identifier`, and the data must then be
preprocessed with `nnUNetv2_preprocess -d D -plans_name NEW -c CONF`; this module refuses the first without the second.
Built-in overrides live in the package's `plans_overrides/` folder (`available_overrides()`).
"""
from __future__ import annotations

import copy
import json
import os
from importlib import resources

# configuration keys whose change invalidates the preprocessed data
PREPROCESSING_KEYS = ("spacing", "normalization_schemes", "use_mask_for_norm", "resampling_fn_data",
                      "resampling_fn_seg", "resampling_fn_data_kwargs", "resampling_fn_seg_kwargs",
                      "resampling_fn_probabilities", "resampling_fn_probabilities_kwargs", "preprocessor_name")


class PlansOverrideError(ValueError):
    """An override that cannot be applied; the message names the key and how to fix it."""


def available_overrides() -> dict[str, str]:
    """Built-in override name -> path of its JSON file."""
    folder = resources.files("nnunet_contrastive.plans_overrides")
    return {p.name[:-5]: str(p) for p in folder.iterdir() if p.name.endswith(".json")}


def load_override(name_or_path: str) -> tuple[str, dict]:
    """(name, override dict) from a built-in name or a JSON file path."""
    builtin = available_overrides()
    if name_or_path in builtin:
        path, name = builtin[name_or_path], name_or_path
    elif os.path.isfile(name_or_path):
        path, name = name_or_path, os.path.splitext(os.path.basename(name_or_path))[0]
    else:
        raise PlansOverrideError(
            f"Unknown plans override '{name_or_path}': neither a built-in ({sorted(builtin)}) nor a JSON file.")
    try:
        with open(path, encoding="utf-8") as f:
            override = json.load(f)
    except json.JSONDecodeError as e:
        raise PlansOverrideError(f"{path}: not valid JSON ({e}).") from e
    if not isinstance(override, dict):
        raise PlansOverrideError(f"{path}: an override must be a JSON object, got {type(override).__name__}.")
    return name, override


def _merge(base, override, where: str):
    if not isinstance(override, dict):
        return copy.deepcopy(override)
    if not isinstance(base, dict):
        raise PlansOverrideError(f"override key '{where}' is an object but the plans hold a "
                                 f"{type(base).__name__} there.")
    out = copy.deepcopy(base)
    for k, v in override.items():
        if k.startswith("_"):
            continue
        out[k] = _merge(base.get(k, {}) if isinstance(v, dict) else base.get(k), v, f"{where}.{k}" if where else k)
    return out


def apply_override(plans: dict, override: dict, new_plans_name: str) -> dict:
    """Merged plans, checked: known configurations only, preprocessing keys only with a new data_identifier,
    patch sizes divisible by the network's total stride."""
    confs = {k: v for k, v in override.get("configurations", {}).items() if not k.startswith("_")}  # _: comments
    for conf in confs:
        if conf not in plans.get("configurations", {}):
            raise PlansOverrideError(f"override names configuration '{conf}', which the plans "
                                     f"'{plans.get('plans_name')}' do not have ({sorted(plans['configurations'])}).")
    merged = _merge(plans, override, "")
    merged["plans_name"] = new_plans_name
    for conf, co in confs.items():
        src, dst = plans["configurations"][conf], merged["configurations"][conf]
        changed = [k for k in PREPROCESSING_KEYS if k in co and co[k] != src.get(k)]
        if changed and dst.get("data_identifier") == src.get("data_identifier"):
            raise PlansOverrideError(
                f"configuration '{conf}': the override changes {changed}, which changes the preprocessed data, but "
                f"keeps data_identifier '{src.get('data_identifier')}'. Set a new 'data_identifier' in the override "
                f"and run nnUNetv2_preprocess -plans_name {new_plans_name}.")
        _check_patch(conf, dst)
    return merged


def _check_patch(conf: str, c: dict) -> None:
    patch = c.get("patch_size")
    arch = c.get("architecture", {}).get("arch_kwargs", {})
    strides = arch.get("strides")
    if patch is None or strides is None:
        return
    total = [1] * len(patch)
    for s in strides:
        s = s if isinstance(s, (list, tuple)) else [s] * len(patch)
        total = [t * int(si) for t, si in zip(total, s)]
    bad = [(p, t) for p, t in zip(patch, total) if p % t]
    if bad:
        raise PlansOverrideError(
            f"configuration '{conf}': patch_size {patch} must be divisible by the network's total stride {total} "
            f"per axis.")


def derive_plans(preprocessed_dataset_folder: str, override: str, source_plans: str = "nnUNetPlans",
                 new_plans_name: str | None = None) -> str:
    """Write `<source>_<override>.json` next to the source plans; return the new plans identifier."""
    src_path = os.path.join(preprocessed_dataset_folder, f"{source_plans}.json")
    if not os.path.isfile(src_path):
        raise PlansOverrideError(
            f"No plans '{source_plans}' at {src_path}. Run nnUNetv2_plan_and_preprocess (or plan_experiment) first.")
    with open(src_path, encoding="utf-8") as f:
        plans = json.load(f)
    name, ov = load_override(override)
    new_name = new_plans_name or f"{source_plans}_{name}"
    if new_name == source_plans:
        raise PlansOverrideError(f"the new plans name '{new_name}' equals the source plans: choose another --name "
                                 f"(the source plans file is never overwritten).")
    merged = apply_override(plans, ov, new_name)
    with open(os.path.join(preprocessed_dataset_folder, f"{new_name}.json"), "w", encoding="utf-8") as f:
        json.dump(merged, f, indent=4)
    return new_name
