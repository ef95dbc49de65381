"""Argument checks shared by the public functions: each failure names the argument and what was expected."""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any

FLOAT_DTYPES = ("float32", "float16", "bfloat16", "float64")


def positive_int(name: str, value: Any) -> int:
    """``value`` as an int ≥ 1 (bool, float, None, ... rejected)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def choice(name: str, value: Any, choices: Sequence) -> Any:
    """``value`` if it is one of ``choices`` (only strings and non-bool numbers can match: no array truthiness)."""
    comparable = isinstance(value, (str, numbers.Number)) and not isinstance(value, bool)
    if not (comparable and value in choices):
        shown = ", ".join(repr(c) for c in choices)
        raise ValueError(f"{name} must be one of ({shown}), got {value!r}")
    return value


def float_tensor(name: str, value: Any, dtype_hint=None):
    """``value`` as a float tensor (float32/16, bfloat16, float64); anything else is a TypeError naming it."""
    import tensorflow as tf

    try:
        x = tf.convert_to_tensor(value, dtype_hint=dtype_hint)
    except (TypeError, ValueError) as e:
        raise TypeError(f"{name} must be a float tensor, got {type(value).__name__}: {e}") from None
    if x.dtype.name not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16, bfloat16 or float64, got {x.dtype.name}")
    return x


def instance(name: str, value: Any, cls: type, hint: str = "") -> Any:
    if not isinstance(value, cls):
        raise TypeError(f"{name} must be a {cls.__name__}{hint}, got {type(value).__name__}")
    return value
