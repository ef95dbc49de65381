"""The building blocks of the CoLT5 layers (Keras 3): ``RMSNorm``, ``FeedForward``, the light local attention on
bsattn's fused op, the heavy attention with null key/value, and rotary embeddings.

Weights keep the original's names and layouts (Keras kernels are ``[in, out]``, the transpose of torch's):
``RMSNorm.gamma [dim]``; ``FeedForward``: ``norm``, ``proj_in [dim, int(dim·mult)]`` (+bias), GELU (erf),
``proj_out`` (+bias); ``LightAttention``: ``norm``, ``to_qkv [dim, 3·h·d]`` (q, k, v), ``to_out [h·d, dim]``;
``HeavyAttention``: ``norm``, ``null_kv [2, heads, dim_head]``, ``to_q [dim, h·d]``, ``to_kv [dim, 2·h·d]`` with
output channels ordered ``(route, head, k|v, d)`` as the original's ``'(r h d) i'`` view, ``to_out [h·d, dim]``.
"""

from __future__ import annotations

import math

import keras
import numpy as np
import tensorflow as tf

from bsattn import _checks as checks
from bsattn.fused_attention import fused_attention
from bsattn.fused_tables import fused_tables_for_pattern
from bsattn.patterns import Dense, Pattern

_SMALL_BLOCKS = (8, 16, 32)
_BLOCK = 64


def _dense(units: int, name: str, use_bias: bool, policy) -> keras.layers.Dense:
    return keras.layers.Dense(units, use_bias=use_bias, name=name, dtype=policy)


@keras.saving.register_keras_serializable(package="bsattn")
class RMSNorm(keras.layers.Layer):
    """``x / max(||x||, 1e-12) · sqrt(dim) · gamma`` over the last axis, in float32: ``[..., dim]`` → same."""

    def __init__(self, dim: int, **kwargs):
        super().__init__(**kwargs)
        self.dim = checks.positive_int("dim", dim)
        self.gamma = self.add_weight(name="gamma", shape=(self.dim,), initializer="ones")

    def build(self, input_shape=None):
        pass

    def call(self, x):
        x32 = tf.cast(x, tf.float32)
        norm = tf.maximum(tf.norm(x32, axis=-1, keepdims=True), 1e-12)
        y = x32 / norm * (self.dim**0.5) * tf.cast(self.gamma, tf.float32)
        return tf.cast(y, x.dtype)

    def get_config(self) -> dict:
        return {**super().get_config(), "dim": self.dim}


@keras.saving.register_keras_serializable(package="bsattn")
class FeedForward(keras.layers.Layer):
    """RMSNorm → Dense(int(dim·mult)) → GELU → Dense(dim): ``[..., dim]`` → ``[..., dim]``."""

    def __init__(self, dim: int, mult: float = 4, **kwargs):
        super().__init__(**kwargs)
        self.dim, self.mult = checks.positive_int("dim", dim), float(mult)
        hidden = int(self.dim * self.mult)
        if hidden < 1:
            raise ValueError(f"int(dim * mult) must be >= 1, got dim={dim}, mult={mult}")
        self.norm = RMSNorm(self.dim, name="norm", dtype=self.dtype_policy)
        self.proj_in = _dense(hidden, "proj_in", True, self.dtype_policy)
        self.proj_out = _dense(self.dim, "proj_out", True, self.dtype_policy)
        # Built here (the sizes are known): a loaded .keras file finds every weight before the first call.
        self.proj_in.build((None, self.dim))
        self.proj_out.build((None, hidden))

    def build(self, input_shape=None):
        pass

    def call(self, x):
        return self.proj_out(keras.activations.gelu(self.proj_in(self.norm(x)), approximate=False))

    def get_config(self) -> dict:
        return {**super().get_config(), "dim": self.dim, "mult": self.mult}


def fused_block_size(n: int) -> int:
    """The fused op's block size for ``n`` tokens: the smallest of 8/16/32 that holds them, else 64."""
    return next((b for b in _SMALL_BLOCKS if b >= n), _BLOCK)


