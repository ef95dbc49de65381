"""pip build of bsattn: the op library is compiled by build_config.build_library (g++, plus nvcc when found).

    pip install --no-build-isolation -e .      # developers and CI (TF already installed)
    pip install -e .                           # also works: pyproject.toml pulls TF into the build env

The library keeps the fixed name bsattn/_bsattn_ops.so (not the python-tagged extension name) so that
pip and Bazel produce the same file, loaded by bsattn/_loader.py.
"""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

# setuptools.build_meta does not put the project directory on sys.path.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import build_config


class BuildOps(build_ext):
    """Builds the op library instead of a Python extension module."""

    def get_ext_filename(self, fullname: str) -> str:
        return os.path.join(*fullname.split(".")) + ".so"  # bsattn/_bsattn_ops.so, no ABI tag

    def build_extension(self, ext: Extension) -> None:
        out = Path(self.get_ext_fullpath(ext.name))
        try:
            build_config.build_library(out, verbose=bool(self.verbose > 1), builder="pip")
        except build_config.BuildError as e:
            sys.exit(f"error: building the bsattn op library failed:\n{e}")

    def copy_extensions_to_source(self) -> None:
        """Editable installs: library and build info into bsattn/, each replaced atomically (setuptools
        would overwrite the library in place, crashing any process that has it loaded)."""
        build_py = self.get_finalized_command("build_py")
        for ext in self.extensions:
            fullname = self.get_ext_fullname(ext.name)
            regular = Path(self.build_lib) / self.get_ext_filename(fullname)
            inplace = Path(build_py.get_package_dir(fullname.rpartition(".")[0])) / regular.name
            for name in (inplace.name, build_config.BUILD_INFO_NAME):
                tmp = inplace.with_name(name + ".tmp")
                shutil.copy2(regular.with_name(name), tmp)
                os.replace(tmp, inplace.with_name(name))


setup(
    name="bsattn",
    version="0.1.0",
    description="Block-sparse attention ops for TensorFlow 2 (a revival of OpenAI's blocksparse)",
    python_requires=">=3.10",
    packages=find_packages(include=["bsattn", "bsattn.*"]),
    ext_modules=[Extension("bsattn._bsattn_ops", sources=[])],  # sources: see build_config.discover_sources
    cmdclass={"build_ext": BuildOps},
    install_requires=["tensorflow==2.21.0", "numpy", "absl-py"],
    extras_require={"test": ["pytest", "hypothesis"]},
    zip_safe=False,
)
