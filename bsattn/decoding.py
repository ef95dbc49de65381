"""Incremental decoding with a key/value cache, over the block-sparse patterns.

``decode_attention(q, k_cache, v_cache, position, tables, heads)`` is the attention of ``Tq`` new query rows at
the absolute positions ``[position, position + Tq)`` against a preallocated cache ``[B, T_max, KVH*D]`` whose rows
``< position + Tq`` are written (the rest may hold anything: it is never read). ``tables`` are the pattern's
fused tables for ``(T_max, T_max)`` (``decode_tables``, built once per (pattern, T_max) and cached), so a step
visits only the table rows of its query blocks and, in them, only the key blocks the pattern makes active: for
``local`` the last window whatever ``position`` is, for ``fixed`` the window plus the summary columns so far.

- Outside XLA it is one call of the fused op in decode mode (``fused_attention(..., q_offset=position)``).
- Under XLA (``tf.function(jit_compile=True)``), where custom ops cannot compile, ``_decode_tf`` computes the same
  in TensorFlow ops: it gathers the key/value blocks listed by the touched table rows (a static count: the
  longest row ``R`` of the tables), applies the in-block masks of the absolute query positions, the cache bound
  ``key < position + Tq``, key padding and bias, and takes a masked softmax in float32 (float64 for float64).
  Its cost per step depends on ``R``, not on ``position``.

``blocksparse_decode_impl`` is the decode twin of ``bsattn.blocksparse_attention_impl`` (the sparse_attention
modes). Its ``'strided'`` mode lives in ``strided_transpose``'s coordinates, where the cache in original token
order is not contiguous; the query at token ``t = a*L + b`` attends the tokens ``b, b + L, ..., t`` (its residue
class), so each new row gathers its class's ``T_max / L`` rows of the cache and runs causal attention over them
at position ``a`` (work per token: ``T_max / L`` gathered rows, ``a + 1`` attended keys, as the pattern says).

Decoding is forward-only (no gradient) and without dropout.
"""

from __future__ import annotations

import functools
import math
import numbers

import numpy as np
import tensorflow as tf

from bsattn import _checks as checks
from bsattn import patterns
from bsattn.fused_attention import fused_attention, fused_scale
from bsattn.fused_tables import FusedTables, fused_tables_for_pattern
from bsattn.gather_attention import _row_lists, in_xla_context
from bsattn.sparse_attention import blocksparse_attention_impl
from bsattn.tables import BLOCK_SIZES


def decode_tables(pattern: patterns.Pattern, t_max: int, block_size: int) -> FusedTables:
    """The tables of ``pattern`` for a cache of ``t_max`` positions (``n_q = n_k = t_max``; cached per
    (pattern, t_max, block_size), never rebuilt per step). ``t_max`` must be a multiple of ``block_size``."""
    checks.positive_int("t_max", t_max)
    checks.choice("block_size", block_size, BLOCK_SIZES)
    if t_max % block_size:
        raise ValueError(f"t_max={t_max} must be a multiple of block_size={block_size}")
    return fused_tables_for_pattern(pattern, t_max, t_max, block_size)


