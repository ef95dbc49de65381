"""Coordinate-descent soft top-k (CoLT5's router core), the unrolled TensorFlow iteration.

Per row of ``s [..., n]``: the entropy-regularised relaxation ``max_y <s, y> + eps·H(y)`` subject to
``sum(y) = k`` and ``0 <= y <= 1``, solved by dual coordinate ascent exactly as the original::

    a = 0;  b = -s;  e = max(eps_init or eps, eps)
    repeat n_iters:  a = e·(log k - logsumexp((s + b) / e));  b = -relu(s + a);  e = max(e·eps_decay, eps)
    y = exp((s + a + b) / e)  ( = min(1, exp((s + a) / e)) ),   0 where masked

Plain ops, unrolled: differentiable w.r.t. ``s`` and a tensor ``k``, and XLA-compilable. Computes in float32 for
float32 / float16 / bfloat16 inputs and in float64 for float64 inputs, and returns that dtype. ``fused=True``
runs the custom op ``bsattn.colt5.coor_descent_op.fused_coor_descent`` (same contract) instead.

Masked entries never reach a result: they are excluded from the log-sum-exp (``-inf``, where the original fills
``-finfo.max``; the same numbers) and their input values are not read, so a NaN there changes nothing. A row
with every entry masked gives zeros (the original's too) and a zero gradient (the original's can be NaN).
"""

from __future__ import annotations

import math
import numbers

import tensorflow as tf

from bsattn import _checks as checks
from bsattn.colt5.coor_descent_op import fused_coor_descent
from bsattn.gather_attention import in_xla_context


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
        if not mask.shape.is_compatible_with(s.shape):
            raise ValueError(f"mask must have the shape of s, {s.shape}, got {mask.shape}")
    return s, n_iters, k, eps, eps_init, eps_decay, mask


def compute_dtype(dtype: tf.DType) -> tf.DType:
    """float64 for float64, float32 for every other float dtype."""
    return tf.float64 if dtype == tf.float64 else tf.float32


def coor_descent(
    s: tf.Tensor,
    *,
    n_iters: int,
    k: float | tf.Tensor,
    eps: float = 0.1,
    eps_init: float | None = None,
    eps_decay: float = 1.0,
    mask: tf.Tensor | None = None,
    fused: bool = False,
) -> tf.Tensor:
    """Soft top-k scores ``y [..., n]`` of ``s [..., n]`` (float32; float64 for float64 ``s``), see the module.

    Args:
      s: scores ``[..., n]`` (any float dtype; e.g. ``[rows, n]`` or ``[b, r, n]``).
      n_iters: iterations, >= 1 (the router uses 20; 50 with ``eps=1`` converges to ``sum(y) = k``).
      k: target row sum, a number in ``(0, n]`` or a tensor ``[...]`` with one value per row (differentiable).
      eps: the final entropy weight (> 0); ``eps_init`` the first one (``max(eps_init, eps)``); ``eps_decay``
        multiplies it after each iteration, never below ``eps`` (ε-scaling: ``eps_init=4, eps_decay=0.7``).
      mask: bool ``[..., n]`` (True = a candidate); masked entries get 0.
      fused: run the fused custom op (``bsattn.colt5.coor_descent_op``) instead of the unrolled loop (which
        still runs under XLA, where custom ops cannot).
    """
    if fused and not in_xla_context():  # custom ops do not compile under XLA: the unrolled loop runs there
        return fused_coor_descent(s, n_iters=n_iters, k=k, eps=eps, eps_init=eps_init, eps_decay=eps_decay, mask=mask)
    s, n_iters, k, eps, eps_init, eps_decay, mask = check_args(s, n_iters, k, eps, eps_init, eps_decay, mask)
    dtype = compute_dtype(s.dtype)
    s = tf.cast(s, dtype)
    if tf.is_tensor(k):
        k = tf.cast(k, dtype)
        log_k = tf.math.log(tf.maximum(k, tf.constant(1e-20, dtype)))
        log_k = log_k[..., None] if k.shape.rank else log_k
    else:
        log_k = tf.constant(math.log(max(k, 1e-20)), dtype)
    neg_inf = tf.constant(-math.inf, dtype)
    if mask is not None:
        # A fully masked row is computed as if unmasked (finite numbers, zero gradient) and zeroed at the end.
        row_has_any = tf.reduce_any(mask, axis=-1, keepdims=True)
        keep = tf.logical_or(mask, tf.logical_not(row_has_any))
        s = tf.where(mask, s, tf.zeros([], dtype))  # masked values are never read
    a = tf.zeros([], dtype)
    b = -s
    e = max(eps if eps_init is None else eps_init, eps)
    for _ in range(n_iters):
        sb = (s + b) / e
        if mask is not None:
            sb = tf.where(keep, sb, neg_inf)
        a = e * (log_k - tf.reduce_logsumexp(sb, axis=-1, keepdims=True))
        b = -tf.nn.relu(s + a)
        e = max(e * eps_decay, eps)
    y = tf.exp((s + a + b) / e)
    if mask is not None:
        y = tf.where(mask, y, tf.zeros([], dtype))
    return y
