"""The fused (flash-style) block-sparse attention op, with its gradient.

``fused_attention(q, k, v, tables, heads)`` computes ``softmax(scale·q·kᵀ + bias, masked)·v`` per head over
the active blocks of ``tables`` (``bsattn.fused_tables.FusedTables``) without materialising the attention
weights: memory is O(T·D). The backward pass recomputes the probabilities from the saved log-sum-exp.

Layouts (blocksparse's): ``q [B, Tq, H*D]``, ``k, v [B, Tk, KVH*D]``, head ``h`` owns channels
``[h*D, (h+1)*D)``; ``Tq = nQb * bs``, ``Tk = nKb * bs``. With ``kv_heads = KVH < H`` (grouped-query, or
multi-query for 1) query head ``h`` reads K/V head ``h // (H // KVH)``, with no copy of K/V. Packed sequences:
``q_segment_ids [B, Tq]`` / ``k_segment_ids [B, Tk]`` restrict each query to the keys of its own segment. Computes in float32 (float64 for float64 inputs)
and returns the dtype of ``q`` (float32, float16, bfloat16 or float64).

Decoding with a KV cache (``q_offset=p``, forward only): ``q`` holds ``Tq`` new queries at positions ``[p, p + Tq)``
against the cache ``k, v``; only the table rows of those queries and the keys written so far (``< p + Tq``) are read.

sparse_attention's ``'strided'`` without transposes (``strided_period=L``): the tables address the permuted
positions of ``strided_transpose`` while every tensor stays in token order; the op reads each block as one residue
class (rows ``L`` apart).

Under XLA (``tf.function(jit_compile=True)``, Keras's ``jit_compile``), where custom ops cannot compile, the same
computation runs in TensorFlow ops instead (``bsattn.gather_attention``: same tables, same dropout hash).
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import numpy as np
import tensorflow as tf

from bsattn import _checks as checks
from bsattn import patterns
from bsattn._loader import load_ops
from bsattn._table_constants import host_scalar, int32_table, table_constants
from bsattn.fused_tables import FusedTables
from bsattn.gather_attention import gather_attention, in_xla_context


class FusedTableTensors(NamedTuple):
    """The int32 tensors of one ``FusedTables``."""

    row_ptr: tf.Tensor  # [L, nQb + 1]
    row_entries: tf.Tensor  # [E, 2]
    col_ptr: tf.Tensor  # [L, nKb + 1]
    col_entries: tf.Tensor  # [E, 2]
    masks: tf.Tensor  # [P, bs, ceil(bs/32)]


def fused_table_tensors(tables: FusedTables) -> FusedTableTensors:
    """The int32 tensors of ``tables`` (cached while eager)."""
    names = ("row_ptr", "row_entries", "col_ptr", "col_entries", "masks")
    return table_constants(tables, lambda: FusedTableTensors(*(int32_table(getattr(tables, n), n) for n in names)))


def fused_scale(head_dim: int, scale: float | None = None) -> float:
    """The softmax scale the op uses: ``scale`` (default ``1/sqrt(head_dim)``) rounded to float32 (an op attr)."""
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, numbers.Real)):
        raise TypeError(f"scale must be a finite real number or None, got {scale!r}")
    value = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
    if not math.isfinite(value):
        raise ValueError(f"scale must be finite, got {scale!r}")
    return float(np.float32(value))


def fused_attention(
    q: tf.Tensor,
    k: tf.Tensor,
    v: tf.Tensor,
    tables: FusedTables,
    heads: int,
    scale: float | None = None,
    key_padding_mask: tf.Tensor | None = None,
    bias: tf.Tensor | None = None,
    dropout_rate: float = 0.0,
    seed: int | tf.Tensor | None = None,
    return_lse: bool = False,
    kv_heads: int | None = None,
    q_segment_ids: tf.Tensor | None = None,
    k_segment_ids: tf.Tensor | None = None,
    q_offset: int | tf.Tensor | None = None,
    strided_period: int = 0,
    head_major: bool = False,
) -> tf.Tensor | tuple[tf.Tensor, tf.Tensor]:
    """Block-sparse attention in one op: ``[B, Tq, H*D], [B, Tk, KVH*D] x2 -> [B, Tq, H*D]``.

    Args:
      q: ``[B, Tq, H*D]``; ``Tq = tables.n_q``.
      k, v: ``[B, Tk, KVH*D]``, the dtype of ``q``; ``Tk = tables.n_k``; ``KVH = kv_heads``.
      tables: the active blocks and in-block masks (``fused_tables_for_pattern`` / ``_for_layout`` /
        ``from_block_tables``); ``tables.lut_heads`` must be 1 or ``heads``.
      heads: number of heads ``H``.
      scale: multiplies ``q·kᵀ``; default ``1/sqrt(D)``; used as float32.
      key_padding_mask: ``[B, Tk]``, True (nonzero) = a real key, False = padding, never attended.
      bias: ``[B or 1, H or 1, Tq, Tk]`` (or ``[H or 1, Tq, Tk]``, the same as ``[1, H or 1, Tq, Tk]``) added
        to the scaled scores (e.g. a relative-position bias or a per-example mask as 0 / -inf), broadcast over
        the batch and/or the heads where its dimension is 1, cast to ``q``'s dtype; read only inside the active
        blocks; differentiable (its gradient has its shape: summed over the dimensions it broadcasts over, 0
        outside the active blocks).
      dropout_rate: attention dropout in ``[0, 1)``: each probability is dropped by a counter-based hash of
        ``(seed, b, h, i, j)`` and the kept ones are scaled by ``1 / (1 - rate)``; the backward pass uses the
        same mask. Row sums (and ``lse``) are those before dropout.
      seed: int64 scalar (a tensor does not retrace); None draws one per call (then pass an explicit seed
        if the forward is recomputed, e.g. under ``recompute=True``).
      return_lse: also return the log-sum-exp ``[B, H, Tq]`` (float32; float64 for float64 inputs), -inf for
        a query with no kept key (whose output is 0); differentiable.
      kv_heads: K/V heads ``KVH`` dividing ``heads`` (grouped-query attention; 1 = multi-query); None = ``heads``.
        Query head ``h`` reads K/V head ``h // (heads // KVH)``; the gradients of ``k`` and ``v`` sum over each
        K/V head's group of query heads (deterministic).
      q_segment_ids, k_segment_ids: int ``[B, Tq]`` and ``[B, Tk]`` (both or neither): packed sequences; query
        ``i`` attends key ``j`` only if their ids are equal (on top of the tables, masks and bias). Blocks whose
        segments cannot meet are skipped per batch entry; a query with no key of its segment gives 0.
      q_offset: KV-cache decoding (forward only): an int or an int32 scalar tensor ``p`` (pass a tensor in a
        ``tf.function``: no retracing per step). ``q [B, Tq, H*D]`` then holds the queries at absolute positions
        ``[p, p + Tq)`` (any ``Tq``), ``tables`` are those of the whole ``(pattern, T_max)`` (``tables.n_q = T_max``)
        and ``k, v [B, tables.n_k, KVH*D]`` the cache, written up to ``p + Tq`` (``0 <= p``, ``p + Tq <= T_max``,
        ``p + Tq <= tables.n_k``). Only the table rows covering ``[p, p + Tq)`` are visited and keys ``>= p + Tq``
        are never read (garbage in the unwritten cache reaches no output); the rows equal the same rows of the
        full op for patterns where no query sees a later key. ``bias [B|1, H|1, Tq, Tk]`` and ``q_segment_ids
        [B, Tq]`` are those of the new rows; dropout uses the absolute rows. Its gradient raises an error.
      strided_period: ``L >= 0``; 0 = none. ``L > 0`` (self-attention, ``T = tables.n_q = tables.n_k``, ``T % L == 0``,
        ``(T / L) % tables.block_size == 0``; no ``bias``, no ``q_offset``): ``tables`` address the permuted positions
        ``p`` of ``patterns.strided_permutation(T, L)`` (``patterns.Strided(L)``'s coordinates), position ``p`` being
        token ``(p % (T/L)) * L + p // (T/L)``, while ``q, k, v``, the output, ``lse``, ``key_padding_mask`` and the
        segment ids are all in token order; the dropout hash uses ``p``. The result equals, bit for bit, permuting
        the inputs, running the op with ``strided_period=0`` and un-permuting the outputs, without the copies.
      head_major: ``q [B, H, Tq, D]``, ``k, v [B, KVH, Tk, D]`` and the output ``[B, H, Tq, D]`` (the
        ``[batch, heads, n, dim_head]`` layout of memory-efficient attention) instead of the shapes above; every
        other argument is unchanged. The op reads each head's rows in place: bit for bit the result of
        transposing to the default layout and back, without the copies (the XLA fallback makes them).
    Returns:
      ``out`` or ``(out, lse)``.
    """
    q = checks.float_tensor("q", q)
    k = checks.float_tensor("k", k, q.dtype)
    v = checks.float_tensor("v", v, q.dtype)
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k and v must share one dtype, got {q.dtype.name}, {k.dtype.name}, {v.dtype.name}")
    if q.dtype not in (tf.float32, tf.float16, tf.bfloat16, tf.float64):
        raise TypeError(f"q must be float32, float16, bfloat16 or float64, got {q.dtype.name}")
    checks.instance("tables", tables, FusedTables)
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse must be a bool, got {return_lse!r}")
    heads = checks.positive_int("heads", heads)
    kv_heads = heads if kv_heads is None else checks.positive_int("kv_heads", kv_heads)
    if heads % kv_heads:
        raise ValueError(f"kv_heads={kv_heads} must divide heads={heads}")
    if tables.lut_heads not in (1, heads):
        raise ValueError(f"tables have {tables.lut_heads} layout heads; with heads={heads} they need 1 or {heads}")
    if not isinstance(head_major, bool):
        raise TypeError(f"head_major must be a bool, got {head_major!r}")
    decode = q_offset is not None
    n_q = _decode_rows(q, q_offset, tables, head_major) if decode else tables.n_q  # the rows of q
    width = _check_activations(q, k, v, tables, heads, kv_heads, n_q, head_major)
    if scale is None and width is None:
        raise ValueError("the default scale 1/sqrt(D) needs a static width of q; pass scale")
    scale = fused_scale(width // heads if width else 1, scale)
    if isinstance(dropout_rate, bool) or not isinstance(dropout_rate, numbers.Real):
        raise TypeError(f"dropout_rate must be a real number in [0, 1), got {dropout_rate!r}")
    dropout_rate = float(dropout_rate)
    if not 0.0 <= dropout_rate < 1.0:
        raise ValueError(f"dropout_rate must be in [0, 1), got {dropout_rate}")

    if key_padding_mask is not None:
        try:
            key_padding_mask = tf.convert_to_tensor(key_padding_mask)
        except (TypeError, ValueError) as e:
            raise TypeError(f"key_padding_mask must be a [batch, Tk] bool tensor, got {key_padding_mask!r}: {e}") from None
        if key_padding_mask.dtype != tf.bool:
            key_padding_mask = tf.not_equal(key_padding_mask, tf.zeros([], key_padding_mask.dtype))
        _check_static_shape(key_padding_mask, "key_padding_mask", [q.shape[0], tables.n_k])
    if bias is not None:
        bias = _bias4(tf.cast(bias, q.dtype), q.shape[0] if q.shape.rank else None, heads, tables, n_q)
    q_segment_ids, k_segment_ids = _segment_ids(q_segment_ids, k_segment_ids, q.shape[0] if q.shape.rank else None,
                                                tables, n_q)
    if seed is None:
        with tf.device("/CPU:0"):  # the op reads the seed in host memory
            seed = tf.random.uniform([], 0, 2**62, dtype=tf.int64) if dropout_rate > 0 else tf.constant(0, tf.int64)
    if not tf.is_tensor(seed) and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral)):
        raise TypeError(f"seed must be an integer, an int scalar tensor or None, got {seed!r}")
    seed = host_scalar(seed, tf.int64)

    q_offset = host_scalar(q_offset if decode else 0, tf.int32)
    strided_period = _check_strided_period(strided_period, tables, decode, bias is not None)

    if in_xla_context() and decode:
        raise NotImplementedError(
            "fused_attention(q_offset=...) (decoding) runs the custom op, which does not compile under XLA; "
            "call it outside jit_compile"
        )
    if in_xla_context():  # custom ops do not compile under XLA: the same attention in TensorFlow ops
        return _xla_attention(q, k, v, tables, heads, scale, key_padding_mask, bias, dropout_rate, seed, return_lse,
                              kv_heads, q_segment_ids, k_segment_ids, strided_period, head_major)
    raw = load_ops()
    luts = fused_table_tensors(tables)
    has_segments = q_segment_ids is not None
    if not has_segments:
        q_segment_ids = k_segment_ids = tf.zeros([0, 0], tf.int32)
    attrs = {
        "heads": heads,
        "kv_heads": kv_heads,
        "has_segment_ids": has_segments,
        "block_size": tables.block_size,
        "scale": scale,
        "dropout_rate": dropout_rate,
        "has_key_padding_mask": key_padding_mask is not None,
        "has_bias": bias is not None,
        "strided_period": strided_period,
        "head_major": head_major,
    }
    lse_dtype = tf.float64 if q.dtype == tf.float64 else tf.float32
    padding = key_padding_mask if key_padding_mask is not None else tf.zeros([0, 0], tf.bool)

    @tf.custom_gradient
    def forward(*inputs):
        q, k, v = inputs[:3]
        bias_t = inputs[3] if len(inputs) == 4 else tf.zeros([0, 0, 0, 0], q.dtype)
        out, lse = raw.bsattn_fused_attention(
            q, k, v, luts.row_ptr, luts.row_entries, luts.masks, padding, bias_t, q_segment_ids, k_segment_ids,
            seed, q_offset, Tlse=lse_dtype, decode=decode, **attrs,
        )

        def grad(dout, dlse=None):
            if decode:
                raise NotImplementedError(
                    "decoding (q_offset) is forward-only; differentiate the full op (fused_attention without "
                    "q_offset) instead"
                )
            has_dlse = dlse is not None
            dq, dk, dv, dbias = raw.bsattn_fused_attention_grad(
                q, k, v, out, lse, dout, dlse if has_dlse else tf.zeros([0, 0, 0], lse.dtype),
                luts.row_ptr, luts.row_entries, luts.col_ptr, luts.col_entries, luts.masks,
                padding, bias_t, q_segment_ids, k_segment_ids, seed, has_dlse=has_dlse, **attrs,
            )  # fmt: skip
            return (dq, dk, dv) + ((dbias,) if len(inputs) == 4 else ())

        if return_lse:
            return (out, lse), grad
        return out, grad

    inputs = (q, k, v) if bias is None else (q, k, v, bias)
    return forward(*inputs)


def _xla_attention(q, k, v, tables, heads, scale, key_padding_mask, bias, dropout_rate, seed, return_lse, kv_heads,
                   q_segment_ids, k_segment_ids, strided_period, head_major):
    """``fused_attention`` under XLA: the TensorFlow-ops fallback (``gather_attention``) in the default layout
    (head-major tensors transposed there and back), in permuted order for ``strided_period``."""
    if head_major:
        q, k, v = (_token_major(x) for x in (q, k, v))
    if strided_period:
        result = _strided_gather_attention(q, k, v, tables, heads, scale, key_padding_mask, dropout_rate, seed,
                                           return_lse, kv_heads, q_segment_ids, k_segment_ids, strided_period)
    else:
        result = gather_attention(q, k, v, tables, heads, scale, key_padding_mask, bias, dropout_rate, seed,
                                  return_lse, kv_heads=kv_heads, q_segment_ids=q_segment_ids,
                                  k_segment_ids=k_segment_ids)
    if not head_major:
        return result
    if return_lse:
        return _head_major(result[0], heads), result[1]
    return _head_major(result, heads)


def _token_major(x: tf.Tensor) -> tf.Tensor:
    """``[B, H, T, D] -> [B, T, H*D]``."""
    shape = tf.shape(x)
    return tf.reshape(tf.transpose(x, [0, 2, 1, 3]), [shape[0], shape[2], shape[1] * shape[3]])


def _head_major(x: tf.Tensor, heads: int) -> tf.Tensor:
    """``[B, T, H*D] -> [B, H, T, D]``."""
    shape = tf.shape(x)
    return tf.transpose(tf.reshape(x, [shape[0], shape[1], heads, shape[2] // heads]), [0, 2, 1, 3])


def _check_strided_period(period: object, tables: FusedTables, decode: bool, has_bias: bool) -> int:
    """``strided_period`` as an int after the checks of ``fused_attention``'s docstring; errors name it."""
    if isinstance(period, bool) or not isinstance(period, numbers.Integral):
        raise TypeError(f"strided_period must be a non-negative int, got {period!r}")
    period = int(period)
    if period < 0:
        raise ValueError(f"strided_period must be >= 0, got {period}")
    if period == 0:
        return 0
    if decode:
        raise ValueError("strided_period must be 0 with q_offset (decoding): decode 'strided' by its residue class")
    if has_bias:
        raise ValueError("strided_period must be 0 with a bias (the strided mode takes no bias)")
    n, bs = tables.n_q, tables.block_size
    if tables.n_k != n:
        raise ValueError(f"strided_period needs self-attention tables (n_q == n_k), got n_q={n}, n_k={tables.n_k}")
    if n % period or (n // period) % bs:
        raise ValueError(
            f"strided_period={period}: T={n} must be a multiple of it and T / strided_period a multiple of "
            f"block_size={bs}"
        )
    return period


def _strided_gather_attention(q, k, v, tables, heads, scale, key_padding_mask, dropout_rate, seed, return_lse,
                              kv_heads, q_segment_ids, k_segment_ids, period):
    """``fused_attention(strided_period=period)`` under XLA: the TensorFlow-ops fallback on permuted q, k, v
    (and padding, ids), its outputs gathered back to token order."""
    perm = patterns.strided_permutation(tables.n_q, period)
    inverse = np.argsort(perm).astype(np.int32)
    perm = perm.astype(np.int32)

    def permuted(x):
        return None if x is None else tf.gather(x, perm, axis=1)

    result = gather_attention(permuted(q), permuted(k), permuted(v), tables, heads, scale, permuted(key_padding_mask),
                              None, dropout_rate, seed, return_lse, kv_heads=kv_heads,
                              q_segment_ids=permuted(q_segment_ids), k_segment_ids=permuted(k_segment_ids))
    if return_lse:
        out, lse = result
        return tf.gather(out, inverse, axis=1), tf.gather(lse, inverse, axis=2)
    return tf.gather(result, inverse, axis=1)


def _bias4(bias: tf.Tensor, batch: int | None, heads: int, tables: FusedTables, n_q: int | None) -> tf.Tensor:
    """``bias`` as the op's ``[B or 1, H or 1, Tq, Tk]`` (a rank-3 ``[H or 1, Tq, Tk]`` gains a batch dimension of
    1; ``Tq = n_q``, the rows of q); ValueError naming ``bias`` for any other static shape."""
    size = f"{'Tq' if n_q is None else n_q}, {tables.n_k}"
    expected = f"[1 or {batch or 'batch'}, 1 or {heads}, {size}] (or [1 or {heads}, {size}])"
    given = bias.shape
    if given.rank is None:
        return bias  # the op's shape function and kernel check it
    if given.rank not in (3, 4):
        raise ValueError(f"bias must have shape {expected}, got {given}")
    bias = bias[None] if given.rank == 3 else bias
    b, h, tq, tk = bias.shape.as_list()
    if (
        (b is not None and b != 1 and batch is not None and b != batch)
        or (h is not None and h not in (1, heads))
        or (tq is not None and n_q is not None and tq != n_q)
        or (tk is not None and tk != tables.n_k)
    ):
        raise ValueError(f"bias must have shape {expected}, got {given}")
    return bias


def _segment_ids(
    q_ids: tf.Tensor | None, k_ids: tf.Tensor | None, batch: int | None, tables: FusedTables, n_q: int | None
) -> tuple[tf.Tensor | None, tf.Tensor | None]:
    """``(q_segment_ids [B, Tq], k_segment_ids [B, Tk])`` as int32 tensors (or both None; ``Tq = n_q``, the rows
    of q); ValueError/TypeError naming the argument for one without the other, a non-integer dtype or a wrong
    static shape."""
    if (q_ids is None) != (k_ids is None):
        given, missing = ("q_segment_ids", "k_segment_ids") if k_ids is None else ("k_segment_ids", "q_segment_ids")
        raise ValueError(f"{given} was given without {missing}: pass both or neither")
    if q_ids is None:
        return None, None
    out = []
    for name, ids, n in (("q_segment_ids", q_ids, n_q), ("k_segment_ids", k_ids, tables.n_k)):
        try:
            ids = tf.convert_to_tensor(ids)
        except (TypeError, ValueError) as e:
            raise TypeError(f"{name} must be an integer [batch, {n}] tensor, got {ids!r}: {e}") from None
        if not ids.dtype.is_integer:
            raise TypeError(f"{name} must be an integer [batch, {n}] tensor, got dtype {ids.dtype.name}")
        _check_static_shape(ids, name, [batch, n])
        out.append(_ids_as_int32(ids, name))
    return out[0], out[1]


def _ids_as_int32(ids: tf.Tensor, name: str) -> tf.Tensor:
    """``ids`` as int32; ids of a wider or unsigned dtype are checked to fit first (a wrapped id could make two
    segments equal), an InvalidArgumentError naming the argument otherwise."""
    if ids.dtype in (tf.int8, tf.int16, tf.int32, tf.uint8, tf.uint16):
        return tf.cast(ids, tf.int32)
    low, high = np.iinfo(np.int32).min, np.iinfo(np.int32).max
    # Compared in float64 would round; compare in the ids' own dtype, with the bounds clipped to it.
    lowest = tf.constant(max(low, ids.dtype.min), ids.dtype)
    highest = tf.constant(min(high, ids.dtype.max), ids.dtype)
    in_range = tf.reduce_all((ids >= lowest) & (ids <= highest))
    message = f"{name} must fit in int32 ([{low}, {high}]): a wrapped id would merge segments"
    with tf.control_dependencies([tf.debugging.Assert(in_range, [message])]):
        return tf.cast(ids, tf.int32)


def _decode_rows(q: tf.Tensor, q_offset: object, tables: FusedTables, head_major: bool) -> int | None:
    """Checks of a decoding call's ``q_offset`` (an int, or an integer scalar tensor checked by the op) → the
    static number of rows of ``q`` (None if unknown)."""
    if tf.is_tensor(q_offset):
        if not q_offset.dtype.is_integer:
            raise TypeError(f"q_offset must be an int or an integer scalar tensor, got dtype {q_offset.dtype.name}")
        if q_offset.shape.rank not in (None, 0):
            raise ValueError(f"q_offset must be a scalar, got shape {q_offset.shape}")
        offset = None
    elif isinstance(q_offset, bool) or not isinstance(q_offset, numbers.Integral):
        raise TypeError(f"q_offset must be an int or an integer scalar tensor, got {q_offset!r}")
    else:
        offset = int(q_offset)
        if not 0 <= offset < 2**31:
            raise ValueError(f"q_offset must be in [0, 2**31), got {offset}")
    time_axis, rank = (2, 4) if head_major else (1, 3)
    n_q = q.shape[time_axis] if q.shape.rank == rank else None
    if offset is not None and n_q is not None:
        for what, limit in (("the tables' query length T_max", tables.n_q), ("the cache length (tables.n_k)", tables.n_k)):
            if offset + n_q > limit:
                raise ValueError(f"q_offset + Tq = {offset} + {n_q} must be <= {what} = {limit}")
    return n_q


def _check_activations(
    q: tf.Tensor, k: tf.Tensor, v: tf.Tensor, tables: FusedTables, heads: int, kv_heads: int, n_q: int | None,
    head_major: bool,
) -> int | None:
    """Static checks of ``q [B, Tq, H*D]`` (``Tq = n_q``; None = any), ``k, v [B, Tk, KVH*D]`` (``head_major``:
    ``[B, H, Tq, D]``, ``[B, KVH, Tk, D]``) → the width ``H*D`` if known."""
    if head_major:
        return _check_head_major(q, k, v, tables, heads, kv_heads, n_q)
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.shape.rank is not None and x.shape.rank != 3:
            raise ValueError(f"{name} must be [batch, time, heads*head_dim], got shape {x.shape}")
    _check_static_shape(q, "q", [None, n_q, None])
    width = q.shape[-1] if q.shape.rank else None
    if width is not None and width % heads:
        raise ValueError(f"q width {width} is not divisible by heads {heads}")
    kv_width = width // heads * kv_heads if width is not None else None
    if k.shape.rank and k.shape[-1] is not None and kv_width is not None and k.shape[-1] != kv_width:
        batch = "?" if not q.shape.rank or q.shape[0] is None else q.shape[0]
        raise ValueError(
            f"k must have shape [{batch}, {tables.n_k}, {kv_width}] (width kv_heads * head_dim = {kv_heads} * "
            f"{width // heads}), got shape {k.shape}"
        )
    _check_static_shape(k, "k", [q.shape[0] if q.shape.rank else None, tables.n_k, kv_width])
    _check_static_shape(v, "v", k.shape.as_list() if k.shape.rank else [None, tables.n_k, None])
    if width == 0:
        raise ValueError("q width must be positive (heads * head_dim)")
    return width


def _check_head_major(
    q: tf.Tensor, k: tf.Tensor, v: tf.Tensor, tables: FusedTables, heads: int, kv_heads: int, n_q: int | None
) -> int | None:
    """``_check_activations`` of ``head_major``: ``q [B, H, Tq, D]``, ``k, v [B, KVH, Tk, D]`` → ``H*D`` if known."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.shape.rank is not None and x.shape.rank != 4:
            raise ValueError(f"{name} must be [batch, heads, time, head_dim] (head_major), got shape {x.shape}")
    _check_static_shape(q, "q", [None, heads, n_q, None])
    head_dim = q.shape[-1] if q.shape.rank else None
    _check_static_shape(k, "k", [q.shape[0] if q.shape.rank else None, kv_heads, tables.n_k, head_dim])
    _check_static_shape(v, "v", k.shape.as_list() if k.shape.rank else [None, kv_heads, tables.n_k, head_dim])
    if head_dim == 0:
        raise ValueError("q head_dim must be positive")
    return None if head_dim is None else heads * head_dim


def _check_static_shape(x: tf.Tensor, name: str, expected: list) -> None:
    """ValueError if a known dimension of ``x`` differs from a known one of ``expected`` (None = any)."""
    if x.shape.rank is None:
        return
    ok = x.shape.rank == len(expected) and all(
        e is None or d is None or d == e for d, e in zip(x.shape.as_list(), expected)
    )
    if not ok:
        shown = ", ".join("?" if e is None else str(e) for e in expected)
        raise ValueError(f"{name} must have shape [{shown}], got {x.shape}")