def decode_attention(
    q: tf.Tensor,
    k_cache: tf.Tensor,
    v_cache: tf.Tensor,
    position: int | tf.Tensor,
    tables: FusedTables,
    heads: int,
    scale: float | None = None,
    kv_heads: int | None = None,
    key_padding_mask: tf.Tensor | None = None,
    bias: tf.Tensor | None = None,
) -> tf.Tensor:
    """Attention of the new rows: ``q [B, Tq, H*D]`` at positions ``[position, position + Tq)`` over the cache
    ``k_cache, v_cache [B, T_max, KVH*D]`` → ``[B, Tq, H*D]`` (``q``'s dtype).

    Args:
      q: the new queries, float32/float16/bfloat16/float64, static ``Tq >= 1`` and width.
      k_cache, v_cache: the cache, ``q``'s dtype; rows ``>= position + Tq`` are never read.
      position: int32 scalar tensor (no retracing per step) or int: the absolute position of ``q``'s row 0;
        ``0 <= position`` and ``position + Tq <= T_max`` (checked: by the op, or by assertions in the TF path).
      tables: ``decode_tables(pattern, T_max, bs)`` (``n_q = n_k = T_max``); ``lut_heads`` 1 or ``heads``.
      heads, kv_heads (None = heads, dividing heads: grouped-query), scale (default ``1/sqrt(D)``): as
        ``fused_attention``.
      key_padding_mask: bool ``[B, T_max]``, False = a key never attended.
      bias: ``[B|1, H|1, Tq, T_max]`` added to the scores (e.g. ``-inf`` to mask), ``q``'s dtype.
    """
    q = checks.float_tensor("q", q)
    k_cache = checks.float_tensor("k_cache", k_cache, q.dtype)
    v_cache = checks.float_tensor("v_cache", v_cache, q.dtype)
    checks.instance("tables", tables, FusedTables)
    heads = checks.positive_int("heads", heads)
    kv_heads = heads if kv_heads is None else checks.positive_int("kv_heads", kv_heads)
    if heads % kv_heads:
        raise ValueError(f"kv_heads={kv_heads} must divide heads={heads}")
    if tables.n_q != tables.n_k:
        raise ValueError(f"tables must be a cache's (n_q = n_k = T_max: decode_tables), got {tables.n_q} x {tables.n_k}")
    t_max = tables.n_k
    if q.shape.rank != 3 or q.shape[1] is None or q.shape[2] is None or q.shape[1] < 1:
        raise ValueError(f"q must be [batch, Tq, heads*head_dim] with static Tq >= 1 and width, got shape {q.shape}")
    tq, width = q.shape[1], q.shape[2]
    if width % heads:
        raise ValueError(f"q width {width} is not divisible by heads {heads}")
    kv_width = width // heads * kv_heads
    for name, x in (("k_cache", k_cache), ("v_cache", v_cache)):
        if x.dtype != q.dtype:
            raise TypeError(f"{name} must have q's dtype {q.dtype.name}, got {x.dtype.name}")
        if x.shape.rank != 3 or not x.shape.is_compatible_with([q.shape[0], t_max, kv_width]):
            batch = "?" if q.shape[0] is None else q.shape[0]
            raise ValueError(f"{name} must have shape [{batch}, T_max={t_max}, {kv_width}] (the tables' T_max, "
                             f"kv_heads * head_dim), got {x.shape}")  # fmt: skip
    if tq > t_max:
        raise ValueError(f"q has Tq={tq} rows, more than the cache's T_max={t_max}")
    scale = fused_scale(width // heads, scale)
    if key_padding_mask is not None:
        key_padding_mask = tf.convert_to_tensor(key_padding_mask)
        if key_padding_mask.dtype != tf.bool:
            key_padding_mask = tf.not_equal(key_padding_mask, tf.zeros([], key_padding_mask.dtype))
        if not key_padding_mask.shape.is_compatible_with([q.shape[0], t_max]):
            raise ValueError(f"key_padding_mask must have shape [batch, T_max={t_max}], got {key_padding_mask.shape}")
    if bias is not None:
        bias = tf.cast(bias, q.dtype)
        b = bias.shape
        if b.rank != 4 or b[2:] != [tq, t_max] or b[0] not in (1, None, q.shape[0]) or b[1] not in (1, heads):
            raise ValueError(f"bias must be [batch or 1, {heads} or 1, Tq={tq}, T_max={t_max}], got {bias.shape}")
    if _is_prefill(position, tq, t_max):  # the whole cache at once: the normal op
        return fused_attention(q, k_cache, v_cache, tables, heads, scale=scale, kv_heads=kv_heads,
                               key_padding_mask=key_padding_mask, bias=bias)  # fmt: skip
    position = checked_position("position", position, tq, t_max)
    if in_xla_context():
        return _decode_tf(q, k_cache, v_cache, position, tables, heads, kv_heads, scale, key_padding_mask, bias)
    return fused_attention(q, k_cache, v_cache, tables, heads, scale=scale, kv_heads=kv_heads,
                           key_padding_mask=key_padding_mask, bias=bias, q_offset=position)  # fmt: skip


def _is_prefill(position, tq: int, t_max: int) -> bool:
    """A call over the whole cache from the int position 0 (a prefill), which the normal op computes."""
    is_int = isinstance(position, numbers.Integral) and not isinstance(position, bool)
    return is_int and position == 0 and tq == t_max


def _position(name: str, position, tq: int, t_max: int) -> tf.Tensor:
    """``position`` as an int32 scalar; a Python int is range-checked here (a tensor by the op / the TF path)."""
    if tf.is_tensor(position):
        if not position.dtype.is_integer or position.shape.rank not in (0, None):
            raise TypeError(f"{name} must be an int scalar tensor or an int, got {position.dtype.name} {position.shape}")
        return tf.cast(position, tf.int32)
    if isinstance(position, bool) or not isinstance(position, numbers.Integral):
        raise TypeError(f"{name} must be an int scalar tensor or an int, got {position!r}")
    if not 0 <= position <= t_max - tq:
        raise ValueError(f"{name}={position} is out of range: 0 <= {name} and {name} + Tq ({tq}) <= T_max ({t_max})")
    return tf.constant(int(position), tf.int32)


def checked_position(name: str, position, tq: int, t_max: int) -> tf.Tensor:
    """``_position``, with a run-time check of a tensor: InvalidArgumentError naming ``name`` unless ``0 <= position``
    and ``position + Tq <= T_max`` (under XLA, where assertions do not run, the op's bounds are not checked)."""
    if not tf.is_tensor(position):
        return _position(name, position, tq, t_max)  # range-checked there
    position = _position(name, position, tq, t_max)
    if in_xla_context():  # XLA drops assertions (with a warning per assertion)
        return position
    message = f"{name} is out of range: 0 <= {name} and {name} + Tq ({tq}) <= T_max ({t_max}) must hold"
    with tf.control_dependencies([
        tf.debugging.assert_greater_equal(position, 0, message=message),
        tf.debugging.assert_less_equal(position, t_max - tq, message=message),
    ]):  # fmt: skip
        return tf.identity(position)


@functools.lru_cache(maxsize=32)
def _block_masks(tables: FusedTables) -> np.ndarray:
    """The in-block masks with an all-kept one appended (mask id ``P`` of ``_row_lists``) → bool ``[P + 1, bs, bs]``."""
    bs = tables.block_size
    return np.concatenate([tables.unpacked_masks(), np.ones((1, bs, bs), bool)])


@tf.autograph.experimental.do_not_convert
def _decode_tf(q, k, v, position, tables, heads, kv_heads, scale, key_padding_mask=None, bias=None) -> tf.Tensor:
    """``decode_attention`` in TensorFlow ops (XLA): arguments already checked there → ``[B, Tq, H*D]``.

    The ``Tq`` rows occupy ``n_rows`` consecutive query blocks (static: ``(Tq + bs - 2) // bs + 1``) from
    ``position // bs``; the new rows sit in ``n_rows * bs`` slots at offset ``position % bs``, each block row
    gathers its ``R`` listed key blocks, and a slot's keys are kept by its block's mask row, the cache bound and the
    masks given. Slots without a new row and rows past the tables are computed as masked and dropped.
    """
    acc = tf.float64 if q.dtype == tf.float64 else tf.float32
    bs, n_qb, n_kb, lut = tables.block_size, tables.n_q_blocks, tables.n_k_blocks, tables.lut_heads
    tq, width = q.shape[1], q.shape[2]
    d = width // heads
    batch = tf.shape(q)[0]
    n_rows = (tq + bs - 2) // bs + 1
    k_blocks, mask_ids, valid = (tf.constant(x) for x in _row_lists(tables))  # [L, nQb, R]
    r = k_blocks.shape[-1]
    row_ids = position // bs + tf.range(n_rows)  # [n_rows]
    rows = tf.minimum(row_ids, n_qb - 1)
    kb = tf.gather(k_blocks, rows, axis=1)  # [L, n, R]
    key_pos = kb[..., None] * bs + tf.range(bs)  # [L, n, R, bs]
    # Keys a row may read: listed, in the tables, and written (key < position + Tq); masked ones are never read.
    key_ok = tf.gather(valid, rows, axis=1) & (row_ids < n_qb)[None, :, None]
    key_ok = tf.reshape(key_ok[..., None] & (key_pos < position + tq), [1, lut, n_rows, r * bs])
    if key_padding_mask is not None:
        kp = tf.gather(tf.reshape(key_padding_mask, [batch, n_kb, bs]), kb, axis=1)  # [B, L, n, R, bs]
        key_ok = key_ok & tf.reshape(kp, [batch, lut, n_rows, r * bs])
    in_block = tf.gather(tf.constant(_block_masks(tables)), tf.gather(mask_ids, rows, axis=1))  # [L, n, R, bs, bs]
    in_block = tf.reshape(tf.transpose(in_block, [0, 1, 3, 2, 4]), [1, lut, n_rows, bs, r * bs])
    # Slots: slot s holds query row s - offset (offset = position % bs) where that is in [0, Tq).
    offset = position - (position // bs) * bs
    slot_row = tf.range(n_rows * bs) - offset
    slot_ok = tf.reshape((slot_row >= 0) & (slot_row < tq), [1, 1, n_rows, bs, 1])
    keep = in_block & key_ok[:, :, :, None, :] & slot_ok  # [B|1, L, n, bs, R*bs]
    qs = tf.gather(tf.cast(q, acc), tf.clip_by_value(slot_row, 0, tq - 1), axis=1)  # [B, n*bs, H*D]
    qs = tf.transpose(tf.reshape(qs, [batch, n_rows, bs, heads, d]), [0, 3, 1, 2, 4])  # [B, H, n, bs, D]
    # Key/value blocks of the touched rows, read per layout head; query head h takes K/V head h // (H // KVH).
    head_map = np.arange(heads) // (heads // kv_heads)
    gathered = []
    for x in (k, v):
        blocks = tf.gather(tf.reshape(tf.cast(x, acc), [batch, n_kb, bs, kv_heads, d]), kb, axis=1)
        # blocks: [B, L, n, R, bs, KVH, D]
        if lut == 1:
            blocks = tf.transpose(tf.gather(blocks[:, 0], head_map, axis=4), [0, 4, 1, 2, 3, 5])
        else:
            blocks = tf.einsum("bhnrjkd,hk->bhnrjd", blocks, tf.constant(np.eye(kv_heads)[head_map], acc))
        blocks = tf.reshape(blocks, [batch, heads, n_rows, r * bs, d])
        gathered.append(tf.where(key_ok[..., None], blocks, tf.zeros([], acc)))  # no NaN of unread rows leaks
    kc, vc = gathered
    s = tf.einsum("bhnid,bhnjd->bhnij", qs, kc) * tf.constant(scale, acc)  # [B, H, n, bs, R*bs]
    if bias is not None:  # [B|1, H|1, Tq, T_max] -> the slots' rows and the gathered keys
        hh = max(lut, bias.shape[1])
        bb = tf.gather(tf.cast(bias, acc), tf.clip_by_value(slot_row, 0, tq - 1), axis=2)  # [Bb, Hb, n*bs, T_max]
        bb = tf.reshape(bb, [-1, bias.shape[1], n_rows, bs, n_kb, bs])
        bb = tf.transpose(bb, [0, 1, 2, 4, 3, 5])  # [Bb, Hb, n, nKb, bs_q, bs_k]
        bb = tf.broadcast_to(bb, tf.concat([tf.shape(bb)[:1], [hh, n_rows, n_kb, bs, bs]], 0))
        idx = tf.broadcast_to(kb, [hh, n_rows, r])
        idx = tf.broadcast_to(idx[None], tf.concat([tf.shape(bb)[:1], [hh, n_rows, r]], 0))
        bb = tf.gather(bb, idx, axis=3, batch_dims=3)  # [Bb, hh, n, R, bs_q, bs_k]
        s += tf.reshape(tf.transpose(bb, [0, 1, 2, 4, 3, 5]), [-1, hh, n_rows, bs, r * bs])
    s = tf.where(keep, s, tf.constant(-np.inf, acc))
    m = tf.reduce_max(s, axis=-1, keepdims=True)
    m = tf.where(tf.math.is_inf(m), tf.zeros_like(m), m)  # a row with no key: p = 0, output 0
    p = tf.exp(s - m)
    total = tf.reduce_sum(p, axis=-1, keepdims=True)
    p = p / tf.where(total > 0, total, tf.ones_like(total))
    o = tf.reshape(tf.einsum("bhnij,bhnjd->bhnid", p, vc), [batch, heads, n_rows * bs, d])
    o = tf.gather(o, offset + tf.range(tq), axis=2)  # [B, H, Tq, D]
    return tf.cast(tf.reshape(tf.transpose(o, [0, 2, 1, 3]), [batch, tq, width]), q.dtype)


def blocksparse_decode_impl(
    q: tf.Tensor,
    k_cache: tf.Tensor,
    v_cache: tf.Tensor,
    position: int | tf.Tensor,
    heads: int,
    attn_mode: str,
    local_attn_ctx: int | None = None,
    blocksize: int = 32,
    num_verts: int | None = None,
    vertsize: int | None = None,
    *,
    kv_heads: int | None = None,
) -> tf.Tensor:
    """The rows ``[position, position + Tq)`` of ``blocksparse_attention_impl(q_all, k_cache, v_cache, ...)``:
    ``q [B, Tq, H*D]``, the cache ``k_cache, v_cache [B, T_max, KVH*D]`` in token order (rows ``>= position + Tq``
    never read) → ``[B, Tq, H*D]``. Same modes and arguments; ``T_max`` plays ``n_ctx`` (the tables are those of
    ``T_max``, cached); scale ``1/sqrt(D)``. ``'strided'``: see the module docstring."""
    checks.choice("attn_mode", attn_mode, patterns.ATTN_MODES)
    checks.choice("blocksize", blocksize, BLOCK_SIZES)
    heads = checks.positive_int("heads", heads)
    q = checks.float_tensor("q", q)
    k_cache = checks.float_tensor("k_cache", k_cache, q.dtype)
    v_cache = checks.float_tensor("v_cache", v_cache, q.dtype)
    if k_cache.shape.rank != 3 or k_cache.shape[1] is None:
        raise ValueError(f"k_cache must be [batch, T_max, kv_heads*head_dim] with a static T_max, got {k_cache.shape}")
    t_max = k_cache.shape[1]
    if q.shape.rank != 3 or q.shape[-1] is None or q.shape[-1] % heads:
        raise ValueError(f"q must be [batch, Tq, heads*head_dim] (width divisible by heads={heads}), got {q.shape}")
    scale = 1.0 / math.sqrt(q.shape[-1] // heads)
    pattern = patterns.mode_pattern(attn_mode, t_max, heads, local_attn_ctx, blocksize=blocksize,
                                    num_verts=num_verts, vertsize=vertsize)  # fmt: skip
    if attn_mode == "strided" and _is_prefill(position, q.shape[1], t_max):  # the normal op
        return blocksparse_attention_impl(q, k_cache, v_cache, heads, attn_mode, local_attn_ctx, blocksize,
                                          num_verts, vertsize, kv_heads=kv_heads)  # fmt: skip
    if attn_mode != "strided":
        tables = decode_tables(pattern, t_max, blocksize)
        return decode_attention(q, k_cache, v_cache, position, tables, heads, scale=scale, kv_heads=kv_heads)
    return _strided_decode(q, k_cache, v_cache, position, heads, local_attn_ctx, blocksize, scale, kv_heads)


def _strided_decode(q, k_cache, v_cache, position, heads, local_attn_ctx, blocksize, scale, kv_heads) -> tf.Tensor:
    """``'strided'`` decoding: new row ``i`` (token ``t = p + i = a_i*L + b_i``) attends its residue class ``b_i``.

    Every row becomes one batch entry: its class's ``bT = T_max / L`` cache rows, shifted right by ``s_i = a_max -
    a_i`` (``a_max`` the last row's ``a``) so that all rows decode at the one position ``a_max`` of a causal
    pattern over ``bT`` keys; the ``s_i`` shifted-in slots are masked as padding."""
    tq, t_max = q.shape[1], k_cache.shape[1]
    if tq is None:
        raise ValueError(f"q must have a static Tq, got shape {q.shape}")
    b_t = t_max // local_attn_ctx
    position = checked_position("position", position, tq, t_max)
    tokens = position + tf.range(tq)  # [Tq]
    a, b = tokens // local_attn_ctx, tokens % local_attn_ctx
    a_max = (position + tq - 1) // local_attn_ctx
    j = tf.range(b_t)[None, :] - (a_max - a)[:, None]  # [Tq, bT]: class index of slot j (< 0: padding)
    rows = tf.maximum(j, 0) * local_attn_ctx + b[:, None]
    batch = tf.shape(q)[0]
    k_rows, v_rows = (tf.reshape(tf.gather(x, rows, axis=1), [batch * tq, b_t, x.shape[-1]]) for x in (k_cache, v_cache))
    kpm = tf.reshape(tf.broadcast_to(j >= 0, [batch, tq, b_t]), [batch * tq, b_t])
    tables = decode_tables(patterns.Causal(), b_t, blocksize)
    out = decode_attention(tf.reshape(q, [batch * tq, 1, q.shape[-1]]), k_rows, v_rows, a_max, tables, heads,
                           scale=scale, kv_heads=kv_heads, key_padding_mask=kpm)  # fmt: skip
    return tf.reshape(out, [batch, tq, q.shape[-1]])
