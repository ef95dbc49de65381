"""Differentiable top-k (the original's ``topk``): a hard top-k whose values carry coordinate-descent gradients.

``c = coor_descent(x, k=min(k·ratio, n))``; the straight-through gate ``g = c + stop_gradient(1 - c)`` is 1 in
value (up to one rounding) with the gradient of ``c``; ``values, indices = top_k(x·g, k)``, so ``values`` equal
the plain top-k values of ``x`` and their gradient reaches ``x`` also through ``c``.

One difference from the original, whose selection ignores ``mask``: masked entries rank below every unmasked
one here (they are picked only when a row has fewer than ``k`` unmasked entries).
"""

from __future__ import annotations

import collections
import numbers

import tensorflow as tf

from bsattn import _checks as checks
from bsattn.colt5.coor_descent import coor_descent

TopkReturn = collections.namedtuple("TopkReturn", ["values", "indices", "coor_descent_values", "gates"])
"""``values [..., k]`` (dtype of x), ``indices [..., k]`` int32, ``coor_descent_values`` and ``gates [..., k]``
(float32; float64 for float64 x; None when ``non_differentiable``)."""


def topk(
    x: tf.Tensor,
    k: int,
    coor_descent_k_ratio: float = 9 / 8,
    n_iters: int = 20,
    eps: float = 0.1,
    eps_init: float | None = None,
    eps_decay: float = 1.0,
    mask: tf.Tensor | None = None,
    fused: bool = False,
    non_differentiable: bool = False,
) -> TopkReturn:
    """Top-``k`` of ``x [..., n]`` along the last axis → ``TopkReturn`` (see the module docstring)."""
    x = checks.float_tensor("x", x)
    n = x.shape[-1] if x.shape.rank else None
    if n is None:
        raise ValueError(f"x needs a static last dimension, got shape {x.shape}")
    k = checks.positive_int("k", k)
    if k > n:
        raise ValueError(f"k must be <= n={n} (the last dimension of x), got {k}")
    if non_differentiable:
        values, indices = tf.math.top_k(x, k)
        return TopkReturn(values, indices, None, None)
    ratio = coor_descent_k_ratio
    if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real) or not ratio >= 1:
        raise ValueError(f"coor_descent_k_ratio must be a number >= 1, got {ratio!r}")
    c = coor_descent(x, k=min(k * ratio, n), mask=mask, n_iters=n_iters, eps=eps, eps_init=eps_init,
                     eps_decay=eps_decay, fused=fused)  # fmt: skip
    gates = c + tf.stop_gradient(1.0 - c)
    gated = tf.cast(x, c.dtype) * gates
    ranked = gated if mask is None else tf.where(mask, gated, tf.constant(-float("inf"), c.dtype))
    _, indices = tf.math.top_k(ranked, k)
    values = tf.cast(tf.gather(gated, indices, batch_dims=x.shape.rank - 1), x.dtype)
    c_sel = tf.gather(c, indices, batch_dims=x.shape.rank - 1)
    g_sel = tf.gather(gates, indices, batch_dims=x.shape.rank - 1)
    return TopkReturn(values, indices, c_sel, g_sel)
