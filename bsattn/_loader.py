"""Loads the compiled op library once (``_bsattn_ops.so``, built by pip, ``build_config.py`` or Bazel).

``$BSATTN_OPS_LIBRARY`` overrides the location (CI uses it to test the Bazel-built library). The build
writes ``_build_info.json`` next to the library; it records the TensorFlow version the library was
compiled against, so a mismatch is reported clearly instead of as an undefined symbol (or a crash).
"""
from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from types import ModuleType
from typing import Any

LIBRARY_ENV = "BSATTN_OPS_LIBRARY"
LIB_NAME = "_bsattn_ops.so"
BUILD_INFO_NAME = "_build_info.json"

_lock = threading.Lock()
_ops: ModuleType | None = None


class OpsLibraryError(ImportError):
    """The op library is missing, or does not match the installed TensorFlow."""


_HOW_TO_BUILD = ("(Re)build it with `pip install --no-build-isolation -e .` (or `python build_config.py` "
                 "for the in-place dev build) from the repository root.")


def library_path() -> Path:
    """Where the library is loaded from: ``$BSATTN_OPS_LIBRARY``, else next to this file."""
    env = os.environ.get(LIBRARY_ENV)
    return Path(env).expanduser().resolve() if env else Path(__file__).resolve().with_name(LIB_NAME)


def build_info() -> dict[str, Any] | None:
    """What the build recorded next to the library (tf_version, cuda, cuda_archs, ...), or None."""
    path = library_path().with_name(BUILD_INFO_NAME)
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def load_ops() -> ModuleType:
    """The module of generated op wrappers; loaded on first call, then cached (thread-safe)."""
    global _ops
    if _ops is not None:
        return _ops
    with _lock:
        if _ops is None:  # another thread may have loaded it while we waited
            _ops = _load()
    return _ops


def _load() -> ModuleType:
    import tensorflow as tf  # deferred: importing bsattn must not cost a TF import

    path = library_path()
    if not path.is_file():
        where = f"${LIBRARY_ENV}={os.environ[LIBRARY_ENV]}" if os.environ.get(LIBRARY_ENV) else str(path)
        raise OpsLibraryError(f"bsattn op library not found: {where}. {_HOW_TO_BUILD}")
    info = build_info() or {}
    built_for = info.get("tf_version")
    # Check before loading: an ABI mismatch can crash inside dlopen instead of raising.
    if built_for and built_for != tf.__version__:
        raise OpsLibraryError(
            f"{path} was built for TensorFlow {built_for}, but TensorFlow {tf.__version__} is installed. "
            f"Rebuild it against the installed TensorFlow. {_HOW_TO_BUILD}")
    try:
        return tf.load_op_library(str(path))
    except (tf.errors.NotFoundError, RuntimeError, OSError) as e:
        # Typically "undefined symbol: _ZN10tensorflow...": built against another TF.
        raise OpsLibraryError(
            f"cannot load {path} (built for TensorFlow {built_for or 'unknown'}, installed "
            f"{tf.__version__}): {e}\n{_HOW_TO_BUILD}") from e
