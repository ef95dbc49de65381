"""Lazy exports of a package: names resolved from their modules on first access, so importing a package needs
no TensorFlow until a TensorFlow-using name is touched (the NumPy parts also work in the GPU device harness)."""

from __future__ import annotations

import importlib
from collections.abc import Callable


def lazy_exports(package: str, exports: dict[str, str], submodules: tuple[str, ...] = ()) -> tuple[
    list[str], Callable[[str], object], Callable[[], list[str]]
]:
    """``(__all__, __getattr__, __dir__)`` for ``package``: ``exports`` maps a public name to the module defining
    it, ``submodules`` are names of the package's own modules; a resolved value is cached in the package."""
    public = sorted(exports) + list(submodules)

    def getattr_(name: str):
        if name in exports:
            value = getattr(importlib.import_module(exports[name]), name)
        elif name in submodules:
            value = importlib.import_module(f"{package}.{name}")
        else:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        setattr(importlib.import_module(package), name, value)  # later lookups skip __getattr__
        return value

    def dir_() -> list[str]:
        return sorted(set(vars(importlib.import_module(package))) | set(public))

    return public, getattr_, dir_
