"""The fused op's attention in plain TensorFlow ops, for XLA (``jit_compile=True``), where custom ops cannot run.

``gather_attention`` computes what ``bsattn.fused_attention.fused_attention`` computes, over the same
``FusedTables``: for each chunk of query blocks it gathers the key/value blocks its rows list (every row padded to
the longest row ``R`` with invalid slots), forms the scores of those blocks only, applies the in-block masks, key
padding, segment ids, bias and the op's dropout hash (so the same entries are dropped for the same seed), and takes
a masked softmax in float32 (float64 for float64 inputs). Grouped-query K/V (``kv_heads``) are read per query head
by a gather of the K/V heads. Gradients are TensorFlow's own, except that the two products never multiply a masked
entry's zero by a NaN/Inf (the op's rule: what is masked is never read; an attended NaN propagates, a non-finite
attended value as NaN).

Memory: the forward pass holds one chunk of scores at a time (about ``_CHUNK_ELEMS`` scores per batch entry);
the backward pass keeps, as TensorFlow does for any graph, the probabilities of every chunk: ``B·H·Tq·R·bs``
values, i.e. the attention matrix over the active blocks (padded to the longest row), like the unfused engine.

``fused_attention`` switches to it by itself when it is traced inside an XLA cluster (``in_xla_context``).
"""

from __future__ import annotations

import functools

import numpy as np
import tensorflow as tf
from tensorflow.python.framework import ops as tf_ops
from tensorflow.python.ops import control_flow_util

from bsattn.fused_tables import FusedTables

# Scores per batch entry and chunk of query blocks (heads x rows x gathered keys): bounds the forward memory.
_CHUNK_ELEMS = 1 << 21
_GOLDEN = 0x9E3779B97F4A7C15


def in_xla_context() -> bool:
    """True while tracing inside ``tf.function(jit_compile=True)`` (or another XLA cluster)."""
    return control_flow_util.GraphOrParentsInXlaContext(tf_ops.get_default_graph())


@functools.lru_cache(maxsize=32)
def _row_lists(tables: FusedTables) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The active blocks of every query-block row, padded to the longest row ``R``:
    ``(k_blocks [L, nQb, R] int32, mask_ids [L, nQb, R] int32, valid [L, nQb, R] bool)``; a full block has
    mask id ``P`` (the index of an all-kept mask appended to ``tables.masks``)."""
    counts = np.diff(tables.row_ptr, axis=1)  # [L, nQb]
    width = max(1, int(counts.max(initial=0)))
    shape = (tables.lut_heads, tables.n_q_blocks, width)
    k_blocks, mask_ids = np.zeros(shape, np.int32), np.zeros(shape, np.int32)
    valid = np.arange(width)[None, None, :] < counts[..., None]
    n_masks = tables.masks.shape[0]
    for head in range(tables.lut_heads):
        entries = tables.row_entries[tables.row_ptr[head, 0] : tables.row_ptr[head, -1]]
        k_blocks[head][valid[head]] = entries[:, 0]
        mask_ids[head][valid[head]] = np.where(entries[:, 1] < 0, n_masks, entries[:, 1])
    return k_blocks, mask_ids, valid


def _fmix64(z: tf.Tensor) -> tf.Tensor:
    """murmur3's 64-bit finaliser on uint64 (``ops/cuda/dropout_hash.h``)."""
    shift = tf.constant(33, tf.uint64)
    z = tf.bitwise.bitwise_xor(z, tf.bitwise.right_shift(z, shift))
    z = z * tf.constant(0xFF51AFD7ED558CCD, tf.uint64)
    z = tf.bitwise.bitwise_xor(z, tf.bitwise.right_shift(z, shift))
    z = z * tf.constant(0xC4CEB9FE1A85EC53, tf.uint64)
    return tf.bitwise.bitwise_xor(z, tf.bitwise.right_shift(z, shift))


