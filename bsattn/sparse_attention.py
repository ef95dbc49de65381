"""OpenAI ``sparse_attention``'s functions (``attention.py`` and ``utils.py``), in TensorFlow 2.

A user of the originals changes only the import::

    from bsattn.sparse_attention import attention_impl, blocksparse_attention_impl

Differences from the originals, all documented in the README:
- ``recompute`` defaults to False instead of being required;
- ``'fixed'`` works without ``num_verts``/``vertsize`` (defaults 1 and 1: one summary block per
  stride, shared by all heads), and ``get_attn_mask``/``attention_impl`` support it too;
- a fully masked row gives 0 (none occurs in the four modes);
- ``blocksparse_attention_impl`` runs the fused flash-style op by default (``engine='unfused'`` for the
  original three-op path).
"""

from __future__ import annotations

import functools
import math

import numpy as np
import tensorflow as tf

from bsattn import _checks as checks
from bsattn import patterns
from bsattn.fused_attention import fused_attention
from bsattn.fused_tables import fused_tables_for_pattern
from bsattn.gather_attention import in_xla_context
from bsattn.recompute import recomputable
from bsattn.tables import BLOCK_SIZES, tables_for_pattern
from bsattn.transformer import BlocksparseTransformer


def shape_list(x: tf.Tensor) -> list:
    """Static dims where known, else the dynamic ``tf.shape`` scalars."""
    static = x.shape.as_list()
    dynamic = tf.shape(x)
    return [dynamic[i] if dim is None else dim for i, dim in enumerate(static)]


