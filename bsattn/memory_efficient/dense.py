"""``attention``: the dense reference, plain TensorFlow in the inputs' dtype (O(n²) memory)."""

from __future__ import annotations

import tensorflow as tf

from bsattn.memory_efficient.inputs import Inputs, check_inputs, zero_masked_keys


def causal_keep(n_q: int, n_k: int) -> tf.Tensor:
    """Bottom-right aligned causal mask → bool ``[i, j]``: query ``r`` sees keys ``<= r + (j - i)``."""
    rows = tf.range(n_q)[:, None]
    cols = tf.range(n_k)[None, :]
    return cols <= rows + (n_k - n_q)


def dense_attention(x: Inputs, causal: bool, scale: float) -> tf.Tensor:
    """``softmax(scale·q·kᵀ + bias, masked)·v`` of checked inputs → ``[b, h, i, d]``; a query with no kept key
    gives 0 (its gradients are 0, not NaN)."""
    dtype = x.q.dtype
    k, v = zero_masked_keys(x.keep, x.k, x.v)
    sim = tf.matmul(x.q * tf.constant(scale, dtype), k, transpose_b=True)  # [b, h, i, j]
    if x.bias is not None:
        sim = sim + x.bias
    keep = x.keep
    if causal:
        tri = causal_keep(x.n_q, x.n_k)[None, None]
        keep = tri if keep is None else keep & tri
    if keep is None:
        return tf.matmul(tf.nn.softmax(sim), v)
    # The lowest finite value keeps the softmax finite on a fully masked row; the where below zeroes it.
    sim = tf.where(keep, sim, tf.constant(dtype.min, dtype))
    attn = tf.where(keep, tf.nn.softmax(sim), tf.zeros([], dtype))
    return tf.matmul(attn, v)


def attention(
    q: tf.Tensor,
    k: tf.Tensor,
    v: tf.Tensor,
    mask: tf.Tensor | None = None,
    causal: bool = False,
    attn_bias: tf.Tensor | None = None,
    scale: float | None = None,
) -> tf.Tensor:
    """Dense attention ``[b, h, i, d], [b, h, j, d] x2 → [b, h, i, d]`` (the original's ``attention``).

    Args:
      q, k, v: one float dtype; computed in that dtype.
      mask: a bool ``[b, j]`` key mask, or broadcastable to ``[b, h, i, j]``; True = keep.
      causal: query ``r`` attends keys ``<= r + (j - i)`` (bottom-right aligned when ``i != j``).
      attn_bias: broadcastable to ``[b, h, i, j]``, added to the scaled scores; differentiable.
      scale: multiplies ``q·kᵀ``; default ``d**-0.5`` (bsattn's extension; the cosine-sim layer passes 1).
    A query with no kept key gives 0 (the original averages every value there). No dropout (as the original).
    """
    x = check_inputs(q, k, v, mask, attn_bias)
    return dense_attention(x, bool(causal), x.head_dim**-0.5 if scale is None else float(scale))
