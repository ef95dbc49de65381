"""Keras layers of DeepSpeed's sparse self-attention, on the fused block-sparse op.

- ``deepspeed_sparse_attention``: the function behind them: ``q, k, v [B, H, T, D]`` → ``[B, H, T, D]``, with
  DeepSpeed's ``rpe``, ``key_padding_mask`` and ``attn_mask`` (``'add'``/``'mul'`` modes).
- ``SparseSelfAttention``: DeepSpeed's module as a Keras layer (no weights).
- ``BertSparseSelfAttention``: query/key/value projections + sparse attention over ``[B, T, C]``.
- ``SparseMultiHeadAttention``: a ``keras.layers.MultiHeadAttention`` whose attention is sparse (same weights,
  same call), what ``bert_utils.replace_model_self_attention_with_sparse_self_attention`` swaps in.

How the masks reach the fused op (exact, O(T·D) memory unless a dense ``[T, T]`` input is given):

- ``key_padding_mask`` ``[B, T]`` (any shape that squeezes to it, e.g. BERT's ``[B, 1, 1, T]``):
  ``'mul'``: key ``j`` of batch ``b`` is dropped where the mask is 0 (the op's boolean key mask);
  ``'add'``: the value is added to every score of key ``j``. Entries equal to ``-inf`` become the op's boolean key
  mask; the finite values are a rank-one term ``1 · kp[b, j]`` of the scores, so they travel as one extra
  channel of ``q`` (constant ``1/scale``) and ``k`` (``kp``) with a zero channel in ``v``: no ``[T, T]`` tensor.
  The score is then accumulated with that term, so its absolute error is about ``|kp| / scale`` ulps of the
  compute precision: irrelevant where ``kp`` is 0 or drops the key (BERT's -10000 next to a kept 0), but a row
  whose every kept key carries -10000 gets the precision of ``-10000 + s`` (DeepSpeed's fp16 was coarser still).
- ``attn_mask`` ``[T, T]`` (squeezed; shared by the batch and the heads): ``'add'``: added to the scores (the
  op's ``bias``); ``'mul'``: entries equal to 0 are dropped: a ``-inf`` bias where the mask is 0, else 0.
- ``rpe``: ``[H|1, T, T]`` or ``[B|1, H|1, T, T]`` added to the scores (the op's ``bias``), with a gradient
  (DeepSpeed has none); one op call for any batch dimension (the op's bias broadcasts over ``[B|1, H|1]``).
- ``key`` and ``value`` may have fewer heads than ``query``, dividing them (grouped-query attention, not in
  DeepSpeed): the op's ``kv_heads``, no copy of K/V.
- ``segment_ids`` (not in DeepSpeed): packed sequences, int ``[B, T]``: query ``i`` attends key ``j`` only if their
  ids are equal (the op's segment ids: blocks whose segments cannot meet are skipped per batch entry).
- A query row whose every key is dropped gives 0 (DeepSpeed: NaN). Masks get no gradient (DeepSpeed: neither).
"""

from __future__ import annotations

import dataclasses

import keras
import numpy as np
import tensorflow as tf
from keras.src.backend import get_keras_mask, set_keras_mask

from bsattn.fused_attention import fused_attention, fused_scale
from bsattn.fused_tables import fused_tables_for_pattern
from bsattn.deepspeed import kv_cache
from bsattn.deepspeed.sparsity_config import (
    DenseSparsityConfig,
    FixedSparsityConfig,
    SparsityConfig,
    deserialize_sparsity_config,
    serialize_sparsity_config,
)
from bsattn.patterns import Causal, Pattern
from bsattn.tables import BLOCK_SIZES

MASK_MODES = ("add", "mul")


def _check_mode(name: str, mode: str) -> str:
    if mode not in MASK_MODES:
        raise ValueError(f"{name} must be 'add' or 'mul', got {mode!r}")
    return mode


def _check_config(sparsity_config) -> SparsityConfig:
    if not isinstance(sparsity_config, SparsityConfig):
        raise TypeError(
            f"sparsity_config must be a SparsityConfig (e.g. FixedSparsityConfig(num_heads=...)), "
            f"got {type(sparsity_config).__name__}"
        )
    if sparsity_config.block not in BLOCK_SIZES:
        raise ValueError(f"sparsity_config.block must be one of {BLOCK_SIZES} for the ops, got {sparsity_config.block}")
    return sparsity_config


def _set_sparse_settings(layer, sparsity_config, max_seq_length, heads: int, heads_name: str) -> None:
    """Validate and set ``max_seq_length``, ``sparsity_config`` (default: dense over ``heads``) on a Keras drop-in."""
    if max_seq_length is not None and (isinstance(max_seq_length, bool) or not isinstance(max_seq_length, int)
                                       or max_seq_length < 1):  # fmt: skip
        raise ValueError(f"max_seq_length must be a positive integer or None, got {max_seq_length!r}")
    layer.max_seq_length = max_seq_length
    layer._default_config = sparsity_config is None
    if sparsity_config is None:
        sparsity_config = DenseSparsityConfig(num_heads=heads)
    layer.sparsity_config = _check_config(deserialize_sparsity_config(sparsity_config))
    if layer.sparsity_config.num_heads != heads:
        raise ValueError(f"sparsity_config.num_heads={layer.sparsity_config.num_heads} must equal {heads_name}={heads}")


def _squeeze_mask(x: tf.Tensor, name: str, keep_batch: bool, t: int) -> tf.Tensor:
    """``x`` without its size-1 dimensions (the first is kept if ``keep_batch``) → ``[B, T]`` or ``[T, T]``."""
    if x.shape.rank is None:
        raise ValueError(f"{name} must have a known rank")
    dims = x.shape.as_list()
    start = 1 if keep_batch else 0
    rest = [d for d in dims[start:] if d != 1]
    if len(dims) < start or len(rest) != 2 - start or any(d not in (None, t) for d in rest):
        expected = "[batch, T]" if keep_batch else "[T, T]"
        raise ValueError(f"{name} must squeeze to {expected} with T={t}, got shape {x.shape}")
    return tf.reshape(x, ([tf.shape(x)[0]] if keep_batch else []) + [t] * (2 - start))


