"""Derive a new nnU-Net plans identifier from a dataset's plans and a JSON override (used with `-p`).

An override is a JSON object merged recursively into the source plans (`nnUNetPlans.json` by default): objects are
merged key by key, any other value (numbers, lists, strings) replaces the source value. Keys starting with `_` are
comments. The result is written beside the source as `<source>_<override name>.json` with its `plans_name` set,
so nnU-Net uses it with `-p <source>_<override name>` (train and predict alike).

Overrides that only change how training samples the data (batch size, patch size) reuse the source plans'
preprocessed data: the configurations keep their `data_identifier`. An override that changes what preprocessing
produces (spacing, normalisation, resampling, ... in a configuration, or `transpose_forward`, the intensity
properties, the image reader at the top level) must also give every affected configuration a new
`data_identifier`, and the data must then be preprocessed with `nnUNetv2_preprocess -d D -plans_name NEW -c CONF`;
this module refuses the first without the second. Configurations that inherit (`inherits_from`) are compared after
resolving the inheritance, as nnU-Net does.

Values the override sets are checked for type and range (`batch_size` a positive integer, `patch_size` and
`spacing` one positive value per axis of the configuration, names usable as file names, ...), and plans names
must be plain file names, so the result always lands beside the source plans.
Built-in overrides live in the package's `plans_overrides/` folder (`available_overrides()`).
"""
from __future__ import annotations

import copy
import os
import re
from importlib import resources

from nnunet_contrastive.data.files import atomic_write_json, read_json
from nnunet_contrastive.errors import UserInputError

# configuration keys whose change invalidates the preprocessed data
PREPROCESSING_KEYS = ("spacing", "normalization_schemes", "use_mask_for_norm", "resampling_fn_data",
                      "resampling_fn_seg", "resampling_fn_data_kwargs", "resampling_fn_seg_kwargs",
                      "resampling_fn_probabilities", "resampling_fn_probabilities_kwargs", "preprocessor_name")
# top-level plans keys whose change invalidates the preprocessed data of every configuration
PREPROCESSING_PLANS_KEYS = ("transpose_forward", "transpose_backward", "foreground_intensity_properties_per_channel",
                            "image_reader_writer", "label_manager")
_FILE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")


class PlansOverrideError(UserInputError):
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
    override = read_json(path, PlansOverrideError)
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


def check_file_name(name: str, what: str) -> str:
    """A plans name or data identifier becomes a file or folder name beside the source plans: no path, no dots in
    front, no spaces."""
    if not isinstance(name, str) or not _FILE_NAME_RE.match(name):
        raise PlansOverrideError(f"{what} {name!r} is not usable as a file name beside the source plans: use letters, "
                                 f"digits, '_', '-' and '.' only (no folders, no leading dot).")
    return name


def resolved_configuration(plans: dict, name: str, seen: tuple = ()) -> dict:
    """Configuration `name` with `inherits_from` resolved like nnU-Net's PlansManager (parent keys, then own)."""
    configurations = plans.get("configurations", {})
    if name not in configurations:
        raise PlansOverrideError(f"configuration '{name}' does not exist (configurations: {sorted(configurations)}).")
    conf = dict(configurations[name])
    parent = conf.get("inherits_from")
    if parent is None:
        return conf
    if parent in seen + (name,):
        cycle = " -> ".join(seen + (name, parent))
        raise PlansOverrideError(f"configuration '{name}': 'inherits_from' forms a cycle ({cycle}).")
    base = resolved_configuration(plans, parent, seen + (name,))
    base.update(conf)
    return base


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _per_axis(value, ndim: int, check, what: str) -> str | None:
    if not isinstance(value, list) or len(value) != ndim or not all(check(v) for v in value):
        return f"must be a list of {ndim} {what} (one per axis of this configuration), got {value!r}"
    return None


