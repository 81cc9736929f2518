"""nnU-Net finds our trainers through nnUNet_extTrainer, set by the installed .pth in every new interpreter."""
import os
import pickle
import subprocess
import sys

import pytest

from nnunet_contrastive._discovery import ENV_VAR, export_line, ext_trainer_folder, register_ext_trainer_path


def _clean_env():
    env = dict(os.environ)
    env.pop(ENV_VAR, None)
    return env


def test_new_interpreter_gets_the_folder_from_the_pth_hook():
    code = "import os; print(os.environ.get('nnUNet_extTrainer', ''))"
    out = subprocess.run([sys.executable, "-c", code], env=_clean_env(), capture_output=True, text=True, check=True)
    assert ext_trainer_folder() in out.stdout.strip().split(os.pathsep)


def test_hook_keeps_existing_entries_and_does_not_duplicate():
    env = {ENV_VAR: "/some/other/folder"}
    assert register_ext_trainer_path(env) is True
    assert env[ENV_VAR].split(os.pathsep) == ["/some/other/folder", ext_trainer_folder()]
    assert register_ext_trainer_path(env) is False
    assert env[ENV_VAR].split(os.pathsep).count(ext_trainer_folder()) == 1


def test_export_line_sets_the_variable_in_bash():
    script = export_line() + f'\necho "${ENV_VAR}"'
    env = _clean_env()
    env[ENV_VAR] = "/a"
    out = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, check=True).stdout.strip()
    assert out.split(os.pathsep) == ["/a", ext_trainer_folder()]


def test_index_folder_holds_only_the_reexport_module():
    mods = [f for f in os.listdir(ext_trainer_folder()) if f.endswith(".py")]
    assert mods == ["nnunet_contrastive_trainer_index.py"]


@pytest.mark.parametrize("name", ["nnUNetTrainerFewLabels"])
def test_nnunet_lookup_returns_our_very_class_and_it_pickles(name):
    """Run in a fresh interpreter: the lookup must work with no manual step, and must not duplicate classes."""
    code = f"""
import pickle, sys
from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
import nnunet_contrastive.trainers as ours
cls = recursive_find_trainer_class_by_name({name!r})
assert cls is getattr(ours, {name!r}), (cls, cls.__module__)
assert pickle.loads(pickle.dumps(cls)) is cls
print("OK", cls.__module__)
"""
    out = subprocess.run([sys.executable, "-c", code], env=_clean_env(), capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "OK nnunet_contrastive.trainers" in out.stdout


def test_every_exported_trainer_is_found_in_process():
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    import nnunet_contrastive.trainers as ours

    register_ext_trainer_path()
    for name in ours.__all__:
        cls = recursive_find_trainer_class_by_name(name)
        assert cls is getattr(ours, name)
        assert pickle.loads(pickle.dumps(cls)) is cls


def test_cli_env_and_help():
    from nnunet_contrastive.cli import build_parser, main

    assert main(["env", "--export-only"]) == 0
    parser = build_parser()
    sub = [a for a in parser._actions if a.dest == "command"][0]
    for name, p in sub.choices.items():
        assert p.description, f"subcommand {name} has no description for --help"
    with pytest.raises(SystemExit) as e:
        main(["demo", "--help"])
    assert e.value.code == 0