def deepspeed_sparse_attention(
    query: tf.Tensor,
    key: tf.Tensor,
    value: tf.Tensor,
    sparsity_config: SparsityConfig,
    rpe: tf.Tensor | None = None,
    key_padding_mask: tf.Tensor | None = None,
    attn_mask: tf.Tensor | None = None,
    key_padding_mask_mode: str = "add",
    attn_mask_mode: str = "mul",
    scale: float | None = None,
    dropout_rate: float = 0.0,
    seed: int | tf.Tensor | None = None,
    segment_ids: tf.Tensor | None = None,
    context_parallel: tf.distribute.Strategy | None = None,
) -> tf.Tensor:
    """DeepSpeed's ``SparseSelfAttention.forward`` on the fused op: ``[B, H, T, D] x3 → [B, H, T, D]``.

    Args:
      query: ``[B, H, T, D]``, float32, float16, bfloat16 or float64 (one dtype).
      key, value: ``[B, KVH, T, D]`` with ``KVH = H`` (DeepSpeed) or dividing ``H`` (grouped-query attention, not in
        DeepSpeed: query head ``h`` reads K/V head ``h // (H // KVH)``, no copy); key may also be ``[B, KVH, D, T]``
        (already transposed; recognised when its third dimension is not ``T``, as in DeepSpeed).
      sparsity_config: the pattern; ``H`` must be its ``num_heads``; ``T`` a multiple of its ``block``.
      rpe, key_padding_mask, attn_mask, the modes: see the module docstring.
      scale: default ``1/sqrt(D)``.
      dropout_rate, seed: attention dropout of the fused op (DeepSpeed has none).
      segment_ids: int ``[B, T]``: packed sequences (module docstring).
      context_parallel: a ``tf.distribute.Strategy``: the sequence is split over its ``N`` replicas (call inside
        ``strategy.run``; ``T`` above is this replica's shard, the layout is the one of ``N * T`` tokens;
        ``bsattn.context_parallel``); not with rpe, masks, segment ids or dropout.
    """
    config = _check_config(sparsity_config)
    _check_mode("key_padding_mask_mode", key_padding_mask_mode)
    _check_mode("attn_mask_mode", attn_mask_mode)
    query = tf.convert_to_tensor(query)
    key = tf.convert_to_tensor(key, dtype_hint=query.dtype)
    value = tf.convert_to_tensor(value, dtype_hint=query.dtype)
    for name, x in (("query", query), ("key", key), ("value", value)):
        if x.shape.rank != 4:
            raise ValueError(f"{name} must be [batch, heads, T, head_dim], got shape {x.shape}")
    _, heads, t, d = query.shape.as_list()
    if heads is None or t is None or d is None:
        raise ValueError(f"query needs static heads, T and head_dim, got shape {query.shape}")
    if key.shape[2] != t and key.shape[3] == t:  # DeepSpeed accepts an already transposed key
        key = tf.transpose(key, [0, 1, 3, 2])
    kv_heads = key.shape[1]
    grouped = kv_heads is not None and kv_heads > 0 and heads % kv_heads == 0  # GQA / MQA: fewer K/V heads
    if not (key.shape.is_compatible_with(value.shape) and grouped
            and query.shape[::2].is_compatible_with(key.shape[::2]) and key.shape[3] == d):  # fmt: skip
        raise NotImplementedError(
            f"only self-attention is supported for now: query, key and value must have one shape (key and value "
            f"may have fewer heads, dividing the query's: grouped-query attention), got {query.shape}, "
            f"{key.shape}, {value.shape}"
        )
    if heads != config.num_heads:
        raise ValueError(f"query has {heads} heads but sparsity_config.num_heads is {config.num_heads}")
    if t % config.block:
        raise ValueError(f"Sequence Length, {t}, needs to be dividable by Block size {config.block}!")
    if context_parallel is not None:
        return _context_parallel(query, key, value, config, scale, context_parallel,
                                 rpe=rpe, key_padding_mask=key_padding_mask, attn_mask=attn_mask,
                                 segment_ids=segment_ids, dropout_rate=dropout_rate)  # fmt: skip
    tables = fused_tables_for_pattern(config, t, t, config.block)
    scale = fused_scale(d, scale)
    dtype = query.dtype

    bias = None
    if attn_mask is not None:
        am = _squeeze_mask(tf.convert_to_tensor(attn_mask), "attn_mask", False, t)
        if attn_mask_mode == "mul":
            kept = am if am.dtype == tf.bool else tf.not_equal(am, tf.zeros([], am.dtype))
            am = tf.where(kept, tf.zeros([], dtype), tf.constant(-np.inf, dtype))
        bias = tf.cast(am, dtype)[None]
    keep, key_bias = None, None
    if key_padding_mask is not None:
        kp = _squeeze_mask(tf.convert_to_tensor(key_padding_mask), "key_padding_mask", True, t)
        if key_padding_mask_mode == "mul":
            keep = kp if kp.dtype == tf.bool else tf.not_equal(kp, tf.zeros([], kp.dtype))
        else:
            kp = tf.cast(kp, dtype)
            keep = tf.not_equal(kp, -np.inf)
            key_bias = tf.stop_gradient(tf.where(keep, kp, tf.zeros_like(kp)))

    ids = None
    if segment_ids is not None:
        ids = tf.convert_to_tensor(segment_ids)
        if not ids.dtype.is_integer or not ids.shape.is_compatible_with([None, t]):
            raise ValueError(f"segment_ids must be an integer [batch, {t}] tensor, got {ids.dtype.name} {ids.shape}")
        ids = tf.cast(ids, tf.int32)

    def attend(q, k, v, keep, key_bias, bias, ids=ids):
        """One fused call: ``q [b, H, T, D]``, ``k, v [b, KVH, T, D]``, ``keep, key_bias, ids [b, T]``, ``bias``
        ``[H|1, T, T]`` or ``[B|1, H|1, T, T]``."""
        width = d
        if key_bias is not None:  # the rank-one key term rides as one more channel (module docstring)
            q = tf.concat([q, tf.ones_like(q[..., :1]) * tf.constant(1.0 / scale, dtype)], -1)
            k = tf.concat([k, tf.broadcast_to(key_bias[:, None, :, None], tf.shape(k[..., :1]))], -1)
            v = tf.concat([v, tf.zeros_like(v[..., :1])], -1)
            width = d + 1
        flat = [tf.reshape(tf.transpose(x, [0, 2, 1, 3]), [-1, t, x.shape[1] * width]) for x in (q, k, v)]
        out = fused_attention(
            *flat, tables, heads, scale=scale, key_padding_mask=keep, bias=bias,
            dropout_rate=dropout_rate, seed=seed, q_segment_ids=ids, k_segment_ids=ids, kv_heads=kv_heads,
        )  # fmt: skip
        out = tf.transpose(tf.reshape(out, [-1, t, heads, width]), [0, 2, 1, 3])
        return out[..., :d] if width != d else out

    if rpe is not None:  # the op's bias broadcasts over [B|1, H|1, T, T]: a per-batch rpe needs no loop
        rpe = tf.cast(rpe, dtype)
        if rpe.shape.rank == 3:
            rpe = rpe[None]
        if rpe.shape.rank != 4 or not rpe.shape[2:].is_compatible_with([t, t]) or rpe.shape[1] not in (1, heads):
            raise ValueError(
                f"rpe must be [1 or {heads}, {t}, {t}] or [batch or 1, 1 or {heads}, {t}, {t}], got {rpe.shape}"
            )
        bias = rpe if bias is None else rpe + bias[None]
    return attend(query, key, value, keep, key_bias, bias)