def value_problems(conf_name: str, values: dict, source: dict) -> list[str]:
    """Type and range problems of the configuration values an override sets; `source` is the resolved source
    configuration (its patch size gives the number of axes, its channel lists the number of channels)."""
    ndim = len(source.get("patch_size") or source.get("spacing") or [])
    n_channels = len(source.get("normalization_schemes") or [])
    out = []

    def bad(key, why):
        out.append(f"configuration '{conf_name}': '{key}' {why}.")

    if "batch_size" in values and not (_is_int(values["batch_size"]) and values["batch_size"] >= 1):
        bad("batch_size", f"must be a positive integer, got {values['batch_size']!r}")
    for key, check, what in (("patch_size", lambda v: _is_int(v) and v >= 1, "positive integers"),
                             ("spacing", lambda v: _is_number(v) and v > 0, "positive numbers"),
                             ("median_image_size_in_voxels", lambda v: _is_number(v) and v > 0, "positive numbers")):
        if key in values and ndim:
            why = _per_axis(values[key], ndim, check, what)
            if why:
                bad(key, why)
    for key, check, what in (("normalization_schemes", lambda v: isinstance(v, str), "names"),
                             ("use_mask_for_norm", lambda v: isinstance(v, bool), "true/false values")):
        if key in values and n_channels:
            if not isinstance(values[key], list) or len(values[key]) != n_channels \
                    or not all(check(v) for v in values[key]):
                bad(key, f"must be a list of {n_channels} {what} (one per channel), got {values[key]!r}")
    for key in ("batch_dice",):
        if key in values and not isinstance(values[key], bool):
            bad(key, f"must be true or false, got {values[key]!r}")
    for key in ("preprocessor_name", "data_identifier"):
        if key in values and not isinstance(values[key], str):
            bad(key, f"must be a string, got {values[key]!r}")
    return out


def _architecture_problems(conf_name: str, conf: dict) -> list[str]:
    kwargs = conf.get("architecture", {}).get("arch_kwargs", {})
    n = kwargs.get("n_stages")
    if n is None:
        return []
    if not (_is_int(n) and n >= 1):
        return [f"configuration '{conf_name}': 'architecture.arch_kwargs.n_stages' must be a positive integer, "
                f"got {n!r}."]
    out = []
    for key, length in (("strides", n), ("kernel_sizes", n), ("features_per_stage", n), ("n_conv_per_stage", n),
                        ("n_conv_per_stage_decoder", n - 1)):
        value = kwargs.get(key)
        if isinstance(value, list) and len(value) != length:
            out.append(f"configuration '{conf_name}': 'architecture.arch_kwargs.{key}' has {len(value)} entries, "
                       f"n_stages = {n} needs {length}.")
    return out


def _top_level_problems(plans: dict, override: dict) -> tuple[list[str], list[str]]:
    """(errors, changed preprocessing keys) of the override's top-level keys."""
    errors, changed = [], []
    if "dataset_name" in override and override["dataset_name"] != plans.get("dataset_name"):
        errors.append(f"'dataset_name' cannot change ({plans.get('dataset_name')!r} -> {override['dataset_name']!r}): "
                      f"plans belong to their dataset folder. Remove the key.")
    for key in PREPROCESSING_PLANS_KEYS:
        if key in override and override[key] != plans.get(key):
            changed.append(key)
    for key in ("transpose_forward", "transpose_backward"):
        if key in override:
            axes = override[key]
            n = len(plans.get(key) or [0, 1, 2])
            if not isinstance(axes, list) or sorted(axes) != list(range(n)) or not all(_is_int(a) for a in axes):
                errors.append(f"'{key}' must be a permutation of {list(range(n))}, got {axes!r}.")
    return errors, changed


