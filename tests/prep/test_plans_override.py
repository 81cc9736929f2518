"""Plans overrides: merge semantics, checks, built-in overrides, derive_plans and the `plans` subcommand."""
import copy
import json
import os

import pytest

from nnunet_contrastive.cli import main
from nnunet_contrastive.prep.plans_override import (
    PlansOverrideError,
    apply_override,
    available_overrides,
    derive_plans,
    load_override,
)

DATASET = "Dataset986_PlansFake"


def _conf(dim: int, identifier: str, patch: list, strides: list, batch: int) -> dict:
    """One configuration laid out as nnU-Net 2.x's ExperimentPlanner writes it."""
    resampling_kwargs = {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None}
    return {
        "data_identifier": identifier, "preprocessor_name": "DefaultPreprocessor", "batch_size": batch,
        "patch_size": patch, "median_image_size_in_voxels": [float(p) for p in patch],
        "spacing": [1.5, 1.5] if dim == 2 else [8.0, 1.5, 1.5],
        "normalization_schemes": ["ZScoreNormalization"], "use_mask_for_norm": [False],
        "resampling_fn_data": "resample_data_or_seg_to_shape", "resampling_fn_seg": "resample_data_or_seg_to_shape",
        "resampling_fn_data_kwargs": resampling_kwargs,
        "resampling_fn_seg_kwargs": dict(resampling_kwargs, is_seg=True, order=1),
        "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
        "resampling_fn_probabilities_kwargs": dict(resampling_kwargs, order=1),
        "architecture": {
            "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
            "arch_kwargs": {
                "n_stages": len(strides), "features_per_stage": [32 * 2 ** i for i in range(len(strides))],
                "conv_op": f"torch.nn.modules.conv.Conv{dim}d",
                "kernel_sizes": [[3] * dim] * len(strides), "strides": strides,
                "n_conv_per_stage": [2] * len(strides), "n_conv_per_stage_decoder": [2] * (len(strides) - 1),
                "conv_bias": True, "norm_op": f"torch.nn.modules.instancenorm.InstanceNorm{dim}d",
                "norm_op_kwargs": {"eps": 1e-05, "affine": True}, "dropout_op": None, "dropout_op_kwargs": None,
                "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True}},
            "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]},
        "batch_dice": dim == 2,
    }


def real_plans() -> dict:
    """An nnUNetPlans.json of a small 2d/3d dataset (structure of nnU-Net 2.8's planner output)."""
    return {
        "dataset_name": DATASET, "plans_name": "nnUNetPlans",
        "original_median_spacing_after_transp": [8.0, 1.5, 1.5], "original_median_shape_after_transp": [10, 64, 64],
        "image_reader_writer": "SimpleITKIO", "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2],
        "configurations": {
            "2d": _conf(2, "nnUNetPlans_2d", [64, 64], [[1, 1], [2, 2], [2, 2], [2, 2], [2, 2]], 12),
            "3d_fullres": _conf(3, "nnUNetPlans_3d_fullres", [10, 64, 64],
                                [[1, 1, 1], [1, 2, 2], [1, 2, 2], [2, 2, 2], [1, 2, 2]], 2),
        },
        "experiment_planner_used": "ExperimentPlanner", "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {
            "0": {"max": 1223.0, "mean": 610.1, "median": 455.2, "min": 57.4, "percentile_00_5": 159.7,
                  "percentile_99_5": 1084.5, "std": 309.7}},
    }


def small_plans() -> dict:
    return {
        "plans_name": "base", "keep": {"a": 1, "b": [1, 2, 3]},
        "configurations": {
            "2d": {"data_identifier": "base_2d", "batch_size": 4, "patch_size": [32, 48],
                   "spacing": [1.0, 1.0], "normalization_schemes": ["ZScoreNormalization"],
                   "architecture": {"arch_kwargs": {"strides": [[1, 1], [2, 2], [2, 2]], "n_stages": 3}}},
            "3d": {"data_identifier": "base_3d", "batch_size": 2, "patch_size": [8, 32, 32],
                   "spacing": [5.0, 1.0, 1.0],
                   "architecture": {"arch_kwargs": {"strides": [1, 2, [1, 2, 2]], "n_stages": 3}}},
        },
    }


def _flatten(d, prefix=""):
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _diff(a: dict, b: dict) -> dict:
    fa, fb = _flatten(a), _flatten(b)
    return {k: (fa.get(k, "<absent>"), fb.get(k, "<absent>")) for k in set(fa) | set(fb) if fa.get(k) != fb.get(k)}


# ------------------------------------------------------------------------------------------------ merge semantics
def test_merge_objects_key_by_key_lists_replaced_comments_dropped():
    plans = small_plans()
    before = copy.deepcopy(plans)
    override = {
        "_comment": "top-level comment",
        "keep": {"b": [9], "c": {"_note": "x", "d": 5}},
        "configurations": {"2d": {"_why": "smaller", "batch_size": 2, "patch_size": [64, 64]}},
        "new_top": [1],
    }
    merged = apply_override(plans, override, "base_test")
    assert plans == before  # the input is not modified
    assert _diff(plans, merged) == {
        "plans_name": ("base", "base_test"),
        "keep.b": ([1, 2, 3], [9]),  # lists replaced, not merged or appended
        "keep.c.d": ("<absent>", 5),  # new object created, its comment dropped
        "configurations.2d.batch_size": (4, 2),
        "configurations.2d.patch_size": ([32, 48], [64, 64]),
        "new_top": ("<absent>", [1]),
    }
    assert merged["keep"]["a"] == 1  # sibling keys of a merged object survive
    assert "_comment" not in merged and "_why" not in merged["configurations"]["2d"]
    assert "_note" not in merged["keep"]["c"]


def test_merged_result_does_not_alias_input():
    plans = small_plans()
    override = {"keep": {"b": [7, 8]}}
    merged = apply_override(plans, override, "x")
    merged["keep"]["b"].append(0)
    merged["configurations"]["2d"]["patch_size"].append(0)
    assert override["keep"]["b"] == [7, 8]
    assert plans["configurations"]["2d"]["patch_size"] == [32, 48]


def test_comment_inside_configurations_is_ignored():
    # keys starting with '_' are comments at every level, also among the configuration names
    merged = apply_override(small_plans(), {"configurations": {"_doc": "only 2d", "2d": {"batch_size": 1}}}, "x")
    assert "_doc" not in merged["configurations"]
    assert merged["configurations"]["2d"]["batch_size"] == 1


def test_object_over_non_object_is_an_error():
    with pytest.raises(PlansOverrideError) as e:
        apply_override(small_plans(), {"keep": {"b": {"x": 1}}}, "x")
    assert "'keep.b'" in str(e.value) and "list" in str(e.value)


def test_unknown_configuration():
    with pytest.raises(PlansOverrideError) as e:
        apply_override(small_plans(), {"configurations": {"3d_lowres": {"batch_size": 1}}}, "x")
    msg = str(e.value)
    assert "'3d_lowres'" in msg and "'base'" in msg and "'2d'" in msg and "'3d'" in msg


@pytest.mark.parametrize("key, value", [("spacing", [2.0, 2.0]),
                                        ("normalization_schemes", ["CTNormalization"]),
                                        ("resampling_fn_data_kwargs", {"order": 1})])
def test_preprocessing_change_needs_new_data_identifier(key, value):
    with pytest.raises(PlansOverrideError) as e:
        apply_override(small_plans(), {"configurations": {"2d": {key: value}}}, "base_new")
    msg = str(e.value)
    assert "'2d'" in msg and key in msg and "'base_2d'" in msg and "data_identifier" in msg
    assert "-plans_name base_new" in msg
    merged = apply_override(small_plans(), {"configurations": {"2d": {key: value, "data_identifier": "new_2d"}}},
                            "base_new")
    assert merged["configurations"]["2d"]["data_identifier"] == "new_2d"
    assert merged["configurations"]["2d"][key] == value


def test_preprocessing_key_set_to_its_current_value_is_fine():
    merged = apply_override(small_plans(), {"configurations": {"2d": {"spacing": [1.0, 1.0]}}}, "x")
    assert merged["configurations"]["2d"]["data_identifier"] == "base_2d"


@pytest.mark.parametrize("conf, patch, ok", [
    # 2d strides [[1, 1], [2, 2], [2, 2]]: total (4, 4)
    ("2d", [64, 36], True), ("2d", [34, 48], False), ("2d", [48, 30], False),
    # 3d strides [1, 2, [1, 2, 2]]: total (1*2*1, 1*2*2, 1*2*2) = (2, 4, 4)
    ("3d", [6, 16, 20], True), ("3d", [5, 16, 16], False), ("3d", [6, 16, 18], False)])
def test_patch_size_divisible_by_total_stride(conf, patch, ok):
    override = {"configurations": {conf: {"patch_size": patch}}}
    if ok:
        assert apply_override(small_plans(), override, "x")["configurations"][conf]["patch_size"] == patch
    else:
        with pytest.raises(PlansOverrideError) as e:
            apply_override(small_plans(), override, "x")
        msg = str(e.value)
        assert f"'{conf}'" in msg and str(patch) in msg and "divisible" in msg


def test_stride_change_is_checked_against_the_patch():
    # six stages, total stride 2**5 = 32 per axis: patch (32, 48) no longer fits on the second axis
    strides = [[1, 1]] + [[2, 2]] * 5
    override = {"configurations": {"2d": {"architecture": {"arch_kwargs": {"strides": strides, "n_stages": 6}}}}}
    with pytest.raises(PlansOverrideError, match=r"'2d'.*\[32, 48\].*total stride \[32, 32\]"):
        apply_override(small_plans(), override, "x")
    override["configurations"]["2d"]["patch_size"] = [32, 64]
    merged = apply_override(small_plans(), override, "x")
    assert merged["configurations"]["2d"]["architecture"]["arch_kwargs"] == {"strides": strides, "n_stages": 6}


# ------------------------------------------------------------------------------------------------- load_override
def test_custom_override_file(tmp_path):
    path = tmp_path / "bigger_batch.json"
    path.write_text(json.dumps({"configurations": {"3d": {"batch_size": 5}}}))
    name, ov = load_override(str(path))
    assert name == "bigger_batch" and ov == {"configurations": {"3d": {"batch_size": 5}}}


def test_invalid_json_and_non_object(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"configurations": {"2d": {"batch_size": 2,}}}')
    with pytest.raises(PlansOverrideError) as e:
        load_override(str(bad))
    assert str(bad) in str(e.value) and "not valid JSON" in str(e.value)
    arr = tmp_path / "arr.json"
    arr.write_text("[1, 2]")
    with pytest.raises(PlansOverrideError, match="must be a JSON object, got list"):
        load_override(str(arr))


def test_unknown_override_name_lists_builtins():
    with pytest.raises(PlansOverrideError) as e:
        load_override("no_such_override")
    msg = str(e.value)
    assert "'no_such_override'" in msg and "cpu_small" in msg and "JSON file" in msg


def test_builtin_overrides_are_valid_json_objects():
    builtin = available_overrides()
    assert "cpu_small" in builtin
    for name, path in builtin.items():
        assert os.path.isfile(path) and path.endswith(f"{name}.json")
        assert load_override(name)[0] == name


# -------------------------------------------------------------------------------------------------- derive_plans
@pytest.fixture
def preprocessed(nnunet_env):
    folder = os.path.join(nnunet_env["nnUNet_preprocessed"], DATASET)
    os.makedirs(folder)
    with open(os.path.join(folder, "nnUNetPlans.json"), "w") as f:
        json.dump(real_plans(), f, indent=4)
    return folder


def test_cpu_small_on_real_plans(preprocessed):
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    src = os.path.join(preprocessed, "nnUNetPlans.json")
    src_bytes = open(src, "rb").read()
    new = derive_plans(preprocessed, "cpu_small")
    assert new == "nnUNetPlans_cpu_small"
    assert open(src, "rb").read() == src_bytes  # source untouched
    with open(os.path.join(preprocessed, f"{new}.json")) as f:
        derived = json.load(f)
    # documented: batch size 8 in the 2d configuration, nothing else changed (data identifiers kept)
    assert _diff(real_plans(), derived) == {"plans_name": ("nnUNetPlans", new),
                                            "configurations.2d.batch_size": (12, 8)}
    # nnU-Net itself reads the result
    pm = PlansManager(os.path.join(preprocessed, f"{new}.json"))
    assert pm.plans_name == new
    assert pm.get_configuration("2d").batch_size == 8
    assert pm.get_configuration("2d").data_identifier == "nnUNetPlans_2d"
    assert pm.get_configuration("3d_fullres").batch_size == 2


def test_derive_plans_custom_file_and_name(preprocessed, tmp_path):
    ov = tmp_path / "iso.json"
    ov.write_text(json.dumps({"_comment": "isotropic 2d",
                              "configurations": {"2d": {"spacing": [1.0, 1.0], "data_identifier": "iso_2d"}}}))
    assert derive_plans(preprocessed, str(ov)) == "nnUNetPlans_iso"
    assert derive_plans(preprocessed, str(ov), new_plans_name="MyPlans") == "MyPlans"
    for name in ("nnUNetPlans_iso", "MyPlans"):
        with open(os.path.join(preprocessed, f"{name}.json")) as f:
            d = json.load(f)
        assert d["plans_name"] == name and "_comment" not in d
        assert d["configurations"]["2d"]["spacing"] == [1.0, 1.0]
        assert d["configurations"]["3d_fullres"] == real_plans()["configurations"]["3d_fullres"]


def test_derive_plans_missing_source(preprocessed):
    with pytest.raises(PlansOverrideError) as e:
        derive_plans(preprocessed, "cpu_small", source_plans="OtherPlans")
    assert "OtherPlans" in str(e.value) and "nnUNetv2_plan_and_preprocess" in str(e.value)


def test_plans_cli(preprocessed, capsys, tmp_path):
    assert main(["plans", "-d", "986", "-o", "cpu_small"]) == 0
    assert "-p nnUNetPlans_cpu_small" in capsys.readouterr().out
    assert os.path.isfile(os.path.join(preprocessed, "nnUNetPlans_cpu_small.json"))
    # chained: derive from the derived plans
    assert main(["plans", "-d", DATASET, "-o", "cpu_small", "-p", "nnUNetPlans_cpu_small", "--name", "Twice"]) == 0
    with open(os.path.join(preprocessed, "Twice.json")) as f:
        assert json.load(f)["plans_name"] == "Twice"
    capsys.readouterr()
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"configurations": {"2d": {"patch_size": [50, 64]}}}))
    assert main(["plans", "-d", "986", "-o", str(bad)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "'2d'" in err and "divisible" in err
    assert not os.path.exists(os.path.join(preprocessed, "nnUNetPlans_bad.json"))
    assert main(["plans", "-d", "986", "-o", "nope"]) == 1
    assert "Unknown plans override 'nope'" in capsys.readouterr().err


def test_plans_cli_unknown_dataset(nnunet_env, capsys):
    assert main(["plans", "-d", "555", "-o", "cpu_small"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "No dataset with id 555" in err


def test_new_name_equal_to_the_source_is_refused(tmp_path):
    from nnunet_contrastive.prep.plans_override import PlansOverrideError, derive_plans

    plans = {"plans_name": "nnUNetPlans", "configurations": {"2d": {"batch_size": 12}}}
    src = tmp_path / "nnUNetPlans.json"
    src.write_text(json.dumps(plans))
    with pytest.raises(PlansOverrideError, match="source plans"):
        derive_plans(str(tmp_path), "cpu_small", "nnUNetPlans", new_plans_name="nnUNetPlans")
    assert json.loads(src.read_text()) == plans


# ------------------------------------------------------------------------------------------------ acdc_cpu
def acdc_plans() -> dict:
    """The 2d configuration nnU-Net 2.8.1's planner writes for the 80 ACDC training-pool patients (values read from
    a real run: spacing 1.484 mm, patch 256 x 224, 6 stages, batch 56)."""
    conf = _conf(2, "nnUNetPlans_2d", [256, 224], [[1, 1], [2, 2], [2, 2], [2, 2], [2, 2], [2, 2]], 56)
    conf["spacing"] = [1.4843800067901611, 1.4843800067901611]
    conf["architecture"]["arch_kwargs"]["features_per_stage"] = [32, 64, 128, 256, 512, 512]
    plans = real_plans()
    plans["configurations"] = {"2d": conf}
    return plans


def test_acdc_cpu_override_builds_a_working_network(nnunet_env):
    """The ACDC CPU tier: new spacing and data identifier (needs nnUNetv2_preprocess), patch 128 x 128, half the
    features, batch 8; nnU-Net's own network builder accepts it and maps a patch to logits of the patch's size."""
    import torch
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    folder = os.path.join(nnunet_env["nnUNet_preprocessed"], DATASET)
    os.makedirs(folder)
    with open(os.path.join(folder, "nnUNetPlans.json"), "w") as f:
        json.dump(acdc_plans(), f)
    new = derive_plans(folder, "acdc_cpu")
    conf = PlansManager(os.path.join(folder, f"{new}.json")).get_configuration("2d")
    assert conf.spacing == [2.5, 2.5] and conf.patch_size == [128, 128] and conf.batch_size == 8
    assert conf.data_identifier != "nnUNetPlans_2d"  # its own preprocessed data
    kwargs = conf.network_arch_init_kwargs
    assert kwargs["features_per_stage"] == [16, 32, 64, 128, 256, 256] and kwargs["n_stages"] == 6
    net = get_network_from_plans(conf.network_arch_class_name, kwargs, conf.network_arch_init_kwargs_req_import,
                                 1, 4, allow_init=True, deep_supervision=False)
    with torch.no_grad():
        assert net(torch.zeros(1, 1, 128, 128)).shape == (1, 4, 128, 128)
    # fewer multiply-adds than nnU-Net's own plans: half the features (1/4 of the conv work) on 0.29x the pixels
    assert 128 * 128 / (256 * 224) < 0.3
