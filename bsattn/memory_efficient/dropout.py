"""The fused op's dropout decisions in TensorFlow ops, so the chunked engine drops exactly the same entries.

Entry ``(b, h, r, c)`` is kept iff the high 32 bits of ``fmix64(key ^ (counter · G))`` are at least
``floor(rate · 2³²)``, ``counter = ((b·H + h)·Tq + r)·Tk + c``, ``key = fmix64(seed ^ G)``,
``G = 0x9E3779B97F4A7C15`` (ops/cuda/dropout_hash.h; ``bsattn.reference.dropout_keep_mask`` is the NumPy twin).
``Tq, Tk`` are the fused engine's padded lengths, so both engines count the same positions.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

_GOLDEN = 0x9E3779B97F4A7C15


def _u64(value: int) -> tf.Tensor:
    return tf.constant(value, tf.uint64)


def _fmix64(z: tf.Tensor) -> tf.Tensor:
    """murmur3's 64-bit finaliser (uint64 arithmetic wraps, as in C)."""
    shift = _u64(33)
    z = tf.bitwise.bitwise_xor(z, tf.bitwise.right_shift(z, shift))
    z = z * _u64(0xFF51AFD7ED558CCD)
    z = tf.bitwise.bitwise_xor(z, tf.bitwise.right_shift(z, shift))
    z = z * _u64(0xC4CEB9FE1A85EC53)
    return tf.bitwise.bitwise_xor(z, tf.bitwise.right_shift(z, shift))


def dropout_key(seed: tf.Tensor) -> tf.Tensor:
    """The uint64 key of an int64 ``seed`` (scalar)."""
    return _fmix64(tf.bitwise.bitwise_xor(tf.bitcast(tf.cast(seed, tf.int64), tf.uint64), _u64(_GOLDEN)))


def keep_scale(
    key: tf.Tensor,
    rate: float,
    batch: tf.Tensor,
    heads: int,
    rows: tf.Tensor,
    cols: tf.Tensor,
    n_q: int,
    n_k: int,
    dtype: tf.DType = tf.float32,
) -> tf.Tensor:
    """``1/(1-rate)`` where kept, else 0 → ``dtype`` ``[B, H, len(rows), len(cols)]``.

    ``batch``: the batch size (scalar); ``rows``, ``cols``: int32 absolute query / key positions;
    ``n_q, n_k``: the padded lengths the counter uses.
    """
    rate32 = float(np.float32(rate))  # the op takes the rate as a float32 attr
    threshold = int(min(np.floor(rate32 * 2.0**32), 2.0**32 - 1))
    b = tf.cast(tf.range(batch), tf.uint64)[:, None, None, None]
    h = tf.range(heads, dtype=tf.int64)[None, :, None, None]
    bh = b * _u64(heads) + tf.cast(h, tf.uint64)
    r = tf.cast(rows, tf.uint64)[None, None, :, None]
    c = tf.cast(cols, tf.uint64)[None, None, None, :]
    counter = (bh * _u64(n_q) + r) * _u64(n_k) + c
    bits = tf.bitwise.right_shift(_fmix64(tf.bitwise.bitwise_xor(key, counter * _u64(_GOLDEN))), _u64(32))
    kept = bits >= _u64(threshold)
    return tf.where(kept, tf.constant(1.0 / (1.0 - rate32), dtype), tf.zeros([], dtype))
