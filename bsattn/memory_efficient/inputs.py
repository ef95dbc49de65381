"""Argument checks shared by the memory-efficient functions: ``q, k, v [b, h, n, d]``, masks, bias, buckets.

``check_inputs`` turns the user's arguments into one ``Inputs``: the tensors, the static sizes, a boolean keep
mask of rank 4 (a ``[b, j]`` key mask becomes ``[b, 1, 1, j]``) and a rank-4 additive bias, each dimension of
either 1 or the full size, so that the engines only ever broadcast, never guess.
"""

from __future__ import annotations

import numbers
from typing import NamedTuple

import tensorflow as tf

FLOAT_DTYPES = (tf.float32, tf.float16, tf.bfloat16, tf.float64)


class Inputs(NamedTuple):
    """Checked inputs of one attention call."""

    q: tf.Tensor  # [b, h, i, d]
    k: tf.Tensor  # [b, h, j, d]
    v: tf.Tensor  # [b, h, j, d]
    heads: int
    n_q: int  # i
    n_k: int  # j
    head_dim: int  # d
    keep: tf.Tensor | None  # bool [b|1, h|1, i|1, j]; True = attend
    bias: tf.Tensor | None  # [b|1, h|1, i|1, j|1], the dtype of q


def positive_int(name: str, value) -> int:
    """``value`` as an int; ValueError naming ``name`` unless it is a positive integer."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _full_shape(x: tf.Tensor, name: str, target: list) -> list:
    """The static shape of ``x`` left-padded with 1s to rank 4, checked to broadcast to ``target``
    (``[b, h, i, j]``, b may be None): every dimension is 1 or the target's; only the batch may be unknown."""
    if x.shape.rank is None or x.shape.rank > 4:
        raise ValueError(f"{name} must have rank <= 4 (broadcastable to [batch, heads, queries, keys]), got {x.shape}")
    dims = [1] * (4 - x.shape.rank) + x.shape.as_list()
    shown = ", ".join("?" if t is None else str(t) for t in target)
    for axis, (d, t) in enumerate(zip(dims, target, strict=True)):
        if d == 1 or d == t or (axis == 0 and (d is None or t is None)):
            continue
        raise ValueError(f"{name} of shape {x.shape} does not broadcast to [batch, heads, queries, keys] = [{shown}]")
    return dims


def check_inputs(q, k, v, mask=None, attn_bias=None) -> Inputs:
    """Checks and normalises one call's tensors (see the module docstring); errors name the argument.

    Args:
      q: ``[b, h, i, d]``; k, v: ``[b, h, j, d]``, one float dtype (float32, float16, bfloat16, float64).
      mask: None, a ``[b, j]`` key mask, or anything broadcastable to ``[b, h, i, j]``; True (nonzero) = keep.
      attn_bias: None or broadcastable to ``[b, h, i, j]``; added to the scaled scores.
    """
    q = tf.convert_to_tensor(q)
    k = tf.convert_to_tensor(k, dtype_hint=q.dtype)
    v = tf.convert_to_tensor(v, dtype_hint=q.dtype)
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.shape.rank != 4:
            raise ValueError(f"{name} must be [batch, heads, length, dim_head] (rank 4), got shape {x.shape}")
        if x.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must be float32, float16, bfloat16 or float64, got {x.dtype.name}")
    if not q.dtype == k.dtype == v.dtype:
        raise TypeError(f"q, k and v must share one dtype, got {q.dtype.name}, {k.dtype.name}, {v.dtype.name}")
    batch, heads, n_q, head_dim = q.shape.as_list()
    if heads is None or n_q is None or head_dim is None:
        raise ValueError(f"q needs static heads, length and dim_head, got shape {q.shape}")
    n_k = k.shape[2]
    if n_k is None:
        raise ValueError(f"k needs a static length, got shape {k.shape}")
    expected = tf.TensorShape([batch, heads, n_k, head_dim])
    for name, x in (("k", k), ("v", v)):
        if not x.shape.is_compatible_with(expected):
            raise ValueError(f"{name} must be [batch, heads, keys, dim_head] = {expected}, got shape {x.shape}")
    if n_q == 0 or n_k == 0 or head_dim == 0:
        raise ValueError(f"q and k need nonempty lengths and dim_head, got shapes {q.shape} and {k.shape}")
    keep, bias = check_masks(mask, attn_bias, batch, heads, n_q, n_k, q.dtype)
    return Inputs(q, k, v, heads, n_q, n_k, head_dim, keep, bias)


def check_masks(
    mask, attn_bias, batch: int | None, heads: int, n_q: int, n_k: int, dtype: tf.DType
) -> tuple[tf.Tensor | None, tf.Tensor | None]:
    """``mask`` → bool ``[b|1, h|1, i|1, j|1]`` and ``attn_bias`` → ``dtype`` ``[b|1, h|1, i|1, j|1]``
    (see ``check_inputs``); None stays None."""
    target = [batch, heads, n_q, n_k]

    keep = None
    if mask is not None:
        mask = tf.convert_to_tensor(mask)
        if mask.dtype != tf.bool:
            mask = tf.not_equal(mask, tf.zeros([], mask.dtype))
        if mask.shape.rank == 2:  # the original's key mask [b, j]
            if not mask.shape.is_compatible_with([batch, n_k]) and not mask.shape.is_compatible_with([1, n_k]):
                raise ValueError(f"mask of rank 2 must be a key mask [batch, keys] = [{batch}, {n_k}], got {mask.shape}")
            mask = mask[:, None, None, :]
        dims = _full_shape(mask, "mask", target)
        keep = tf.reshape(mask, [-1 if dims[0] is None else dims[0]] + dims[1:])

    bias = None
    if attn_bias is not None:
        attn_bias = tf.convert_to_tensor(attn_bias)
        if not attn_bias.dtype.is_floating:
            raise TypeError(f"attn_bias must be a float tensor, got {attn_bias.dtype.name}")
        dims = _full_shape(attn_bias, "attn_bias", target)
        bias = tf.cast(tf.reshape(attn_bias, [-1 if dims[0] is None else dims[0]] + dims[1:]), dtype)
    return keep, bias


def is_key_mask(keep: tf.Tensor | None) -> bool:
    """Whether a checked keep mask only masks keys (``[b|1, 1, 1, j]``)."""
    return keep is not None and keep.shape[1] == 1 and keep.shape[2] == 1


def zero_masked_keys(keep: tf.Tensor | None, k: tf.Tensor, v: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """``k, v [b, h, j, d]`` with the keys a key mask drops set to 0: they never matter, and zeroed, a NaN
    there cannot leak through ``0 · NaN`` in ``p · v``."""
    if not is_key_mask(keep):
        return k, v
    kept = keep[:, :, 0, :, None]
    return tuple(tf.where(kept, x, tf.zeros([], x.dtype)) for x in (k, v))


def check_buckets(q_bucket_size, k_bucket_size) -> tuple[int, int]:
    """The bucket sizes as ints; ValueError unless both are positive integers."""
    return positive_int("q_bucket_size", q_bucket_size), positive_int("k_bucket_size", k_bucket_size)


def check_rate(dropout) -> float:
    rate = float(dropout)
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
    return rate


def check_eps(eps) -> float:
    value = float(eps)
    if not value >= 0.0:
        raise ValueError(f"eps must be >= 0, got {eps!r}")
    return value