def apply_override(plans: dict, override: dict, new_plans_name: str) -> dict:
    """Merged plans, checked: known configurations only, values of the right type and range, preprocessing
    changes (configuration or top level) only with a new data_identifier, patch sizes divisible by the network's
    total stride."""
    confs_in = override.get("configurations", {})
    if not isinstance(confs_in, dict):
        raise PlansOverrideError(f"'configurations' must be an object of configuration names, got "
                                 f"{type(confs_in).__name__}.")
    confs = {k: v for k, v in confs_in.items() if not k.startswith("_")}  # _: comments
    for conf, co in confs.items():
        if conf not in plans.get("configurations", {}):
            raise PlansOverrideError(f"override names configuration '{conf}', which the plans "
                                     f"'{plans.get('plans_name')}' do not have ({sorted(plans['configurations'])}).")
        if not isinstance(co, dict):
            raise PlansOverrideError(f"configuration '{conf}' must be an object of keys to change, got "
                                     f"{type(co).__name__}.")
    errors, top_changed = _top_level_problems(plans, override)
    merged = _merge(plans, override, "")
    merged["plans_name"] = new_plans_name
    for conf, co in confs.items():
        errors += value_problems(conf, co, resolved_configuration(plans, conf))
        if "inherits_from" in co and co["inherits_from"] not in merged["configurations"]:
            errors.append(f"configuration '{conf}': 'inherits_from' names '{co['inherits_from']}', which does not "
                          f"exist.")
    if errors:
        raise PlansOverrideError("the override has problem(s):\n  " + "\n  ".join(errors))
    source_ids = {resolved_configuration(plans, c).get("data_identifier") for c in plans["configurations"]}
    for conf in merged["configurations"]:
        src, dst = resolved_configuration(plans, conf), resolved_configuration(merged, conf)
        changed = [k for k in PREPROCESSING_KEYS if dst.get(k) != src.get(k)] + top_changed
        if changed and dst.get("data_identifier") == src.get("data_identifier"):
            raise PlansOverrideError(
                f"configuration '{conf}': the override changes {changed}, which changes the preprocessed data, but "
                f"keeps data_identifier '{src.get('data_identifier')}'. Set a new 'data_identifier' in the override "
                f"and run nnUNetv2_preprocess -plans_name {new_plans_name}.")
        if changed and dst.get("data_identifier") in source_ids:
            raise PlansOverrideError(
                f"configuration '{conf}': the new data_identifier '{dst.get('data_identifier')}' is the one of "
                f"another configuration of the source plans; its preprocessed data would be mixed up. Choose an "
                f"unused name.")
        if dst.get("data_identifier") != src.get("data_identifier"):
            check_file_name(dst.get("data_identifier"), f"configuration '{conf}': data_identifier")
        if conf in confs:
            problems = _architecture_problems(conf, dst)
            if problems:
                raise PlansOverrideError("\n".join(problems))
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
    """Write `<source>_<override>.json` next to the source plans; return the new plans identifier.

    Everything is checked before anything is written, and the file is written through a temporary file, so a
    failure leaves an earlier file of that name intact."""
    check_file_name(source_plans, "source plans name (-p)")
    src_path = os.path.join(preprocessed_dataset_folder, f"{source_plans}.json")
    if not os.path.isfile(src_path):
        raise PlansOverrideError(
            f"No plans '{source_plans}' at {src_path}. Run nnUNetv2_plan_and_preprocess (or plan_experiment) first.")
    plans = read_json(src_path, PlansOverrideError)
    if not isinstance(plans, dict) or not isinstance(plans.get("configurations"), dict):
        raise PlansOverrideError(f"{src_path}: not nnU-Net plans (no 'configurations' object).")
    name, ov = load_override(override)
    new_name = new_plans_name or f"{source_plans}_{name}"
    check_file_name(new_name, "new plans name" + ("" if new_plans_name else " (pass --name to choose one)"))
    if new_name == source_plans:
        raise PlansOverrideError(f"the new plans name '{new_name}' equals the source plans: choose another --name "
                                 f"(the source plans file is never overwritten).")
    merged = apply_override(plans, ov, new_name)
    atomic_write_json(os.path.join(preprocessed_dataset_folder, f"{new_name}.json"), merged, indent=4)
    return new_name