def split_states(x: tf.Tensor, n: int) -> tf.Tensor:
    """``[..., m] -> [..., n, m // n]``."""
    *start, m = shape_list(x)
    return tf.reshape(x, start + [n, m // n])


def merge_states(x: tf.Tensor) -> tf.Tensor:
    """``[..., h, d] -> [..., h * d]``."""
    *start, h, d = shape_list(x)
    return tf.reshape(x, start + [h * d])


def split_heads(x: tf.Tensor, n: int) -> tf.Tensor:
    """``[B, T, H*D] -> [B, H, T, D]``."""
    return tf.transpose(split_states(x, n), [0, 2, 1, 3])


def merge_heads(x: tf.Tensor) -> tf.Tensor:
    """``[B, H, T, D] -> [B, T, H*D]``."""
    return merge_states(tf.transpose(x, [0, 2, 1, 3]))


def _check_attention_args(
    q, k, v, heads: int, attn_mode: str, local_attn_ctx, blocksize: int = 32, kv_heads: int | None = None
) -> tuple:
    """Argument checks shared by ``attention_impl`` and ``blocksparse_attention_impl`` (before any reshape)
    → ``(q, k, v)`` as tensors."""
    q = checks.float_tensor("q", q)
    k = checks.float_tensor("k", k, q.dtype)
    v = checks.float_tensor("v", v, q.dtype)
    checks.positive_int("heads", heads)
    kv_heads = heads if kv_heads is None else checks.positive_int("kv_heads", kv_heads)
    if heads % kv_heads:
        raise ValueError(f"kv_heads={kv_heads} must divide heads={heads}")
    q_width = q.shape[-1] if q.shape.rank else None
    checks.choice("attn_mode", attn_mode, patterns.ATTN_MODES)
    checks.choice("blocksize", blocksize, BLOCK_SIZES)
    if attn_mode != "all":
        if local_attn_ctx is None:
            raise ValueError(f"attn_mode={attn_mode!r} needs local_attn_ctx (a positive integer), got None")
        checks.positive_int("local_attn_ctx", local_attn_ctx)
    for name, x, n_heads in (("q", q, heads), ("k", k, kv_heads), ("v", v, kv_heads)):
        if x.shape.rank is not None and x.shape.rank != 3:
            raise ValueError(f"{name} must be [batch, time, heads*head_dim], got shape {x.shape}")
        width = x.shape[-1] if x.shape.rank else None
        if width is not None and width % n_heads:
            raise ValueError(f"{name} width {width} is not divisible by heads {n_heads}")
        grouped_width = None if q_width is None or q_width % heads else q_width // heads * kv_heads
        if name != "q" and None not in (width, grouped_width) and width != grouped_width:
            raise ValueError(f"{name} width {width} must be kv_heads * head_dim = {kv_heads} * {q_width // heads}")
        if x.shape.rank and q.shape.rank and None not in (x.shape[1], q.shape[1]) and x.shape[1] != q.shape[1]:
            raise ValueError(f"{name} has length {x.shape[1]} but q has {q.shape[1]}: q, k and v must have one length")
        if x.dtype != q.dtype:
            raise TypeError(f"q, k and v must share one dtype, got q: {q.dtype.name}, {name}: {x.dtype.name}")
    return q, k, v


def _repeat_kv_heads(x: tf.Tensor, kv_heads: int, heads: int) -> tf.Tensor:
    """``[B, T, KVH*D]`` → ``[B, T, H*D]`` with K/V head ``h // (H // KVH)`` at head ``h``."""
    n, t, width = shape_list(x)
    x = tf.reshape(x, [n, t, kv_heads, 1, width // kv_heads])
    return tf.reshape(tf.repeat(x, heads // kv_heads, axis=3), [n, t, heads * (width // kv_heads)])


def strided_transpose(x: tf.Tensor, n_ctx: int, local_attn_ctx: int, blocksize: int) -> tf.Tensor:
    """Groups tokens by residue modulo ``local_attn_ctx``: ``[B, T, C] -> [B, T, C]``.

    Token ``t = a*L + b`` moves to position ``b*(T/L) + a``, so each residue class becomes one
    contiguous chunk of ``T/L`` tokens, which must be a multiple of ``blocksize``.
    """
    bt_ctx = _check_strided_sizes(n_ctx, local_attn_ctx, blocksize)
    n, t, embd = shape_list(x)
    x = tf.reshape(x, [n, bt_ctx, local_attn_ctx, embd])
    return tf.reshape(tf.transpose(x, [0, 2, 1, 3]), [n, t, embd])


def _check_strided_sizes(n_ctx: int, local_attn_ctx: int, blocksize: int) -> int:
    """'strided''s size checks → ``n_ctx / local_attn_ctx`` (tokens per residue class)."""
    if n_ctx % local_attn_ctx:
        raise ValueError(f"n_ctx={n_ctx} must be a multiple of local_attn_ctx={local_attn_ctx}")
    bt_ctx = n_ctx // local_attn_ctx
    if bt_ctx % blocksize:
        raise ValueError(f"n_ctx / local_attn_ctx = {bt_ctx} must be a multiple of blocksize={blocksize}")
    return bt_ctx


def _strided_untranspose(x: tf.Tensor, n_ctx: int, local_attn_ctx: int) -> tf.Tensor:
    """Inverse of ``strided_transpose``."""
    n, t, embd = shape_list(x)
    x = tf.reshape(x, [n, local_attn_ctx, n_ctx // local_attn_ctx, embd])
    return tf.reshape(tf.transpose(x, [0, 2, 1, 3]), [n, t, embd])


def get_attn_mask(
    n: int,
    attn_mode: str,
    local_attn_ctx: int | None = None,
    *,
    blocksize: int = 32,
    num_verts: int | None = None,
    vertsize: int | None = None,
    heads: int = 1,
) -> tf.Tensor:
    """The dense 0/1 float32 mask of a mode: ``[1, 1, n, n]`` (``[1, heads, n, n]`` for per-head ``fixed``).

    ``'all'``, ``'local'`` and ``'strided'`` are sparse_attention's masks; ``'fixed'`` (which the
    original lacks) is the exact token mask of its block layout and callbacks, and depends on
    ``blocksize`` because the summary width is ``vertsize * blocksize``.
    """
    if attn_mode == "fixed":
        pattern = patterns.mode_pattern(
            "fixed", n, heads, local_attn_ctx, blocksize=blocksize, num_verts=num_verts, vertsize=vertsize
        )
        mask = pattern.token_mask(n, n)
    else:
        mask = patterns.dense_attn_mask(n, attn_mode, local_attn_ctx)
    mask = np.asarray(mask, np.float32).reshape((1, -1, n, n))
    return tf.constant(mask)


@recomputable("attention_impl")
def attention_impl(
    q: tf.Tensor,
    k: tf.Tensor,
    v: tf.Tensor,
    heads: int,
    attn_mode: str,
    local_attn_ctx: int | None = None,
    *,
    blocksize: int = 32,
    num_verts: int | None = None,
    vertsize: int | None = None,
) -> tf.Tensor:
    """Dense masked attention, the TensorFlow baseline: ``[B, T, H*D] x3 -> [B, T, H*D]``.

    Scores are scaled by ``1/sqrt(D)``, masked entries replaced by ``-1e9``, and the softmax runs
    in float32 for float16/bfloat16 inputs. ``blocksize``/``num_verts``/``vertsize`` only matter for
    ``'fixed'``.
    """
    q, k, v = _check_attention_args(q, k, v, heads, attn_mode, local_attn_ctx, blocksize)
    q, k, v = split_heads(q, heads), split_heads(k, heads), split_heads(v, heads)
    n_k = shape_list(k)[2]
    mask = get_attn_mask(
        n_k, attn_mode, local_attn_ctx, blocksize=blocksize, num_verts=num_verts, vertsize=vertsize, heads=heads
    )
    w = tf.matmul(q, k, transpose_b=True)
    scale = 1.0 / math.sqrt(shape_list(v)[-1])
    w = tf.cast(w, tf.float32) * scale
    w = w * mask + -1e9 * (1.0 - mask)
    w = tf.cast(tf.nn.softmax(w), q.dtype)
    return merge_heads(tf.matmul(w, v))


@functools.lru_cache(maxsize=64)
def get_blocksparse_obj(
    n_ctx: int,
    n_heads: int,
    attn_mode: str,
    blocksize: int = 32,
    local_attn_ctx: int | None = None,
    num_verts: int | None = 4,
    vertsize: int | None = 1,
) -> BlocksparseTransformer:
    """The ``BlocksparseTransformer`` of a mode, as sparse_attention builds it (cached).

    Layouts and in-block masks are exactly those of sparse_attention's ``get_blocksparse_obj``
    and ``get_callback``; ``'strided'`` is in the coordinates of ``strided_transpose``.
    """
    pattern = patterns.mode_pattern(
        attn_mode, n_ctx, n_heads, local_attn_ctx, blocksize=blocksize, num_verts=num_verts, vertsize=vertsize
    )
    tables = tables_for_pattern(pattern, n_ctx, n_ctx, blocksize, n_heads)
    layout = pattern.block_layout(n_ctx, n_ctx, blocksize)
    return BlocksparseTransformer(layout, block_size=blocksize, heads=n_heads, _tables=tables)


@recomputable("blocksparse_attention_impl")
def blocksparse_attention_impl(
    q: tf.Tensor,
    k: tf.Tensor,
    v: tf.Tensor,
    heads: int,
    attn_mode: str,
    local_attn_ctx: int | None = None,
    blocksize: int = 32,
    num_verts: int | None = None,
    vertsize: int | None = None,
    *,
    engine: str = "fused",
    kv_heads: int | None = None,
    context_parallel: tf.distribute.Strategy | None = None,
) -> tf.Tensor:
    """Block-sparse attention of a mode: ``q [B, T, H*D]``, ``k, v [B, T, KVH*D]`` -> ``[B, T, H*D]``.

    ``'all'`` is causal attention, ``'local'`` attends the last ``local_attn_ctx`` tokens,
    ``'strided'`` every ``local_attn_ctx``-th earlier token (the fused op reads the permuted order of
    ``strided_transpose`` in place, ``fused_attention(strided_period=local_attn_ctx)``; the unfused engine and the
    XLA fallback transpose q, k, v and the output),
    ``'fixed'`` the same stride-chunk plus the last ``vertsize*blocksize`` tokens of every chunk
    (per head group when ``num_verts > 1``). Scale ``1/sqrt(D)``.

    ``engine='fused'`` (default) runs one flash-style op (``bsattn.fused_attention``: no attention
    weights in memory); ``'unfused'`` runs sparse_attention's three ops (nt → masked softmax → nn) of
    ``get_blocksparse_obj``. Both give the same result up to rounding. Under XLA (``jit_compile=True``) both run
    the fused op's TensorFlow-ops fallback (``bsattn.gather_attention``), custom ops not compiling there.

    ``kv_heads`` (None = ``heads``) dividing ``heads``: grouped-query (1: multi-query) attention, query head ``h``
    reading K/V head ``h // (heads // kv_heads)``. The fused engine reads the shared K/V heads in place; the
    unfused one repeats them to ``heads`` first (a copy of K and V).

    ``context_parallel=strategy``: the sequence is split over ``strategy``'s ``N`` replicas (call inside
    ``strategy.run``; replica ``r`` passes its shard ``[B, T/N, ...]``, tokens ``[r T/N, (r+1) T/N)``, and gets its
    shard of the output); the replicas exchange only the key/value blocks the pattern needs
    (``bsattn.context_parallel``). Same result as the whole sequence on one device; fused engine only, not under
    XLA; ``'strided'`` runs in the original token order there (``NaturalStrided``).
    """
    checks.choice("engine", engine, ("fused", "unfused"))
    q, k, v = _check_attention_args(q, k, v, heads, attn_mode, local_attn_ctx, blocksize, kv_heads)
    kv_heads = heads if kv_heads is None else kv_heads
    if context_parallel is not None:
        return _context_parallel_impl(
            q, k, v, heads, attn_mode, local_attn_ctx, blocksize, num_verts, vertsize, engine, kv_heads,
            context_parallel,
        )  # fmt: skip
    n_ctx = shape_list(q)[1]
    xla = in_xla_context()
    # 'strided' in the fused op: one op reading the permuted order in place (no transposes, no copies).
    strided_in_op = attn_mode == "strided" and engine == "fused" and not xla
    if attn_mode == "strided":
        _check_strided_sizes(n_ctx, local_attn_ctx, blocksize)
    if attn_mode == "strided" and not strided_in_op:
        q, k, v = (strided_transpose(t, n_ctx, local_attn_ctx, blocksize) for t in (q, k, v))
    n_state = shape_list(q)[-1] // heads
    if engine == "fused" or xla:  # under XLA the unfused ops cannot run: the same attention
        pattern = patterns.mode_pattern(
            attn_mode, n_ctx, heads, local_attn_ctx, blocksize=blocksize, num_verts=num_verts, vertsize=vertsize
        )
        tables = fused_tables_for_pattern(pattern, n_ctx, n_ctx, blocksize)
        a = fused_attention(q, k, v, tables, heads, scale=1.0 / math.sqrt(n_state), kv_heads=kv_heads,
                            strided_period=local_attn_ctx if strided_in_op else 0)
    else:
        if kv_heads != heads:  # the unfused ops take one K/V head per query head
            k, v = (_repeat_kv_heads(t, kv_heads, heads) for t in (k, v))
        bst = get_blocksparse_obj(n_ctx, heads, attn_mode, blocksize, local_attn_ctx, num_verts, vertsize)
        w = bst.query_key_op(q, k)
        w = bst.masked_softmax(w, scale=1.0 / math.sqrt(n_state))
        a = bst.weight_value_op(w, v)
    if attn_mode == "strided" and not strided_in_op:
        a = _strided_untranspose(a, n_ctx, local_attn_ctx)
    return a


def _context_parallel_impl(
    q, k, v, heads, attn_mode, local_attn_ctx, blocksize, num_verts, vertsize, engine, kv_heads, strategy
) -> tf.Tensor:
    """``blocksparse_attention_impl(..., context_parallel=strategy)`` on this replica's shard."""
    from bsattn import context_parallel as cp

    if not isinstance(strategy, tf.distribute.Strategy):
        raise TypeError(f"context_parallel must be a tf.distribute.Strategy or None, got {type(strategy).__name__}")
    if engine != "fused":
        raise ValueError(f"context_parallel needs engine='fused', got engine={engine!r}")
    if in_xla_context():
        raise ValueError("context_parallel does not run under XLA (jit_compile): the fused op cannot compile there")
    n_local = q.shape[1] if q.shape.rank else None
    if n_local is None:
        raise ValueError(f"context_parallel needs a static shard length, got q of shape {q.shape}")
    if n_local % blocksize:
        raise ValueError(
            f"context_parallel: this replica's shard (q.shape[1] = {n_local}) must be a multiple of "
            f"blocksize={blocksize}, i.e. T must be a multiple of replicas * blocksize"
        )
    _, n_shards = cp.replica_shard(strategy)
    n_ctx = n_local * n_shards
    pattern = patterns.mode_pattern(
        attn_mode, n_ctx, heads, local_attn_ctx, blocksize=blocksize, num_verts=num_verts, vertsize=vertsize
    )
    if attn_mode == "strided":
        pattern = cp.NaturalStrided(local_attn_ctx)
    tables = fused_tables_for_pattern(pattern, n_ctx, n_ctx, blocksize)
    scale = 1.0 / math.sqrt(shape_list(q)[-1] // heads)
    return cp.context_parallel_attention(q, k, v, tables, heads, strategy, scale=scale, kv_heads=kv_heads)
