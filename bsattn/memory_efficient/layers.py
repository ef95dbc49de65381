"""Keras 3 layers of the original: ``MemoryEfficientAttention`` (its ``Attention``), ``FlashAttention``,
``CosineSimAttention``; ``x [b, n, dim]`` (and ``context [b, m, dim]``) → ``[b, n, dim]``.

Weights, bias-free, in this order (as the original's ``Linear`` layers, Keras kernels ``[in, out]``):
``to_q [dim, h·d]``, ``to_kv [dim, 2·h·d]`` (keys then values), ``to_out [h·d, dim]``; ``MemoryEfficientAttention``
and ``FlashAttention`` have the same structure, so ``set_weights`` of one's weights into the other works.
``CosineSimAttention`` adds ``scale [heads]`` (the original's ``(1, heads, 1, 1)``), initialised to
``-log(log2(seq_len² - seq_len))``. On the fused engine the ``[b, n, h·d]`` projections go to the op as they
are (no transposes); the dense and chunked paths split the heads.
"""

from __future__ import annotations

import math

import keras
import tensorflow as tf

from bsattn.memory_efficient.dense import dense_attention
from bsattn.memory_efficient.functions import (
    choose_engine,
    op_scale,
    run_engine,
    to_heads,
)
from bsattn.memory_efficient.fused_engine import fused_engine
from bsattn.memory_efficient.inputs import (
    Inputs,
    check_buckets,
    check_masks,
    check_rate,
    positive_int,
)


class _Projections(keras.layers.Layer):
    """The shared part: the three projections, argument checks and the engine call."""

    def __init__(self, dim: int, heads: int, dim_head: int, causal: bool, q_bucket_size: int, k_bucket_size: int,
                 **kwargs):  # fmt: skip
        super().__init__(**kwargs)
        self.dim = positive_int("dim", dim)
        self.heads = positive_int("heads", heads)
        self.dim_head = positive_int("dim_head", dim_head)
        self.causal = bool(causal)
        self.q_bucket_size, self.k_bucket_size = check_buckets(q_bucket_size, k_bucket_size)
        inner = self.heads * self.dim_head
        dense = {"use_bias": False, "dtype": self.dtype_policy}
        self.to_q = keras.layers.Dense(inner, name="to_q", **dense)
        self.to_kv = keras.layers.Dense(2 * inner, name="to_kv", **dense)
        self.to_out = keras.layers.Dense(self.dim, name="to_out", **dense)
        # ``mask`` is an argument of call (a key mask arrives from e.g. Embedding(mask_zero=True)); the output
        # carries no mask (compute_mask), which is what Keras needs to hear to stay quiet.
        self.supports_masking = True

    def build(self, input_shape):
        self.to_q.build(input_shape)
        self.to_kv.build(input_shape)
        self.to_out.build(tuple(input_shape[:-1]) + (self.heads * self.dim_head,))

    def compute_output_shape(self, input_shape, *args, **kwargs):
        return input_shape

    def compute_mask(self, inputs, mask=None):
        return None

    def _project(self, x, context):
        """``q [b, n, h·d]``, ``k, v [b, m, h·d]``."""
        for name, t in (("x", x), ("context", context)):
            if t is not None and (t.shape.rank != 3 or t.shape[-1] != self.dim):
                raise ValueError(f"{name} must be [batch, length, {self.dim}], got shape {t.shape}")
        kv = self.to_kv(x if context is None else context)
        k, v = tf.split(kv, 2, axis=-1)
        return self.to_q(x), k, v

    def _attend(self, q, k, v, mask, attn_bias, memory_efficient, buckets, scale, eps=0.0, stable=True,
                dropout_rate=0.0):  # fmt: skip
        """Flat ``q [b, n, h·d]``, ``k, v [b, m, h·d]`` → ``to_out`` of the attention, ``[b, n, dim]``."""
        n_q, n_k = q.shape[1], k.shape[1]
        if n_q is None or n_k is None:
            raise ValueError(f"{self.name} needs static sequence lengths, got {q.shape} and {k.shape}")
        keep, bias = check_masks(mask, attn_bias, q.shape[0], self.heads, n_q, n_k, q.dtype)
        if memory_efficient and choose_engine(None) == "fused":
            out = fused_engine(q, k, v, self.heads, keep, bias, self.causal, op_scale(scale, q.dtype), dropout_rate)
        else:
            x = Inputs(*(to_heads(t, self.heads) for t in (q, k, v)), self.heads, n_q, n_k, self.dim_head, keep, bias)
            if memory_efficient:
                out = run_engine(x, "chunked", self.causal, scale, buckets, eps=eps, stable=stable,
                                 dropout_rate=dropout_rate)  # fmt: skip
            else:
                out = dense_attention(x, self.causal, scale)
            out = tf.reshape(tf.transpose(out, [0, 2, 1, 3]), [-1, n_q, self.heads * self.dim_head])
        return self.to_out(out)

    def _buckets(self, q_bucket_size, k_bucket_size) -> tuple[int, int]:
        return check_buckets(q_bucket_size or self.q_bucket_size, k_bucket_size or self.k_bucket_size)

    def get_config(self) -> dict:
        return {
            **super().get_config(),
            "dim": self.dim,
            "heads": self.heads,
            "dim_head": self.dim_head,
            "causal": self.causal,
            "q_bucket_size": self.q_bucket_size,
            "k_bucket_size": self.k_bucket_size,
        }


