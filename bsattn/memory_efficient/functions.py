"""The original's functions on ``[b, h, n, d]`` tensors, each on the fused op or the chunked engine.

``engine``: ``"fused"`` (bsattn's fused op), ``"chunked"`` (pure TensorFlow, ``bsattn.memory_efficient.chunked``)
or None: the fused op, except inside an XLA compilation (``tf.function(jit_compile=True)``: the op has no
XLA kernel) or when the op library cannot load, where the chunked engine runs. Both compute the same attention
(the bucket sizes only chunk the second one); the dense reference is ``bsattn.memory_efficient.attention``.
"""

from __future__ import annotations

import functools

import numpy as np
import tensorflow as tf
from tensorflow.python.framework import ops as tf_ops
from tensorflow.python.ops import control_flow_util

from bsattn._loader import OpsLibraryError, load_ops
from bsattn.memory_efficient.chunked import chunked_attention
from bsattn.memory_efficient.fused_engine import fused_engine, fused_geometry
from bsattn.memory_efficient.inputs import (
    Inputs,
    check_buckets,
    check_eps,
    check_inputs,
    check_rate,
)

ENGINES = ("fused", "chunked")


def in_xla_context() -> bool:
    """Whether ops built now are compiled by XLA (``tf.function(jit_compile=True)``, Keras ``jit_compile``)."""
    return control_flow_util.GraphOrParentsInXlaContext(tf_ops.get_default_graph())


@functools.lru_cache(maxsize=1)
def ops_available() -> bool:
    """Whether bsattn's op library loads (checked once)."""
    try:
        load_ops()
    except OpsLibraryError:
        return False
    return True


def choose_engine(engine: str | None) -> str:
    """The engine that runs: ``engine`` checked, or the automatic choice for None (module docstring)."""
    if engine is None:
        return "chunked" if in_xla_context() or not ops_available() else "fused"
    if engine not in ENGINES:
        raise ValueError(f"engine must be 'fused', 'chunked' or None, got {engine!r}")
    if engine == "fused" and in_xla_context():
        raise ValueError("engine='fused' cannot run under XLA (jit_compile=True): use engine='chunked' or None")
    return engine


def op_scale(scale: float, dtype: tf.DType) -> float:
    """The scale as the fused op uses it, rounded to float32 except for float64 inputs (so that both engines
    use the same value)."""
    return float(scale) if dtype == tf.float64 else float(np.float32(scale))


