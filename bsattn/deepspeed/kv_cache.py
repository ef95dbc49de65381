"""The key/value cache of ``SparseMultiHeadAttention`` (keras-hub's ``CachedMultiHeadAttention`` convention).

``cache [B, 2, T_max, N, key_dim]`` holds the projected keys (``[:, 0]``) and values (``[:, 1]``) of every position;
a call with ``cache`` and ``cache_update_index = p`` projects the new ``Tq`` keys/values, writes them at
``[p, p + Tq)`` (``keras.ops.slice_update``: a fixed-shape cache, no retracing when ``p`` is a tensor), and returns
``(output, cache)`` where ``output`` is the attention of the ``Tq`` queries at positions ``[p, p + Tq)`` over the
pattern (``bsattn.decoding.decode_attention``: the fused op's decode mode, or its TF twin under XLA). The cache
rows ``>= p + Tq`` are never read, so a zero-initialised cache (keras-hub's) needs no masking.
"""

from __future__ import annotations

import numbers

import keras
import numpy as np
import tensorflow as tf

from bsattn.decoding import checked_position, decode_attention, decode_tables
from bsattn.patterns import Pattern


def check_cache(cache, num_heads: int, key_dim: int, value_dim: int, block: int, dtype) -> tf.Tensor:
    """``cache`` as a tensor of the layer's compute dtype, or a ValueError naming it."""
    if value_dim != key_dim:
        raise ValueError(f"cache holds keys and values in one tensor: it needs value_dim == key_dim, got "
                         f"value_dim={value_dim}, key_dim={key_dim}")  # fmt: skip
    cache = tf.convert_to_tensor(cache, dtype_hint=dtype)
    shape = cache.shape
    if shape.rank != 5 or shape[1] != 2 or shape[2] is None or shape[3] != num_heads or shape[4] != key_dim:
        raise ValueError(f"cache must have shape [batch, 2, T_max, num_heads={num_heads}, key_dim={key_dim}] "
                         f"(keys and values, static T_max), got {shape}")  # fmt: skip
    if shape[2] % block:
        raise ValueError(f"cache: T_max={shape[2]} must be a multiple of sparsity_config.block={block}")
    return tf.cast(cache, dtype)


def check_index(index, tq: int, t_max: int) -> tf.Tensor | int:
    """``cache_update_index``: an int (range-checked here) or an int scalar tensor (checked by the op)."""
    if index is None:
        raise ValueError("cache_update_index is required with cache: the sparsity pattern needs the absolute "
                         "position of the new queries (keras-hub's cache_update_index=None, attending a frozen "
                         "cache, is not supported)")  # fmt: skip
    if tf.is_tensor(index):
        if not index.dtype.is_integer or index.shape.rank not in (0, None):
            raise TypeError(f"cache_update_index must be an int or an int scalar tensor, got {index.dtype.name} "
                            f"{index.shape}")  # fmt: skip
        return checked_position("cache_update_index", index, tq, t_max)
    if isinstance(index, bool) or not isinstance(index, numbers.Integral):
        raise TypeError(f"cache_update_index must be an int or an int scalar tensor, got {index!r}")
    if not 0 <= index <= t_max - tq:
        raise ValueError(f"cache_update_index={index} is out of range: the {tq} new rows must fit the cache's "
                         f"T_max={t_max} (0 <= cache_update_index <= {t_max - tq})")  # fmt: skip
    return int(index)


def cached_attention(
    layer: keras.layers.MultiHeadAttention,
    pattern: Pattern,
    block: int,
    query: tf.Tensor,
    key: tf.Tensor,
    value: tf.Tensor,
    cache: tf.Tensor,
    index: tf.Tensor | int,
    mask: tf.Tensor | None,
    scale: float,
) -> tuple[tf.Tensor, tf.Tensor]:
    """Projected ``query [B, Tq, N, Dk]``, new ``key``/``value [B, Tq, N, Dk]``, checked ``cache [B, 2, T_max, N,
    Dk]`` and ``index`` → ``(attention [B, Tq, N, Dk], updated cache)``.

    ``mask``: bool ``[B|1, N|1, Tq|1, T_max]`` (True = attend) or None: a key-only mask is the op's key padding
    mask, any other a ``-inf`` bias. A query with no key left gives 0.
    """
    tq, t_max = query.shape[1], cache.shape[2]
    if tq is None or key.shape[1] != tq or value.shape[1] != tq:
        raise ValueError(f"{layer.name}: with a cache, query, key and value must have one static length (the new "
                         f"rows), got {query.shape}, {key.shape}, {value.shape}")  # fmt: skip
    start = [0, index, 0, 0]
    k_cache = keras.ops.slice_update(cache[:, 0], start, tf.cast(key, cache.dtype))
    v_cache = keras.ops.slice_update(cache[:, 1], start, tf.cast(value, cache.dtype))
    cache = tf.stack([k_cache, v_cache], axis=1)
    batch, heads, dk = tf.shape(query)[0], query.shape[2], query.shape[3]
    kp = bias = None
    if mask is not None:
        if mask.shape[-1] not in (None, t_max):
            raise ValueError(f"{layer.name}: attention_mask must cover the cache's T_max={t_max} keys, got {mask.shape}")
        if mask.shape[1] == 1 and mask.shape[2] == 1:
            kp = tf.broadcast_to(mask[:, 0, 0], [batch, t_max])
        else:
            mask = tf.broadcast_to(mask, tf.stack([tf.shape(mask)[0], tf.shape(mask)[1], tq, t_max]))
            bias = tf.where(mask, tf.zeros([], query.dtype), tf.constant(-np.inf, query.dtype))
    flat = [tf.reshape(x, [batch, -1, heads * dk]) for x in (query, k_cache, v_cache)]
    out = decode_attention(*flat, index, decode_tables(pattern, t_max, block), heads, scale=scale,
                           key_padding_mask=kp, bias=bias)  # fmt: skip
    return tf.reshape(out, [batch, tq, heads, dk]), cache
