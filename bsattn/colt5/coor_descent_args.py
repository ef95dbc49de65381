"""Argument checks and the eps schedule shared by the unrolled and the fused coordinate descent (one contract)."""

from __future__ import annotations

import math
import numbers

import tensorflow as tf

from bsattn import _checks as checks


def _positive_real(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)


def check_args(s: tf.Tensor, n_iters, k, eps, eps_init, eps_decay, mask):
    """Validated ``(s, n_iters, k, eps, eps_init, eps_decay, mask)``; errors name the argument."""
    s = checks.float_tensor("s", s)
    if s.shape.rank is not None and s.shape.rank < 1:
        raise ValueError(f"s must have at least one dimension [..., n], got shape {s.shape}")
    n = s.shape[-1] if s.shape.rank else None
    if n is None or n == 0:
        raise ValueError(f"s needs a static, non-zero last dimension n, got shape {s.shape}")
    n_iters = checks.positive_int("n_iters", n_iters)
    eps = _positive_real("eps", eps)
    eps_init = None if eps_init is None else _positive_real("eps_init", eps_init)
    eps_decay = _positive_real("eps_decay", eps_decay)
    if tf.is_tensor(k) or not isinstance(k, numbers.Real) or isinstance(k, bool):
        try:
            k = tf.convert_to_tensor(k)
        except (TypeError, ValueError) as e:
            raise TypeError(f"k must be a number or a tensor of one value per row, got {k!r}: {e}") from None
        if not k.dtype.is_floating and not k.dtype.is_integer:
            raise TypeError(f"k must be a real number or tensor, got dtype {k.dtype.name}")
        rows = s.shape[:-1]
        if k.shape.rank is not None and k.shape.rank > 0 and not k.shape.is_compatible_with(rows):
            raise ValueError(f"k must be a number or have one value per row, shape {rows}, got shape {k.shape}")
        if tf.executing_eagerly():
            values = k.numpy()
            if (values <= 0).any() or (values > n).any():
                shown = f"[{values.min()}, {values.max()}]"
                raise ValueError(f"k must be in (0, n={n}] for every row, got values in {shown}")
    else:
        if not math.isfinite(k) or k <= 0 or k > n:
            raise ValueError(f"k must be in (0, n={n}], got {k!r}")
        k = float(k)
    if mask is not None:
        mask = tf.convert_to_tensor(mask)
        if mask.dtype != tf.bool:
            raise TypeError(f"mask must be a bool tensor (True = keep), got dtype {mask.dtype.name}")
        try:
            mask = tf.broadcast_to(mask, tf.shape(s))
        except (tf.errors.InvalidArgumentError, ValueError) as e:
            raise ValueError(f"mask of shape {mask.shape} does not broadcast to s's shape {s.shape}: {e}") from None
    return s, n_iters, k, eps, eps_init, eps_decay, mask


def compute_dtype(dtype: tf.DType) -> tf.DType:
    """float64 for float64, float32 for every other float dtype."""
    return tf.float64 if dtype == tf.float64 else tf.float32


def eps_schedule(n_iters: int, eps: float, eps_init: float | None = None, eps_decay: float = 1.0) -> list[float]:
    """The eps of every iteration and of the output, as the original computes them (Python floats):
    ``[eps_1, ..., eps_{n_iters}, eps_final]``, ``eps_1 = max(eps_init or eps, eps)``,
    ``eps_{t+1} = max(eps_t * eps_decay, eps)``; ``n_iters + 1`` values."""
    current = max(eps if eps_init is None else eps_init, eps)
    out = []
    for _ in range(n_iters + 1):
        out.append(current)
        current = max(current * eps_decay, eps)
    return out