@keras.saving.register_keras_serializable(package="bsattn")
class MemoryEfficientAttention(_Projections):
    """The original's ``Attention``: ``call(x, context=None, mask=None, attn_bias=None, memory_efficient=None,
    q_bucket_size=None, k_bucket_size=None, training=None)`` → ``[b, n, dim]``.

    ``memory_efficient`` (the layer's default or the per-call override): False = the dense ``attention`` (no
    dropout, as the original), True = ``memory_efficient_attention`` with ``dropout`` when training. ``mask``: a
    bool ``[b, m]`` key mask (of ``context`` if given) or broadcastable to ``[b, h, n, m]``; ``attn_bias``
    broadcastable to ``[b, h, n, m]``.
    """

    def __init__(self, dim: int, heads: int = 8, dim_head: int = 64, dropout: float = 0.0, causal: bool = False,
                 memory_efficient: bool = False, q_bucket_size: int = 512, k_bucket_size: int = 1024,
                 **kwargs):  # fmt: skip
        super().__init__(dim, heads, dim_head, causal, q_bucket_size, k_bucket_size, **kwargs)
        self.dropout = check_rate(dropout)
        self.memory_efficient = bool(memory_efficient)

    def call(self, x, context=None, mask=None, attn_bias=None, memory_efficient=None, q_bucket_size=None,
             k_bucket_size=None, training=None):  # fmt: skip
        memory_efficient = self.memory_efficient if memory_efficient is None else bool(memory_efficient)
        q, k, v = self._project(x, context)
        rate = self.dropout if training and memory_efficient else 0.0
        return self._attend(q, k, v, mask, attn_bias, memory_efficient, self._buckets(q_bucket_size, k_bucket_size),
                            self.dim_head**-0.5, eps=1e-8, dropout_rate=rate)  # fmt: skip

    def get_config(self) -> dict:
        return {**super().get_config(), "dropout": self.dropout, "memory_efficient": self.memory_efficient}


@keras.saving.register_keras_serializable(package="bsattn")
class FlashAttention(_Projections):
    """The original's ``FlashAttention`` module: ``call(x, context=None, mask=None, q_bucket_size=None,
    k_bucket_size=None)`` → ``[b, n, dim]`` (``flash_attention``; the weights of ``MemoryEfficientAttention``)."""

    def __init__(self, dim: int, heads: int = 8, dim_head: int = 64, causal: bool = False, q_bucket_size: int = 512,
                 k_bucket_size: int = 1024, **kwargs):  # fmt: skip
        super().__init__(dim, heads, dim_head, causal, q_bucket_size, k_bucket_size, **kwargs)

    def call(self, x, context=None, mask=None, q_bucket_size=None, k_bucket_size=None):
        q, k, v = self._project(x, context)
        return self._attend(q, k, v, mask, None, True, self._buckets(q_bucket_size, k_bucket_size), self.dim_head**-0.5)


@keras.saving.register_keras_serializable(package="bsattn")
class CosineSimAttention(_Projections):
    """The original's ``CosineSimAttention``: q and k L2-normalised per head, q multiplied by ``exp(scale)``
    (a learned scale per head), no ``d**-0.5``; ``call(x, context=None, mask=None, attn_bias=None,
    memory_efficient=None, q_bucket_size=None, k_bucket_size=None)`` → ``[b, n, dim]``.

    ``memory_efficient``: False = the dense softmax, True = ``numerically_unstable_memory_efficient_attention``.
    ``seq_len`` (≥ 2) only sets the scale's initial value.
    """

    def __init__(self, dim: int, seq_len: int, heads: int = 8, dim_head: int = 64, causal: bool = False,
                 memory_efficient: bool = False, q_bucket_size: int = 512, k_bucket_size: int = 1024,
                 **kwargs):  # fmt: skip
        super().__init__(dim, heads, dim_head, causal, q_bucket_size, k_bucket_size, **kwargs)
        self.seq_len = positive_int("seq_len", seq_len)
        if self.seq_len < 2:
            raise ValueError(f"seq_len must be at least 2 (the scale is -log(log2(seq_len² - seq_len))), got {seq_len}")
        self.memory_efficient = bool(memory_efficient)

    def build(self, input_shape):
        super().build(input_shape)
        init = -math.log(math.log2(self.seq_len**2 - self.seq_len))
        self.scale = self.add_weight(name="scale", shape=(self.heads,), initializer=keras.initializers.Constant(init))

    def call(self, x, context=None, mask=None, attn_bias=None, memory_efficient=None, q_bucket_size=None,
             k_bucket_size=None):  # fmt: skip
        memory_efficient = self.memory_efficient if memory_efficient is None else bool(memory_efficient)
        q, k, v = self._project(x, context)
        gain = tf.repeat(tf.exp(tf.cast(self.scale, q.dtype)), self.dim_head)  # [h·d]: head h's exp(scale)
        q, k = self._l2_normalize(q), self._l2_normalize(k)
        return self._attend(q * gain, k, v, mask, attn_bias, memory_efficient,
                            self._buckets(q_bucket_size, k_bucket_size), 1.0, eps=1e-8, stable=False)  # fmt: skip

    def _l2_normalize(self, x):
        """Each head's ``d`` channels of ``x [b, n, h·d]`` divided by ``max(norm, 1e-12)`` (torch's normalize)."""
        shape = tf.shape(x)
        heads = tf.reshape(x, [shape[0], shape[1], self.heads, self.dim_head])
        norm = tf.sqrt(tf.reduce_sum(tf.square(heads), -1, keepdims=True))
        return tf.reshape(heads / tf.maximum(norm, tf.constant(1e-12, x.dtype)), shape)

    def get_config(self) -> dict:
        return {**super().get_config(), "seq_len": self.seq_len, "memory_efficient": self.memory_efficient}