def _dropout_keep(seed: tf.Tensor, rate: float, counter: tf.Tensor) -> tf.Tensor:
    """The op's dropout decision of entries ``counter`` (int64 ``((b*H + h)*Tq + i)*Tk + j``) → bool."""
    threshold = min(int(np.floor(float(np.float32(rate)) * 2.0**32)), 2**32 - 1)
    golden = tf.constant(_GOLDEN, tf.uint64)
    key = _fmix64(tf.bitwise.bitwise_xor(tf.bitcast(tf.cast(seed, tf.int64), tf.uint64), golden))
    bits = _fmix64(tf.bitwise.bitwise_xor(key, tf.bitcast(counter, tf.uint64) * golden))
    return tf.bitwise.right_shift(bits, tf.constant(32, tf.uint64)) >= tf.constant(threshold, tf.uint64)


def finite_part(x: tf.Tensor) -> tf.Tensor:
    """x with its NaN/±inf entries set to 0 (the operand of a product that meets masked zeros)."""
    return tf.where(tf.math.is_finite(x), x, tf.zeros_like(x))


# The masked entries of the score, probability and score-gradient matrices are exact zeros (selected, never
# multiplied), but a product with them still reads the other operand: 0 · NaN = NaN. So each product below takes
# the other operand with its non-finite entries zeroed where a masked entry could meet it, and an attended
# non-finite entry is made to propagate explicitly (as NaN), as it does in dense TF.


@tf.custom_gradient
def _scores(q: tf.Tensor, k: tf.Tensor):
    """Scores ``[B, H, c, bs, R, bs]`` of ``q [B, H, c, bs, D]`` and the gathered keys ``k [B, H, c, R, bs, D]``.
    dq and dk multiply ds by the finite parts of k and q: ds is 0 at masked scores, and an attended NaN reaches
    dq / dk through ds itself (its score, hence its row of ds, is NaN)."""

    def grad(ds):
        return (tf.einsum("bhcirj,bhcrjd->bhcid", ds, finite_part(k)),
                tf.einsum("bhcirj,bhcid->bhcrjd", ds, finite_part(q)))  # fmt: skip

    return tf.einsum("bhcid,bhcrjd->bhcirj", q, k), grad


@tf.custom_gradient
def _weighted_values(p: tf.Tensor, v: tf.Tensor, keep: tf.Tensor):
    """``o [B, H, c, bs, D] = p [B, H, c, bs, R, bs] · v [B, H, c, R, bs, D]``, p 0 where ``keep`` (its shape) is
    False. A non-finite v entry reaches only the rows that keep its key: there o (that component) and dp (the
    score of that key) are NaN; the other rows see it as 0."""
    bad = tf.logical_not(tf.math.is_finite(v))
    any_bad = tf.reduce_any(bad)
    keep_f = tf.cast(keep, p.dtype)
    o = tf.einsum("bhcirj,bhcrjd->bhcid", p, finite_part(v))
    nan = tf.constant(np.nan, p.dtype)
    o = tf.cond(any_bad,
                lambda: tf.where(tf.einsum("bhcirj,bhcrjd->bhcid", keep_f, tf.cast(bad, p.dtype)) > 0, nan, o),
                lambda: o)  # fmt: skip

    def grad(do):
        dp = tf.einsum("bhcid,bhcrjd->bhcirj", do, finite_part(v))
        bad_key = tf.reduce_any(bad, axis=-1)[:, :, :, None]  # [B, H, c, 1, R, bs]
        dp = tf.cond(any_bad, lambda: tf.where(keep & bad_key, nan, dp), lambda: dp)
        return dp, tf.einsum("bhcirj,bhcid->bhcrjd", p, do), None

    return o, grad