def _context_parallel(query, key, value, config, scale, strategy, dropout_rate, **unsupported) -> tf.Tensor:
    """``deepspeed_sparse_attention(..., context_parallel=strategy)``: ``[B, H, T/N, D]`` shards →
    ``[B, H, T/N, D]``."""
    from bsattn.context_parallel import context_parallel_attention, replica_shard

    if not isinstance(strategy, tf.distribute.Strategy):
        raise TypeError(f"context_parallel must be a tf.distribute.Strategy or None, got {type(strategy).__name__}")
    given = [name for name, x in unsupported.items() if x is not None] + (["dropout_rate"] if dropout_rate else [])
    if given:
        raise ValueError(f"context_parallel does not support {', '.join(given)}")
    _, heads, t, d = query.shape.as_list()
    n_ctx = t * replica_shard(strategy)[1]
    tables = fused_tables_for_pattern(config, n_ctx, n_ctx, config.block)
    flat = [tf.reshape(tf.transpose(x, [0, 2, 1, 3]), [-1, t, x.shape[1] * d]) for x in (query, key, value)]
    out = context_parallel_attention(*flat, tables, heads, strategy, scale=fused_scale(d, scale),
                                     kv_heads=key.shape[1])  # fmt: skip
    return tf.transpose(tf.reshape(out, [-1, t, heads, d]), [0, 2, 1, 3])


# ---- layers ------------------------------------------------------------------------------------------------


@keras.saving.register_keras_serializable(package="bsattn")
class SparseSelfAttention(keras.layers.Layer):
    """DeepSpeed's ``SparseSelfAttention``: ``call(query, key, value, rpe=None, key_padding_mask=None,
    attn_mask=None, segment_ids=None)`` with ``[B, H, T, D]`` inputs → ``[B, H, T, D]``; no weights.
    ``segment_ids`` (not in DeepSpeed): int ``[B, T]``, packed sequences (a query attends its own segment only).

    The layout is built for the actual ``T`` (DeepSpeed sliced the ``max_seq_length`` layout); ``T`` above
    ``max_seq_length`` is an error (DeepSpeed failed later, on shapes). Any float dtype; under a mixed
    precision policy the inputs arrive in the compute dtype.

    ``context_parallel=strategy``: the sequence is split over the strategy's replicas (``deepspeed_sparse_attention``;
    ``T`` is then each replica's shard, ``max_seq_length`` bounds the whole sequence). A strategy is not
    serialisable: ``get_config`` leaves it out (pass it again when loading).
    """

    def __init__(
        self,
        sparsity_config: SparsityConfig | dict | None = None,
        key_padding_mask_mode: str = "add",
        attn_mask_mode: str = "mul",
        max_seq_length: int = 2048,
        context_parallel: tf.distribute.Strategy | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.context_parallel = context_parallel
        if sparsity_config is None:
            raise ValueError(
                "sparsity_config is required (DeepSpeed's default, the abstract SparsityConfig(num_heads=4), has no "
                "layout): pass e.g. FixedSparsityConfig(num_heads=...)"
            )
        self.sparsity_config = _check_config(deserialize_sparsity_config(sparsity_config))
        self.key_padding_mask_mode = _check_mode("key_padding_mask_mode", key_padding_mask_mode)
        self.attn_mask_mode = _check_mode("attn_mask_mode", attn_mask_mode)
        if isinstance(max_seq_length, bool) or not isinstance(max_seq_length, int) or max_seq_length < 1:
            raise ValueError(f"max_seq_length must be a positive integer, got {max_seq_length!r}")
        self.max_seq_length = max_seq_length
        self.sparsity_config.layout(max_seq_length)  # as DeepSpeed: fails now if the config cannot make it

    def get_layout(self, seq_len: int) -> np.ndarray:
        """The int64 block layout ``[num_heads, nb, nb]`` used for ``seq_len`` tokens."""
        if seq_len % self.sparsity_config.block:
            raise ValueError(
                f"Sequence Length, {seq_len}, needs to be dividable by Block size {self.sparsity_config.block}!"
            )
        return self.sparsity_config.layout(seq_len).astype(np.int64)

    def call(self, query, key, value, rpe=None, key_padding_mask=None, attn_mask=None, segment_ids=None):
        t = query.shape[2]
        if t is not None and self.context_parallel is not None:
            from bsattn.context_parallel import replica_shard

            t *= replica_shard(self.context_parallel)[1]
        if t is not None and t > self.max_seq_length:
            raise ValueError(f"query has T={t} tokens, more than max_seq_length={self.max_seq_length}")
        return deepspeed_sparse_attention(
            query, key, value, self.sparsity_config, rpe=rpe, key_padding_mask=key_padding_mask,
            attn_mask=attn_mask, key_padding_mask_mode=self.key_padding_mask_mode,
            attn_mask_mode=self.attn_mask_mode, segment_ids=segment_ids, context_parallel=self.context_parallel,
        )  # fmt: skip

    def compute_output_shape(self, query_shape, *args, **kwargs):
        return query_shape

    def get_config(self) -> dict:
        return {
            **super().get_config(),
            "sparsity_config": serialize_sparsity_config(self.sparsity_config),
            "key_padding_mask_mode": self.key_padding_mask_mode,
            "attn_mask_mode": self.attn_mask_mode,
            "max_seq_length": self.max_seq_length,
        }


def _bert_sizes(config) -> tuple[int, int]:
    get = config.get if isinstance(config, dict) else lambda name: getattr(config, name, None)
    hidden, heads = get("hidden_size"), get("num_attention_heads")
    if not all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in (hidden, heads)):
        raise ValueError(
            f"config must give positive integers hidden_size and num_attention_heads, got {hidden!r}, {heads!r}"
        )
    if hidden % heads != 0:
        raise ValueError(
            f"The hidden size ({hidden}) is not a multiple of the number of attention heads ({heads})"
        )
    return hidden, heads