def pattern_attention(q, k, v, heads: int, pattern: Pattern, key_mask=None) -> tf.Tensor:
    """``q, k, v [B, n, H*D]`` → ``[B, n, H*D]``: attention restricted to ``pattern`` on the fused op (padded at the
    end to its block size; padded keys are never attended, padded queries are dropped). ``key_mask`` bool
    ``[B, n]`` (True = attend); a query with no kept key gets 0."""
    n = q.shape[1]
    bs = fused_block_size(n)
    t = -(-n // bs) * bs
    tables = fused_tables_for_pattern(pattern, t, t, bs)
    if key_mask is None and t != n:
        key_mask = tf.ones(tf.shape(q)[:2], tf.bool)
    if key_mask is not None:
        # A masked key's k and v never matter; zeroed, a NaN there cannot leak through 0·NaN.
        k, v = (tf.where(key_mask[..., None], x, tf.zeros([], x.dtype)) for x in (k, v))
        key_mask = tf.pad(key_mask, [[0, 0], [0, t - n]], constant_values=False)
    q, k, v = (tf.pad(x, [[0, 0], [0, t - n], [0, 0]]) for x in (q, k, v))
    out = fused_attention(q, k, v, tables, heads, key_padding_mask=key_mask)
    return out[:, :n]


@keras.saving.register_keras_serializable(package="bsattn")
class _MaskArg(keras.layers.Layer):
    """A layer whose ``call`` takes a ``mask`` argument and returns no Keras mask."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.supports_masking = True

    def compute_mask(self, inputs, mask=None):
        return None


class LightAttention(_MaskArg):
    """The light branch: pre-norm multi-head attention within ``pattern`` on the fused op, ``[b, n, dim]`` → same.

    ``norm``: ``"layer"`` (local-attention's ``LocalMHA``, LayerNorm eps 1e-5) or ``"rms"`` (the image branch's
    ``SelfAttention``). Scale ``dim_head**-0.5``; ``mask [b, n]`` is a key padding mask.
    """

    def __init__(self, dim: int, dim_head: int, heads: int, pattern: Pattern, norm: str = "layer", **kwargs):
        super().__init__(**kwargs)
        self.dim = checks.positive_int("dim", dim)
        self.dim_head = checks.positive_int("dim_head", dim_head)
        self.heads = checks.positive_int("heads", heads)
        self.pattern = pattern if pattern is not None else Dense()
        self.norm_kind = checks.choice("norm", norm, ("layer", "rms"))
        inner = self.heads * self.dim_head
        if norm == "layer":
            self.norm = keras.layers.LayerNormalization(epsilon=1e-5, name="norm", dtype=self.dtype_policy)
        else:
            self.norm = RMSNorm(self.dim, name="norm", dtype=self.dtype_policy)
        self.to_qkv = _dense(3 * inner, "to_qkv", False, self.dtype_policy)
        self.to_out = _dense(self.dim, "to_out", False, self.dtype_policy)
        self.norm.build((None, self.dim))
        self.to_qkv.build((None, self.dim))
        self.to_out.build((None, inner))

    def build(self, input_shape=None):
        pass

    def call(self, x, mask=None):
        q, k, v = tf.split(self.to_qkv(self.norm(x)), 3, axis=-1)
        return self.to_out(pattern_attention(q, k, v, self.heads, self.pattern, mask))


def rotary_freqs(positions: tf.Tensor, dim: int) -> tf.Tensor:
    """RoPE angles (θ = 10000, ``cat(f, f)``): int ``positions [...]`` → float32 ``[..., dim]``."""
    inv_freq = 1.0 / (10000.0 ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    freqs = tf.cast(positions, tf.float32)[..., None] * tf.constant(inv_freq, tf.float32)
    return tf.concat([freqs, freqs], axis=-1)


def apply_rotary(freqs: tf.Tensor, t: tf.Tensor) -> tf.Tensor:
    """``t·cos + rotate_half(t)·sin`` (``rotate_half(x1, x2) = (-x2, x1)``), in the dtype of ``t``."""
    x1, x2 = tf.split(t, 2, axis=-1)
    rotated = tf.concat([-x2, x1], axis=-1)
    cos, sin = (tf.cast(f(freqs), t.dtype) for f in (tf.cos, tf.sin))
    return t * cos + rotated * sin


@keras.saving.register_keras_serializable(package="bsattn")
class HeavyAttention(_MaskArg):
    """The heavy branch (the original's internal ``Attention``): ``x [b, i, dim]``, ``context [b, (r,) j, dim]``
    (default: x) → ``[b, i, dim]``.

    The ``heads`` are split evenly across the ``r`` routes of the context (route ``g`` is projected by heads
    ``g·h/r .. (g+1)·h/r - 1`` only); a learned null key/value is prepended to every head, so no query is ever
    without a key. ``mask [b, (r,) j]`` (True = attend); ``scores_kv [b, (r,) j]`` multiplies the values (and the
    keys with ``multiply_keys_by_score``); ``scores_q [b, i]`` the queries; ``positions = (q_pos [b, i],
    k_pos [b, (r,) j])`` applies rotary embeddings at those positions. Dense attention in TensorFlow (the heavy
    branch sees only routed tokens), softmax in float32.
    """

    def __init__(self, dim: int, dim_head: int = 64, heads: int = 8, multiply_keys_by_score: bool = False,
                 use_flash: bool = False, **kwargs):  # fmt: skip
        super().__init__(**kwargs)
        self.dim = checks.positive_int("dim", dim)
        self.dim_head = checks.positive_int("dim_head", dim_head)
        self.heads = checks.positive_int("heads", heads)
        self.multiply_keys_by_score = bool(multiply_keys_by_score)
        self.use_flash = bool(use_flash)
        inner = self.heads * self.dim_head
        self.norm = RMSNorm(self.dim, name="norm", dtype=self.dtype_policy)
        self.null_kv = self.add_weight(name="null_kv", shape=(2, self.heads, self.dim_head),
                                       initializer=keras.initializers.RandomNormal(stddev=1.0))  # fmt: skip
        self.to_q = _dense(inner, "to_q", False, self.dtype_policy)
        self.to_kv = _dense(2 * inner, "to_kv", False, self.dtype_policy)
        self.to_out = _dense(self.dim, "to_out", False, self.dtype_policy)
        for layer in (self.to_q, self.to_kv):
            layer.build((None, self.dim))
        self.to_out.build((None, inner))

    def build(self, input_shape=None):
        pass

    def call(self, x, context=None, mask=None, scores_kv=None, scores_q=None, positions=None):
        h, dh = self.heads, self.dim_head
        x = self.norm(x)
        context = x if context is None else self.norm(tf.cast(context, x.dtype))
        context = context[:, None] if context.shape.rank == 3 else context
        mask = mask[:, None] if mask is not None and mask.shape.rank == 2 else mask
        scores_kv = scores_kv[:, None] if scores_kv is not None and scores_kv.shape.rank == 2 else scores_kv
        r, j = context.shape[1], context.shape[2]
        if h % r:
            raise ValueError(f"heads={h} must be divisible by the number of key/value routes ({r})")
        hr = h // r
        n_q = x.shape[1]
        q = tf.transpose(tf.reshape(self.to_q(x), [-1, n_q, h, dh]), [0, 2, 1, 3])  # [b, h, i, d]
        if scores_q is not None:
            q = q * tf.cast(scores_q, q.dtype)[:, None, :, None]
        kernel = tf.reshape(tf.cast(self.to_kv.kernel, context.dtype), [self.dim, r, hr, 2 * dh])
        kv = tf.einsum("brni,irhd->brhnd", context, kernel)
        k, v = kv[..., :dh], kv[..., dh:]  # [b, r, h/r, j, d]
        if scores_kv is not None:
            s = tf.cast(scores_kv, v.dtype)[:, :, None, :, None]
            v = v * s
            if self.multiply_keys_by_score:
                k = k * s
        if positions is not None:
            q_pos, k_pos = positions
            q = apply_rotary(rotary_freqs(q_pos, dh)[:, None], q)
            k_pos = k_pos[:, None] if k_pos.shape.rank == 2 else k_pos
            k = apply_rotary(rotary_freqs(k_pos, dh)[:, :, None], k)
        k, v = (tf.reshape(t, [-1, h, j, dh]) for t in (k, v))
        batch = tf.shape(x)[0]
        null_k, null_v = (tf.broadcast_to(tf.cast(t, k.dtype)[None, :, None], [batch, h, 1, dh])
                          for t in tf.unstack(self.null_kv))  # fmt: skip
        k, v = tf.concat([null_k, k], axis=2), tf.concat([null_v, v], axis=2)
        sim = tf.einsum("bhid,bhjd->bhij", tf.cast(q, tf.float32), tf.cast(k, tf.float32)) * dh**-0.5
        if mask is not None:
            keep = tf.repeat(tf.cast(mask, tf.bool), hr, axis=1)[:, :, None, :]  # [b, h, 1, j]
            keep = tf.pad(keep, [[0, 0], [0, 0], [0, 0], [1, 0]], constant_values=True)
            sim = tf.where(keep, sim, tf.constant(-math.inf, tf.float32))
        attn = tf.nn.softmax(sim, axis=-1)
        out = tf.einsum("bhij,bhjd->bhid", tf.cast(attn, v.dtype), v)
        out = tf.reshape(tf.transpose(out, [0, 2, 1, 3]), [-1, n_q, h * dh])
        return self.to_out(out)

    def get_config(self) -> dict:
        return {**super().get_config(), "dim": self.dim, "dim_head": self.dim_head, "heads": self.heads,
                "multiply_keys_by_score": self.multiply_keys_by_score, "use_flash": self.use_flash}  # fmt: skip