@tf.autograph.experimental.do_not_convert  # Python loops over static chunks only: nothing for autograph
def gather_attention(
    q: tf.Tensor,
    k: tf.Tensor,
    v: tf.Tensor,
    tables: FusedTables,
    heads: int,
    scale: float,
    key_padding_mask: tf.Tensor | None = None,
    bias: tf.Tensor | None = None,
    dropout_rate: float = 0.0,
    seed: tf.Tensor | None = None,
    return_lse: bool = False,
    kv_heads: int | None = None,
    q_segment_ids: tf.Tensor | None = None,
    k_segment_ids: tf.Tensor | None = None,
) -> tf.Tensor | tuple[tf.Tensor, tf.Tensor]:
    """``fused_attention``'s result in TensorFlow ops: ``q [B, Tq, H*D]``, ``k, v [B, Tk, KVH*D]`` → ``out [B, Tq,
    H*D]`` (``q``'s dtype) and, with ``return_lse``, ``lse [B, H, Tq]`` (float32; float64 for float64 inputs).

    Arguments as ``fused_attention``'s, already checked there: ``key_padding_mask`` bool ``[B, Tk]``; ``bias``
    ``[H|1, Tq, Tk]`` or ``[B|1, H|1, Tq, Tk]`` in ``q``'s dtype; ``seed`` int64 scalar (used if
    ``dropout_rate > 0``); ``kv_heads`` dividing ``heads`` (None = ``heads``); ``q_segment_ids [B, Tq]`` and
    ``k_segment_ids [B, Tk]`` int32 (both or neither).
    """
    kv_heads = heads if kv_heads is None else kv_heads
    acc = tf.float64 if q.dtype == tf.float64 else tf.float32
    bs, n_qb, n_kb = tables.block_size, tables.n_q_blocks, tables.n_k_blocks
    n_q, n_k = tables.n_q, tables.n_k
    batch = tf.shape(q)[0]
    width = q.shape[-1] if q.shape[-1] is not None else tf.shape(q)[-1]
    d = width // heads
    # [B, H, nb, bs, D] in the compute dtype; K/V head h // (H // KVH) at query head h
    qh, kh, vh = (tf.transpose(tf.reshape(tf.cast(x, acc), [batch, n, bs, nh, d]), [0, 3, 1, 2, 4])
                  for x, n, nh in ((q, n_qb, heads), (k, n_kb, kv_heads), (v, n_kb, kv_heads)))  # fmt: skip
    if kv_heads != heads:
        head_map = tf.constant(np.arange(heads) // (heads // kv_heads), tf.int32)
        kh, vh = tf.gather(kh, head_map, axis=1), tf.gather(vh, head_map, axis=1)
    k_blocks, mask_ids, valid = _row_lists(tables)
    r = k_blocks.shape[-1]
    masks = np.concatenate([tables.unpacked_masks(), np.ones((1, bs, bs), bool)])  # [P + 1, bs, bs]
    if bias is not None:
        bias = tf.cast(bias, acc)
        bias = bias[None] if bias.shape.rank == 3 else bias  # [B|1, H|1, Tq, Tk]
        bias = tf.reshape(bias, tf.concat([tf.shape(bias)[:2], [n_qb, bs, n_kb, bs]], 0))
        bias = tf.transpose(bias, [0, 1, 2, 4, 3, 5])  # [B|1, H|1, nQb, nKb, bs, bs]
    if key_padding_mask is not None:
        key_padding_mask = tf.reshape(key_padding_mask, [batch, 1, n_kb, bs])
    if q_segment_ids is not None:
        q_segment_ids = tf.reshape(tf.cast(q_segment_ids, tf.int32), [batch, n_qb, bs])
        k_segment_ids = tf.broadcast_to(tf.reshape(tf.cast(k_segment_ids, tf.int32), [batch, 1, n_kb, bs]),
                                        [batch, heads, n_kb, bs])  # fmt: skip
    chunk = max(1, min(n_qb, _CHUNK_ELEMS // (heads * r * bs * bs)))
    outs, lses = [], []
    for c0 in range(0, n_qb, chunk):
        rows = slice(c0, min(n_qb, c0 + chunk))
        idx = np.broadcast_to(k_blocks[:, rows], (heads,) + k_blocks[:, rows].shape[1:])  # [H, c, R]
        gather_idx = tf.broadcast_to(tf.constant(idx), tf.concat([[batch], idx.shape], 0))
        kc, vc = (tf.gather(x, gather_idx, axis=2, batch_dims=2) for x in (kh, vh))  # [B, H, c, R, bs, D]
        s = _scores(qh[:, :, rows], kc) * tf.constant(scale, acc)
        keep = np.broadcast_to(valid[:, rows, :, None, None] & masks[mask_ids[:, rows]], idx.shape + (bs, bs))
        keep = tf.constant(np.transpose(keep, [0, 1, 3, 2, 4]))[None]  # [1, H, c, bs, R, bs]
        if key_padding_mask is not None:
            kp = tf.gather(tf.broadcast_to(key_padding_mask, [batch, heads, n_kb, bs]), gather_idx, axis=2,
                           batch_dims=2)  # [B, H, c, R, bs]  # fmt: skip
            keep = keep & kp[:, :, :, None]
        if q_segment_ids is not None:
            ks = tf.gather(k_segment_ids, gather_idx, axis=2, batch_dims=2)  # [B, H, c, R, bs]
            qs = q_segment_ids[:, rows]  # [B, c, bs]
            keep = keep & tf.equal(qs[:, None, :, :, None, None], ks[:, :, :, None])
        if bias is not None:
            b_rows = bias[:, :, rows]  # [B|1, H|1, c, nKb, bs, bs]
            b_rows = tf.broadcast_to(b_rows, tf.concat([tf.shape(b_rows)[:1], [heads], tf.shape(b_rows)[2:]], 0))
            b_idx = tf.broadcast_to(tf.constant(idx), tf.concat([tf.shape(b_rows)[:1], idx.shape], 0))
            gathered = tf.gather(b_rows, b_idx, axis=3, batch_dims=3)  # [B|1, H, c, R, bs_i, bs_j]
            gathered = tf.transpose(gathered, [0, 1, 2, 4, 3, 5])
            s += gathered
            keep = keep & (gathered > tf.constant(-np.inf, acc))  # a -inf bias masks: NaN k/v there is never read
        s = tf.where(keep, s, tf.constant(-np.inf, acc))
        m = tf.stop_gradient(tf.reduce_max(s, axis=[4, 5], keepdims=True))  # softmax is invariant to it
        m = tf.where(tf.math.is_inf(m), tf.zeros_like(m), m)  # a row with no key: m = 0, p = 0
        p = tf.where(keep, tf.exp(s - m), tf.zeros_like(s))  # 0 at masked entries even when m is NaN
        total = tf.reduce_sum(p, axis=[4, 5], keepdims=True)
        has_key = total > 0
        no_key = tf.where(tf.math.is_nan(total), tf.constant(np.nan, acc), tf.constant(-np.inf, acc))
        total = tf.where(has_key, total, tf.ones_like(total))
        if return_lse:  # NaN for a row with an attended NaN score, -inf for a row without keys
            lse = tf.where(has_key, m + tf.math.log(total), no_key)
            lses.append(tf.reshape(lse, [batch, heads, -1]))
        p = p / total
        if dropout_rate > 0:
            i = (np.arange(rows.start, rows.stop)[:, None] * bs + np.arange(bs)).reshape(-1, bs)  # [c, bs]
            j = idx[..., None] * bs + np.arange(bs)  # [H, c, R, bs]
            local = (i[None, :, :, None, None] * n_k + j[:, :, None, :, :]).astype(np.int64)  # [H, c, bs, R, bs]
            head_base = (tf.range(tf.cast(batch, tf.int64))[:, None] * heads + np.arange(heads)) * (n_q * n_k)
            counter = head_base[:, :, None, None, None, None] + tf.constant(local)[None]
            kept = _dropout_keep(seed, dropout_rate, counter)
            p = tf.where(kept, p / tf.constant(1.0 - float(np.float32(dropout_rate)), acc), tf.zeros_like(p))
        o = _weighted_values(p, vc, tf.broadcast_to(keep, tf.shape(p)))  # [B, H, c, bs, D]
        outs.append(tf.reshape(tf.transpose(o, [0, 2, 3, 1, 4]), [batch, -1, heads * d]))
    out = tf.cast(tf.concat(outs, axis=1), q.dtype)
    if return_lse:
        return out, tf.concat(lses, axis=2)
    return out