def to_heads(x: tf.Tensor, heads: int) -> tf.Tensor:
    """``[b, n, h*d] → [b, h, n, d]``."""
    n, width = x.shape[1], x.shape[2]
    return tf.transpose(tf.reshape(x, [-1, n, heads, width // heads]), [0, 2, 1, 3])


def run_engine(
    x: Inputs,
    engine: str | None,
    causal: bool,
    scale: float,
    buckets: tuple[int, int],
    eps: float = 0.0,
    stable: bool = True,
    dropout_rate: float = 0.0,
    seed: int | tf.Tensor | None = None,
) -> tf.Tensor:
    """Checked inputs on the chosen engine → ``[b, h, i, d]``."""
    scale = op_scale(scale, x.q.dtype)
    if choose_engine(engine) == "fused":
        return fused_engine(x.q, x.k, x.v, x.heads, x.keep, x.bias, causal, scale, dropout_rate, seed,
                            head_major=True)  # fmt: skip
    _, tq, tk = fused_geometry(x.n_q, x.n_k)
    if seed is not None:
        seed = tf.convert_to_tensor(seed, tf.int64)
    return chunked_attention(x, causal, scale, *buckets, eps=eps, stable=stable, dropout_rate=dropout_rate,
                             seed=seed, counter_lengths=(tq, tk))  # fmt: skip


def memory_efficient_attention(
    q: tf.Tensor,
    k: tf.Tensor,
    v: tf.Tensor,
    mask: tf.Tensor | None = None,
    causal: bool = False,
    attn_bias: tf.Tensor | None = None,
    q_bucket_size: int = 512,
    k_bucket_size: int = 1024,
    eps: float = 1e-8,
    dropout: float = 0.0,
    training: bool = False,
    *,
    engine: str | None = None,
    seed: int | tf.Tensor | None = None,
) -> tf.Tensor:
    """Exact attention in O(n) memory (Rabe & Staats): ``[b, h, i, d], [b, h, j, d] x2 → [b, h, i, d]``.

    Args:
      q, k, v: one float dtype (float32, float16, bfloat16, float64); computed in float32 (float64).
      mask: a bool ``[b, j]`` key mask, or broadcastable to ``[b, h, i, j]``; True = keep.
      causal: query ``r`` attends keys ``<= r + (j - i)`` (bottom-right aligned).
      attn_bias: broadcastable to ``[b, h, i, j]``, added to the ``d**-0.5``-scaled scores; differentiable.
      q_bucket_size, k_bucket_size: the chunked engine's chunk lengths (positive; any ``n``).
      eps: the chunked engine divides by ``sum + eps`` as the original; the fused op normalises exactly (the
        difference is ``eps / sum`` relative, ``sum >= 1`` after the max is subtracted).
      dropout, training: attention dropout when ``training``: an attention weight is dropped with probability
        ``dropout`` and the kept ones are scaled by ``1 / (1 - dropout)`` (the fused op's dropout; the
        backward pass uses the same mask; both engines drop the same entries for one ``seed``).
      engine: ``"fused"``, ``"chunked"`` or None (module docstring).
      seed: int64 seed of the dropout (None: a new one per call).
    A query with no kept key gives 0 (finite gradients).
    """
    x = check_inputs(q, k, v, mask, attn_bias)
    buckets = check_buckets(q_bucket_size, k_bucket_size)
    rate = check_rate(dropout) if training else 0.0
    return run_engine(x, engine, bool(causal), x.head_dim**-0.5, buckets, eps=check_eps(eps), dropout_rate=rate,
                      seed=seed)  # fmt: skip


def flash_attention(
    q: tf.Tensor,
    k: tf.Tensor,
    v: tf.Tensor,
    mask: tf.Tensor | None = None,
    causal: bool = False,
    q_bucket_size: int = 512,
    k_bucket_size: int = 1024,
    *,
    engine: str | None = None,
) -> tf.Tensor:
    """The original's ``FlashAttentionFunction``: ``[b, h, i, d], [b, h, j, d] x2 → [b, h, i, d]``.

    ``mask``: a bool ``[b, j]`` key mask or broadcastable to ``[b, h, i, j]``; ``causal`` bottom-right aligned;
    no bias, no dropout; exact normalisation (no eps). See ``memory_efficient_attention`` for the rest.
    """
    x = check_inputs(q, k, v, mask)
    return run_engine(x, engine, bool(causal), x.head_dim**-0.5, check_buckets(q_bucket_size, k_bucket_size))


def numerically_unstable_memory_efficient_attention(
    q: tf.Tensor,
    k: tf.Tensor,
    v: tf.Tensor,
    mask: tf.Tensor | None = None,
    causal: bool = False,
    attn_bias: tf.Tensor | None = None,
    q_bucket_size: int = 512,
    k_bucket_size: int = 1024,
    eps: float = 1e-8,
    *,
    engine: str | None = None,
) -> tf.Tensor:
    """The cosine-sim variant: ``softmax(q·kᵀ + bias)·v`` with **no** scaling of ``q·kᵀ`` (the caller bounds the
    scores, e.g. L2-normalised q and k) → ``[b, h, i, d]``.

    The chunked engine adds plain ``exp(s)`` over chunks without a running max (as the original: overflows
    for scores above ~88 in float32) and divides by ``sum + eps``; the fused op is the stable softmax.
    """
    x = check_inputs(q, k, v, mask, attn_bias)
    buckets = check_buckets(q_bucket_size, k_bucket_size)
    return run_engine(x, engine, bool(causal), 1.0, buckets, eps=check_eps(eps), stable=False)
