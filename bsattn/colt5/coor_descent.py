"""Coordinate-descent soft top-k (CoLT5's router core), the unrolled TensorFlow iteration.

Per row of ``s [..., n]``: the entropy-regularised relaxation ``max_y <s, y> + eps·H(y)`` subject to
``sum(y) = k`` and ``0 <= y <= 1``, solved by dual coordinate ascent exactly as the original::

    a = 0;  b = -s;  e = max(eps_init or eps, eps)
    repeat n_iters:  a = e·(log k - logsumexp((s + b) / e));  b = -relu(s + a);  e = max(e·eps_decay, eps)
    y = exp((s + a + b) / e)  ( = min(1, exp((s + a) / e)) ),   0 where masked

Plain ops, unrolled: differentiable w.r.t. ``s`` and a tensor ``k``, and XLA-compilable. Computes in float32 for
float32 / float16 / bfloat16 inputs and in float64 for float64 inputs, and returns ``s``'s dtype (as the original). ``fused=True``
runs the custom op ``bsattn.colt5.coor_descent_op.fused_coor_descent`` (same contract) instead.

Masked entries never reach a result: they are excluded from the log-sum-exp (``-inf``, where the original fills
``-finfo.max``; the same numbers) and their input values are not read, so a NaN there changes nothing. A row
with every entry masked gives zeros (the original's too) and a zero gradient (the original's can be NaN).
"""

from __future__ import annotations

import math

import tensorflow as tf

from bsattn.colt5.coor_descent_args import check_args, compute_dtype, eps_schedule
from bsattn.colt5.coor_descent_op import fused_coor_descent
from bsattn.gather_attention import in_xla_context


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
    """Soft top-k scores ``y [..., n]`` of ``s [..., n]`` in ``s``'s dtype (computed in float32, float64 for float64
    ``s``), see the module.

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
    out_dtype, dtype = s.dtype, compute_dtype(s.dtype)
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
    schedule = eps_schedule(n_iters, eps, eps_init, eps_decay)
    for e in schedule[:-1]:
        sb = (s + b) / e
        if mask is not None:
            sb = tf.where(keep, sb, neg_inf)
        a = e * (log_k - tf.reduce_logsumexp(sb, axis=-1, keepdims=True))
        b = -tf.nn.relu(s + a)
    y = tf.exp((s + a + b) / schedule[-1])
    if mask is not None:
        y = tf.where(mask, y, tf.zeros([], dtype))
    return tf.cast(y, out_dtype)