@keras.saving.register_keras_serializable(package="bsattn")
class BertSparseSelfAttention(keras.layers.Layer):
    """DeepSpeed's ``BertSparseSelfAttention``: ``call(hidden_states [B, T, C], attention_mask=None) → [B, T, C]``.

    ``config``: anything with ``hidden_size`` and ``num_attention_heads`` (an object or a dict); the query, key
    and value projections are ``Dense(hidden_size)`` layers named ``query``, ``key``, ``value``. ``attention_mask``
    is the key padding mask (BERT's additive ``[B, 1, 1, T]`` in ``'add'`` mode, DeepSpeed's default; a 0/1 mask
    in ``'mul'`` mode). The default sparsity config is ``FixedSparsityConfig(num_heads=num_attention_heads)``
    (DeepSpeed's default, 4 heads, only fit models with 4 heads).
    """

    def __init__(
        self,
        config,
        sparsity_config: SparsityConfig | dict | None = None,
        key_padding_mask_mode: str = "add",
        attn_mask_mode: str = "mul",
        max_seq_length: int = 2048,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.hidden_size, self.num_attention_heads = _bert_sizes(config)
        if sparsity_config is None:
            sparsity_config = FixedSparsityConfig(num_heads=self.num_attention_heads)
        sparsity_config = deserialize_sparsity_config(sparsity_config)
        if sparsity_config.num_heads != self.num_attention_heads:
            raise ValueError(
                f"sparsity_config.num_heads={sparsity_config.num_heads} must equal config.num_attention_heads="
                f"{self.num_attention_heads}"
            )
        self.query = keras.layers.Dense(self.hidden_size, name="query", dtype=self.dtype_policy)
        self.key = keras.layers.Dense(self.hidden_size, name="key", dtype=self.dtype_policy)
        self.value = keras.layers.Dense(self.hidden_size, name="value", dtype=self.dtype_policy)
        self.sparse_self_attention = SparseSelfAttention(
            sparsity_config, key_padding_mask_mode, attn_mask_mode, max_seq_length, dtype=self.dtype_policy
        )

    def build(self, input_shape):
        for layer in (self.query, self.key, self.value):
            layer.build(input_shape)

    def _heads(self, x):
        d = self.hidden_size // self.num_attention_heads
        return tf.transpose(tf.reshape(x, [tf.shape(x)[0], -1, self.num_attention_heads, d]), [0, 2, 1, 3])

    def call(self, hidden_states, attention_mask=None):
        if hidden_states.shape.rank != 3 or hidden_states.shape[-1] != self.hidden_size:
            raise ValueError(f"hidden_states must be [batch, T, {self.hidden_size}], got shape {hidden_states.shape}")
        t = hidden_states.shape[1]
        q, k, v = (self._heads(layer(hidden_states)) for layer in (self.query, self.key, self.value))
        q, k, v = (tf.ensure_shape(x, [None, self.num_attention_heads, t, None]) for x in (q, k, v))
        out = self.sparse_self_attention(q, k, v, key_padding_mask=attention_mask)
        return tf.reshape(tf.transpose(out, [0, 2, 1, 3]), [tf.shape(out)[0], -1, self.hidden_size])

    def compute_output_shape(self, input_shape, *args, **kwargs):
        return input_shape

    def get_config(self) -> dict:
        sparse = self.sparse_self_attention
        return {
            **super().get_config(),
            "config": {"hidden_size": self.hidden_size, "num_attention_heads": self.num_attention_heads},
            "sparsity_config": serialize_sparsity_config(sparse.sparsity_config),
            "key_padding_mask_mode": sparse.key_padding_mask_mode,
            "attn_mask_mode": sparse.attn_mask_mode,
            "max_seq_length": sparse.max_seq_length,
        }


@dataclasses.dataclass(frozen=True)
class SlidingWindow(Pattern):
    """Keras's ``sliding_window``: query ``i`` attends key ``j`` iff ``|i - j| < window`` (both directions)."""

    window: int

    def allowed(self, head, q, k, n_q, n_k):
        return np.abs(q - k) < self.window

    def _block_classes(self, head, qb, kb, block_size, n_q, n_k):
        i0, i1 = qb * block_size, qb * block_size + block_size - 1
        j0, j1 = kb * block_size, kb * block_size + block_size - 1
        d_min, d_max = i0 - j1, i1 - j0  # i - j takes every value in [d_min, d_max] inside the block
        w = self.window
        return (d_max > -w) & (d_min < w), (d_min > -w) & (d_max < w)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _pad_axis(x: tf.Tensor, axis: int, size, value=0) -> tf.Tensor:
    """``x`` padded with ``value`` at the end of ``axis`` to ``size`` (static or a scalar tensor)."""
    pad = size - tf.shape(x)[axis]
    paddings = [[0, 0]] * axis + [[0, pad]] + [[0, 0]] * (x.shape.rank - axis - 1)
    return tf.pad(x, paddings, constant_values=value)


def _rank4_mask(mask, name: str) -> tf.Tensor:
    """A Keras attention mask (``[T, S]``, ``[B|1, T|1, S]`` or ``[B|1, N|1, T|1, S]``, any dtype; nonzero = attend)
    → bool ``[b, h, t, S]``."""
    mask = tf.convert_to_tensor(mask)
    if mask.dtype != tf.bool:
        mask = tf.not_equal(mask, tf.zeros([], mask.dtype))
    rank = mask.shape.rank
    if rank not in (2, 3, 4):
        raise ValueError(f"{name} must be [T, S], [B, T, S] or [B, num_heads, T, S], got shape {mask.shape}")
    for _ in range(4 - rank):
        mask = mask[None] if mask.shape.rank == 2 else mask[:, None]
    return mask


def _segment_pair(segment_ids, name: str = "segment_ids") -> tuple[tf.Tensor, tf.Tensor] | None:
    """A layer's ``segment_ids`` argument → ``(query ids [B, T], key ids [B, S])`` int32, or None: one ``[B, T]``
    tensor serves queries and keys (self-attention), a pair gives them separately."""
    if segment_ids is None:
        return None
    pair = tuple(segment_ids) if isinstance(segment_ids, (tuple, list)) else (segment_ids, segment_ids)
    if len(pair) != 2:
        raise ValueError(f"{name} must be one [batch, T] tensor or a pair (query_segment_ids [batch, T], "
                         f"key_segment_ids [batch, S]), got {len(pair)} items")  # fmt: skip
    out = []
    for ids in pair:
        ids = tf.convert_to_tensor(ids)
        if not ids.dtype.is_integer or ids.shape.rank != 2:
            raise ValueError(f"{name} must be integer [batch, length] tensors, got {ids.dtype.name} {ids.shape}")
        out.append(tf.cast(ids, tf.int32))
    return out[0], out[1]


def _segment_mask(pair: tuple[tf.Tensor, tf.Tensor]) -> tf.Tensor:
    """bool ``[B, 1, T, S]``: query and key share a segment (the dense paths' form of the segment ids)."""
    return tf.equal(pair[0][:, None, :, None], pair[1][:, None, None, :])


def _block_sparse_attention(
    layer: keras.layers.Layer,
    pattern: Pattern,
    bs: int,
    query: tf.Tensor,
    key: tf.Tensor,
    value: tf.Tensor,
    mask: tf.Tensor | None,
    query_mask: tf.Tensor | None,
    dropout: float,
    training,
    dropout_layer: keras.layers.Dropout,
    scale: float,
    segment_ids: tuple[tf.Tensor, tf.Tensor] | None = None,
) -> tf.Tensor:
    """The fused op behind the Keras layers: projected ``query [B, T, N, Dk]``, ``key [B, S, G, Dk]``, ``value
    [B, S, G, Dv]`` → ``[B, T, N, Dv]`` over ``pattern`` with blocks of ``bs`` (lengths padded to them). ``G``
    divides ``N``: grouped-query attention when ``G < N`` (query head ``h`` reads K/V head ``h // (N // G)`` inside
    the op: no copy of K/V).

    ``mask``: bool ``[B|1, N|1, T|1, S]`` (``_rank4_mask``; True = attend); ``query_mask``: bool ``[B, 1, T, 1]``;
    ``dropout`` under ``training``, seeded from ``dropout_layer``'s seed generator; ``layer`` gives the name
    and ``max_seq_length`` for errors and dynamic lengths; ``segment_ids``: int ``([B, T], [B, S])`` (packed
    sequences: a query attends the keys of its own segment only). Rows with no key: see SparseMultiHeadAttention
    (with segment ids, a query with no key of its segment gives 0).
    """
    t, s = query.shape[1], key.shape[1]
    if t is not None and s is not None:
        tp, sp = _round_up(t, bs), _round_up(s, bs)
    elif layer.max_seq_length is not None:
        tp = sp = _round_up(layer.max_seq_length, bs)
        checks = [tf.debugging.assert_less_equal(tf.shape(x)[1], layer.max_seq_length, message=f"{layer.name}: "
                  "a sequence is longer than max_seq_length") for x in (query, key)]  # fmt: skip
        with tf.control_dependencies(checks):
            query = tf.identity(query)
    else:
        raise ValueError(
            f"{layer.name}: the query and key lengths must be known while tracing (got {query.shape} and "
            f"{key.shape}) to build the block tables; or pass max_seq_length to pad every sequence to it"
        )
    tables = fused_tables_for_pattern(pattern, tp, sp, bs)

    batch, heads, key_dim, value_dim = tf.shape(query)[0], query.shape[2], query.shape[3], value.shape[3]
    kv_heads = key.shape[2]
    if kv_heads is None or heads % kv_heads or value.shape[2] != kv_heads:
        raise ValueError(f"{layer.name}: key and value need one static number of heads dividing {heads}, got "
                         f"{key.shape} and {value.shape}")  # fmt: skip
    width = max(key_dim, value_dim)  # the op takes one head width for q, k and v
    real_s = tf.shape(key)[1]
    q, k, v = (_pad_axis(_pad_axis(x, 3, width), 1, n) for x, n in ((query, tp), (key, sp), (value, sp)))
    q, k, v = (tf.reshape(x, [batch, n, nh * width]) for x, n, nh in ((q, tp, heads), (k, sp, kv_heads),
                                                                       (v, sp, kv_heads)))  # fmt: skip
    q_ids = k_ids = None
    if segment_ids is not None:  # padded queries and keys get ids of their own (-1, -2): they never meet
        q_ids, k_ids = (_pad_axis(tf.cast(x, tf.int32), 1, n, value) for x, n, value in
                        ((segment_ids[0], tp, -1), (segment_ids[1], sp, -2)))  # fmt: skip
    keep = tf.broadcast_to(tf.range(sp)[None, :] < real_s, [batch, sp])  # padded keys
    bias = None
    if mask is not None:
        _, h, tm, _ = mask.shape.as_list()
        if h == 1 and tm == 1:  # keys only
            keep &= _pad_axis(tf.broadcast_to(mask[:, 0, 0], [batch, tf.shape(mask)[-1]]), 1, sp, False)
        else:
            mask = tf.broadcast_to(mask, tf.stack([tf.shape(mask)[0], tf.shape(mask)[1], tf.shape(query)[1],
                                                   real_s]))  # fmt: skip
            bias = tf.where(mask, tf.zeros([], q.dtype), tf.constant(-np.inf, q.dtype))
            bias = _pad_axis(_pad_axis(bias, 2, tp), 3, sp)  # [B|1, N|1, Tp, Sp]; padded keys: see keep
    rate = dropout if training and dropout > 0 else 0.0
    seed = None
    if rate > 0:
        seed = tf.cast(keras.random.randint((), 0, 2**31 - 1, seed=dropout_layer.seed_generator), tf.int64)

    out, lse = fused_attention(q, k, v, tables, heads, scale=scale, key_padding_mask=keep, bias=bias,
                               dropout_rate=rate, seed=seed, return_lse=True, kv_heads=kv_heads,
                               q_segment_ids=q_ids, k_segment_ids=k_ids)  # fmt: skip
    real_t = tf.shape(query)[1]
    out = tf.reshape(out, [batch, tp, heads, width])[:, :real_t, :, : value_dim]
    # A query with no key left (masked by the query mask or by every key's mask): Keras's dot-product path
    # (no dropout) averages every value there, its manual path (dropout > 0) gives 0; so does this layer.
    empty = tf.transpose(tf.math.is_inf(lse[:, :, :real_t]), [0, 2, 1])[..., None]  # [B, T, N, 1]
    if query_mask is not None:
        empty |= ~tf.transpose(query_mask, [0, 2, 1, 3])
    fill = tf.zeros([], out.dtype)
    if not dropout and segment_ids is None:
        fill = tf.reduce_mean(tf.cast(value, tf.float32), axis=1, keepdims=True)  # [B, 1, G, Dv]
        fill = tf.cast(tf.repeat(fill, heads // kv_heads, axis=2), out.dtype)
    out = tf.where(empty, fill, out)  # where: no NaN of a padded query can leak
    return tf.ensure_shape(out, [None, t, heads, value_dim])


@keras.saving.register_keras_serializable(package="bsattn")
class SparseMultiHeadAttention(keras.layers.MultiHeadAttention):
    """``keras.layers.MultiHeadAttention`` on the fused block-sparse op: Keras's arguments, weights and call.

    ``SparseMultiHeadAttention(num_heads, key_dim, ..., sparsity_config=None, max_seq_length=None)`` takes every
    argument of Keras's layer (same order, same checks, same weights and ``get_config``) plus:

    - ``sparsity_config``: a DeepSpeed ``SparsityConfig`` with ``num_heads`` heads (None: every query attends every
      key, ``DenseSparsityConfig(num_heads)`` with blocks of 16). Cross-attention (``T != S``) uses its top-left
      ``[T, S]`` corner (``SparsityConfig``); lengths are padded inside to its ``block`` (padded keys are masked,
      padded queries dropped), so its layout is the one of the padded lengths.
    - ``max_seq_length``: lengths above it are an error; with a length unknown while tracing, queries and keys are
      padded to it (so the tables can be built).

    ``call(query, value, key=None, query_mask=None, value_mask=None, key_mask=None, attention_mask=None,
    return_attention_scores=False, training=None, use_causal_mask=False, segment_ids=None)`` as Keras's, on
    ``[B, T, dim]`` / ``[B, S, dim]`` inputs (other ranks and ``attention_axes`` other than the sequence axis:
    ``ValueError``), plus ``segment_ids`` (not in Keras):

    - ``segment_ids``: packed sequences, int ``[B, T]`` (self-attention: the same ids for queries and keys) or a
      pair ``(query_segment_ids [B, T], key_segment_ids [B, S])``: a query attends only the keys of its own
      segment (on top of every other mask), and blocks whose segments cannot meet are skipped per batch entry.
      A query with no key of its segment gives 0.

    - value/key masks (implicit or explicit) and an ``attention_mask`` ``[B|1, 1, S]`` become the op's key padding
      mask; any other ``attention_mask`` (``[T, S]``, ``[B, T, S]``, ``[B, N, T, S]``) the op's ``-inf`` bias
      ``[B|1, N|1, T, S]`` (read inside the active blocks only). ``use_causal_mask`` and ``sliding_window``
      are intersected with the sparsity pattern, so the blocks they exclude are skipped.
    - The query mask (implicit, as in Keras) masks the rows of the padded queries and is propagated to the
      output. A query whose every key is masked (a padded one, or one whose keys are all masked) gets what
      Keras gives it: the average of every value (Keras's dot-product path, ``dropout=0``) or 0 (its manual
      path, ``dropout > 0``); the op's log-sum-exp tells which rows have no key.
    - Dropout (``training=True``) is the op's: each probability dropped with probability ``dropout`` by a hash
      of a seed drawn from the layer's seed generator, kept ones scaled by ``1 / (1 - dropout)`` as in Keras
      (the same distribution, not the same mask as Keras's).
    - ``value_dim != key_dim``: the narrower of q/k and v gets zero channels up to the wider one.
    - ``return_attention_scores=True`` runs Keras's dense path with the pattern as a mask: exact Keras semantics
      (also for padded queries) but ``O(B·N·T·S)`` memory, like Keras.
    - ``cache [B, 2, T_max, N, key_dim]`` with ``cache_update_index`` (an int or an int scalar tensor): keras-hub's
      ``CachedMultiHeadAttention`` convention (``bsattn.deepspeed.kv_cache``): the new rows' keys/values are written
      at ``cache_update_index`` and the call returns ``(output, cache)``, the queries attending the cached keys at
      their absolute positions through the pattern (the fused op's decode mode; no retracing per step, XLA too).
      ``attention_mask`` then covers the ``T_max`` keys; value/key masks, segment ids and attention scores are not
      taken with a cache; no attention dropout; a query with no key gives 0.
    """

    def __init__(
        self,
        num_heads: int,
        key_dim: int,
        *args,
        sparsity_config: SparsityConfig | dict | None = None,
        max_seq_length: int | None = None,
        **kwargs,
    ):
        super().__init__(num_heads, key_dim, *args, **kwargs)
        _set_sparse_settings(self, sparsity_config, max_seq_length, num_heads, "num_heads")
        axes = self._attention_axes
        if axes is not None and tuple(a if a >= 0 else 3 + a for a in axes) != (1,):
            raise ValueError(
                f"attention_axes={axes!r} is not supported by SparseMultiHeadAttention: only the sequence axis "
                "(None, 1 or -2) of [batch, T, dim] inputs"
            )

    @classmethod
    def from_multi_head_attention(
        cls,
        mha: keras.layers.MultiHeadAttention,
        sparsity_config: SparsityConfig | None = None,
        max_seq_length: int | None = None,
    ) -> SparseMultiHeadAttention:
        """A sparse copy of ``mha``: its config and, if ``mha`` is built, a copy of its weights."""
        layer = cls(**mha.get_config(), sparsity_config=sparsity_config, max_seq_length=max_seq_length)
        if mha.built:
            layer.build_from_config(mha.get_build_config())
            layer.set_weights(mha.get_weights())
        return layer

    def build(self, query_shape, value_shape, key_shape=None):
        self.compute_output_shape(query_shape, value_shape, key_shape)  # Keras's check that key and value agree
        for name, shape in (("query", query_shape), ("value", value_shape), ("key", key_shape)):
            if shape is not None and len(shape) != 3:
                raise ValueError(
                    f"SparseMultiHeadAttention takes [batch, length, dim] inputs (rank 3), got {name} of shape "
                    f"{tuple(shape)}: attention over several axes is not supported"
                )
        super().build(query_shape, value_shape, key_shape)

    def call(
        self,
        query,
        value,
        key=None,
        query_mask=None,
        value_mask=None,
        key_mask=None,
        attention_mask=None,
        return_attention_scores=False,
        training=None,
        use_causal_mask=False,
        segment_ids=None,
        cache=None,
        cache_update_index=None,
    ):
        if key is None:
            key = value
        if cache is not None or cache_update_index is not None:
            return self._cached_call(query, value, key, attention_mask, cache, cache_update_index, use_causal_mask,
                                     return_attention_scores, value_mask, key_mask, segment_ids)  # fmt: skip
        segments = _segment_pair(segment_ids)
        # As Keras: the query's own mask is what the output carries; the masks are consumed here.
        query_mask = get_keras_mask(query)
        for x in (query, value, key):
            set_keras_mask(x, None)
        gate = self._gate_dense(query) if self._use_gate else None
        q, k, v = self._query_dense(query), self._key_dense(key), self._value_dense(value)
        if type(self)._compute_attention is SparseMultiHeadAttention._compute_attention:
            keys = [tf.convert_to_tensor(m) for m in (value_mask, key_mask) if m is not None]
            key_keep = None
            for m in keys:
                m = m if m.dtype == tf.bool else tf.not_equal(m, tf.zeros([], m.dtype))
                key_keep = m if key_keep is None else key_keep & m
            out, scores = self._compute_attention(
                q, k, v, attention_mask, training, return_attention_scores,
                use_causal_mask=use_causal_mask, key_mask=key_keep, query_mask=query_mask, segment_ids=segments,
            )  # fmt: skip
        else:  # a subclass's _compute_attention gets Keras's merged mask (its signature may be Keras's older one)
            mask = self._compute_attention_mask(
                query, value, query_mask=query_mask, value_mask=value_mask, key_mask=key_mask,
                attention_mask=attention_mask, use_causal_mask=use_causal_mask,
            )  # fmt: skip
            if segments is not None:
                same = _segment_mask(segments)[:, 0]
                mask = same if mask is None else tf.cast(mask, tf.bool) & same
            out, scores = self._compute_attention(q, k, v, mask, training, return_attention_scores)
        out = self._output_dense(out * gate if gate is not None else out)
        if query_mask is not None:
            set_keras_mask(out, query_mask)
        return (out, scores) if return_attention_scores else out

    def _cached_call(self, query, value, key, attention_mask, cache, cache_update_index, use_causal_mask,
                     return_attention_scores, value_mask, key_mask, segment_ids):  # fmt: skip
        """keras-hub's ``CachedMultiHeadAttention`` call (``bsattn.deepspeed.kv_cache``) → ``(output, cache)``."""
        if cache is None:
            raise ValueError("cache_update_index was given without cache: pass both (or neither)")
        given = [n for n, x in (("return_attention_scores", return_attention_scores), ("value_mask", value_mask),
                                ("key_mask", key_mask), ("segment_ids", segment_ids)) if x is not None and x is not False]
        if given:
            raise ValueError(f"{self.name}: {', '.join(given)} cannot be combined with cache (pass attention_mask "
                             "[batch, Tq, T_max] for the keys of the cache)")  # fmt: skip
        bs = self.sparsity_config.block
        cache = kv_cache.check_cache(cache, self._num_heads, self._key_dim, self._value_dim, bs, self.compute_dtype)
        t_max = cache.shape[2]
        if self.max_seq_length is not None and t_max > self.max_seq_length:
            raise ValueError(f"{self.name}: cache T_max={t_max} is more than max_seq_length={self.max_seq_length}")
        for x in (query, value, key):
            set_keras_mask(x, None)
        gate = self._gate_dense(query) if self._use_gate else None
        q, k, v = self._query_dense(query), self._key_dense(key), self._value_dense(value)
        index = kv_cache.check_index(cache_update_index, q.shape[1], t_max)
        mask = None if attention_mask is None else _rank4_mask(attention_mask, "attention_mask")
        out, cache = kv_cache.cached_attention(self, self._pattern(use_causal_mask), bs, q, k, v, cache, index, mask,
                                               self._inverse_sqrt_key_dim)  # fmt: skip
        return self._output_dense(out * gate if gate is not None else out), cache

    def _pattern(self, use_causal_mask: bool) -> Pattern:
        pattern: Pattern = self.sparsity_config
        if use_causal_mask:
            pattern = pattern & Causal()
        if self._sliding_window is not None:
            pattern = pattern & SlidingWindow(self._sliding_window)
        return pattern

    def _compute_attention(
        self,
        query,
        key,
        value,
        attention_mask=None,
        training=None,
        return_attention_scores=False,
        use_causal_mask=False,
        key_mask=None,
        query_mask=None,
        segment_ids=None,
    ):
        """Attention of projected ``query [B, T, N, key_dim]``, ``key [B, S, N, key_dim]``, ``value [B, S, N,
        value_dim]`` → ``([B, T, N, value_dim], scores [B, N, T, S] or None)``.

        ``attention_mask``: see the class docstring (True/nonzero = attend); ``key_mask [B, S]``, ``query_mask
        [B, T]``: bool, or nonzero = a real token; ``segment_ids``: ``(query ids [B, T], key ids [B, S])``.
        """
        segment_ids = _segment_pair(segment_ids)
        query, key, value = (tf.convert_to_tensor(x, dtype_hint=self.compute_dtype) for x in (query, key, value))
        t, s = query.shape[1], key.shape[1]
        for name, n in (("T (query length)", t), ("S (key length)", s)):
            if self.max_seq_length is not None and n is not None and n > self.max_seq_length:
                raise ValueError(f"{self.name}: {name}={n} is more than max_seq_length={self.max_seq_length}")
        mask = None if attention_mask is None else _rank4_mask(attention_mask, "attention_mask")
        if key_mask is not None:
            km = _rank4_mask(tf.convert_to_tensor(key_mask)[:, None, :], "key_mask")
            mask = km if mask is None else mask & km
        if query_mask is not None:
            query_mask = _rank4_mask(tf.convert_to_tensor(query_mask)[:, :, None], "query_mask")  # [B, 1, T, 1]
        if return_attention_scores:
            if query_mask is not None:
                mask = query_mask if mask is None else mask & query_mask
            if segment_ids is not None:
                mask = _segment_mask(segment_ids) if mask is None else mask & _segment_mask(segment_ids)
            return self._dense_attention(query, key, value, mask, training, use_causal_mask)
        out = _block_sparse_attention(
            self, self._pattern(use_causal_mask), self.sparsity_config.block, query, key, value, mask, query_mask,
            float(self._dropout), training, self._dropout_layer, self._inverse_sqrt_key_dim, segment_ids,
        )  # fmt: skip
        return out, None

    def _dense_attention(self, query, key, value, mask, training, use_causal_mask):
        """Keras's own attention with the sparsity pattern as a mask (for ``return_attention_scores``)."""
        t, s = query.shape[1], key.shape[1]
        if t is None or s is None:
            raise ValueError(f"{self.name}: return_attention_scores needs static lengths, got {query.shape}, {key.shape}")
        bs = self.sparsity_config.block
        allowed = self._pattern(use_causal_mask).token_mask(_round_up(t, bs), _round_up(s, bs))[:, :t, :s]
        allowed = tf.constant(allowed[None])  # [1, L, T, S]
        mask = allowed if mask is None else mask & allowed
        return super()._compute_attention(query, key, value, mask, training, return_attention_scores=True)

    def get_config(self) -> dict:
        return {
            **super().get_config(),
            "sparsity_config": None if self._default_config else serialize_sparsity_config(self.sparsity_config),
            "max_seq_length": self.max_seq_length,
        }


@keras.saving.register_keras_serializable(package="bsattn")
class SparseGroupedQueryAttention(keras.layers.GroupQueryAttention):
    """``keras.layers.GroupQueryAttention`` (``GroupedQueryAttention``) on the fused block-sparse op, K/V heads
    shared inside the op: Keras's arguments, weights, ``get_config`` and call, plus ``sparsity_config``
    (``num_query_heads`` heads; None: dense, blocks of 16) and ``max_seq_length``.

    ``SparseGroupedQueryAttention(head_dim, num_query_heads, num_key_value_heads, dropout=0.0, use_bias=True,
    use_gate=False, sliding_window=None, flash_attention=None, kernel_*/bias_* initializers, regularizers and
    constraints, seed=None, ..., sparsity_config=None, max_seq_length=None)``;
    ``call(query, value, key=None, query_mask=None, value_mask=None, key_mask=None, attention_mask=None,
    return_attention_scores=False, training=None, use_causal_mask=False, segment_ids=None)`` on ``[B, T, dim]`` /
    ``[B, S, dim]`` inputs.

    - No copy of K/V: the ``num_key_value_heads`` projected key/value heads go to the op as they are
      (``kv_heads``); query head ``h`` reads K/V head ``h // (num_query_heads // num_key_value_heads)``, as Keras's
      ``ops.repeat`` arranges them; their gradients sum over each group inside the op.
    - Masks as in ``SparseMultiHeadAttention``: value/key masks (implicit or explicit) and an ``attention_mask``
      ``[B|1, 1, S]`` become the op's key padding mask, any other ``attention_mask`` a ``-inf`` bias;
      ``use_causal_mask`` and ``sliding_window`` are intersected with the sparsity pattern (skipped blocks); the
      query mask (implicit) marks the padded queries, which get what Keras gives them (the average of every value
      without dropout, 0 with dropout).
    - ``segment_ids`` (not in Keras): packed sequences, as in ``SparseMultiHeadAttention``.
    - ``return_attention_scores=True`` runs Keras's own dense path (K/V repeated, ``O(B·N·T·S)`` memory) with the
      pattern (and segments) as a mask.
    """

    def __init__(
        self,
        head_dim: int,
        num_query_heads: int,
        num_key_value_heads: int,
        *args,
        sparsity_config: SparsityConfig | dict | None = None,
        max_seq_length: int | None = None,
        **kwargs,
    ):
        super().__init__(head_dim, num_query_heads, num_key_value_heads, *args, **kwargs)
        _set_sparse_settings(self, sparsity_config, max_seq_length, num_query_heads, "num_query_heads")
        self._segments = None  # the dense path's segment ids (return_attention_scores), set by call

    def _pattern(self, use_causal_mask: bool) -> Pattern:
        pattern: Pattern = self.sparsity_config
        if use_causal_mask:
            pattern = pattern & Causal()
        if self.sliding_window is not None:
            pattern = pattern & SlidingWindow(self.sliding_window)
        return pattern

    def call(
        self,
        query,
        value,
        key=None,
        query_mask=None,
        value_mask=None,
        key_mask=None,
        attention_mask=None,
        return_attention_scores=False,
        training=None,
        use_causal_mask=False,
        segment_ids=None,
    ):
        segments = _segment_pair(segment_ids)
        if return_attention_scores:  # Keras's dense path (it repeats K/V), with the pattern as a mask
            self._segments = segments
            try:
                return super().call(query, value, key, query_mask, value_mask, key_mask, attention_mask,
                                    return_attention_scores, training, use_causal_mask)  # fmt: skip
            finally:
                self._segments = None
        self._return_attention_scores = False
        if key is None:
            key = value
        gate = self._gate_dense(query) if self.use_gate else None
        q, k, v = self._query_dense(query), self._key_dense(key), self._value_dense(value)  # k, v: [B, S, G, D]
        t, s = q.shape[1], k.shape[1]
        for name, n in (("T (query length)", t), ("S (key length)", s)):
            if self.max_seq_length is not None and n is not None and n > self.max_seq_length:
                raise ValueError(f"{self.name}: {name}={n} is more than max_seq_length={self.max_seq_length}")
        mask = None if attention_mask is None else _rank4_mask(attention_mask, "attention_mask")
        for m in (value_mask, key_mask):
            if m is not None:
                km = _rank4_mask(tf.convert_to_tensor(m)[:, None, :], "key_mask")
                mask = km if mask is None else mask & km
        if query_mask is not None:
            query_mask = _rank4_mask(tf.convert_to_tensor(query_mask)[:, :, None], "query_mask")  # [B, 1, T, 1]
        out = _block_sparse_attention(
            self, self._pattern(use_causal_mask), self.sparsity_config.block, q, k, v, mask, query_mask,
            float(self.dropout), training, self._dropout_layer, self._inverse_sqrt_head_dim, segments,
        )  # fmt: skip
        return self._output_dense(out * gate if gate is not None else out)

    def _compute_attention(self, query, key, value, attention_mask=None, training=None, use_causal_mask=False):
        """Keras's dense attention (``return_attention_scores`` only: K/V already repeated to ``N`` heads by its
        call) with the sparsity pattern and the segment ids as a mask."""
        query, key, value = (tf.convert_to_tensor(x, dtype_hint=self.compute_dtype) for x in (query, key, value))
        mask = None if attention_mask is None else _rank4_mask(attention_mask, "attention_mask")
        t, s, bs = query.shape[1], key.shape[1], self.sparsity_config.block
        if t is None or s is None:
            raise ValueError(
                f"{self.name}: return_attention_scores needs static lengths, got {query.shape}, {key.shape}"
            )
        pattern = self._pattern(use_causal_mask)
        allowed = tf.constant(pattern.token_mask(_round_up(t, bs), _round_up(s, bs))[None, :, :t, :s])
        mask = allowed if mask is None else mask & allowed
        if self._segments is not None:
            mask = mask & _segment_mask(self._segments)
        return super()._compute_attention(query, key, value, mask, training)

    def get_config(self) -> dict:
        return {
            **super().get_config(),
            "sparsity_config": None if self._default_config else serialize_sparsity_config(self.sparsity_config),
            "max_seq_length": self.max_seq_length,
        }
