"""The wheel must contain every package folder of the source tree and our .pth hook."""
import os
import tomllib

from conftest import REPO


def _pyproject():
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)


def test_every_package_folder_is_listed_in_pyproject():
    conf = _pyproject()["tool"]["setuptools"]
    listed = set(conf["packages"])
    dirs = conf["package-dir"]
    found = set()
    for pkg, rel in dirs.items():
        root = os.path.join(REPO, rel)
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = [d for d in dirnames if d != "__pycache__"]
            if "__init__.py" in filenames:
                sub = os.path.relpath(dirpath, root)
                found.add(pkg if sub == "." else pkg + "." + sub.replace(os.sep, "."))
    # folders mapped elsewhere (trainers, plans_overrides) also appear under nnunet_contrastive only via mapping
    assert found - listed == set(), f"package folders missing from pyproject [tool.setuptools] packages: {found - listed}"


def test_installed_package_has_trainers_overrides_and_pth():
    import site

    import nnunet_contrastive.plans_overrides as po
    import nnunet_contrastive.trainers as tr
    from nnunet_contrastive.prep.plans_override import available_overrides

    assert tr.nnUNetTrainerFewLabels.__module__ == "nnunet_contrastive.trainers.few_labels"
    assert "cpu_small" in available_overrides()
    assert os.path.isdir(os.path.dirname(po.__file__))
    pths = [os.path.join(d, "nnunet_contrastive.pth") for d in site.getsitepackages()]
    assert any(os.path.isfile(p) for p in pths), f"nnunet_contrastive.pth not installed in {pths}"
