"""Build hook: install `nnunet_contrastive.pth` at the site-packages root (wheel and editable installs).

The .pth line runs at interpreter start and appends our trainer-index folder to `nnUNet_extTrainer`, nnU-Net's
official plugin mechanism (nnunetv2 >= 2.8.0), so `nnUNetv2_train -tr nnUNetTrainerFewLabels` works from a new
shell with no manual step. Everything else is declared in pyproject.toml.
"""
import os
import shutil

from setuptools import setup
from setuptools.command.build_py import build_py

PTH_NAME = "nnunet_contrastive.pth"
PTH_SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "nnunet_contrastive", "_nnunet_ext", PTH_NAME)


class build_py_with_pth(build_py):
    """Regular (wheel) builds: the .pth goes to the root of build_lib, i.e. site-packages."""

    def run(self):
        super().run()
        if not getattr(self, "editable_mode", False):
            self.copy_file(PTH_SRC, os.path.join(self.build_lib, PTH_NAME), preserve_mode=0)

    def get_outputs(self, include_bytecode=1):
        extra = [] if getattr(self, "editable_mode", False) else [os.path.join(self.build_lib, PTH_NAME)]
        return super().get_outputs(include_bytecode) + extra


cmdclass = {"build_py": build_py_with_pth}

try:  # editable installs (pip install -e): add the same .pth to the editable wheel
    from setuptools.command.editable_wheel import editable_wheel

    class editable_wheel_with_pth(editable_wheel):
        def _install_namespaces(self, installation_dir, pth_prefix):
            super()._install_namespaces(installation_dir, pth_prefix)
            shutil.copyfile(PTH_SRC, os.path.join(installation_dir, PTH_NAME))

    cmdclass["editable_wheel"] = editable_wheel_with_pth
except ImportError:  # very old setuptools: editable users run `eval "$(nnunet-contrastive env --export-only)"`
    pass

setup(cmdclass=cmdclass)
