"""Float64 NumPy references of the block-sparse attention ops (the ground truth of every op test).

Conventions (blocksparse's): dense activations ``[B, T, H*D]`` with head ``h`` owning channels
``[h*D, (h+1)*D)``; block-sparse weights ``[B, H, blocks, bs, bs]`` where ``w[n, h, b, i, j]`` belongs to query
``Qb*bs + i`` and key ``Kb*bs + j``, ``(Qb, Kb) = tables.nt_lut[h if lut_heads > 1 else 0, b]``. Every function
computes in float64 whatever the input dtype.
"""

from __future__ import annotations

import numpy as np

from bsattn.fused_tables import FusedTables
from bsattn.tables import BlockTables


def _block_coords(tables: BlockTables, heads: int) -> tuple[np.ndarray, np.ndarray]:
    """``(Qb, Kb)`` of every block of every head → two int ``[H, blocks]``."""
    if tables.lut_heads not in (1, heads):
        raise ValueError(f"tables have {tables.lut_heads} lut heads; heads={heads} needs 1 or {heads}")
    lut = np.broadcast_to(tables.nt_lut, (heads,) + tables.nt_lut.shape[1:])
    return lut[..., 0], lut[..., 1]


def _split(x: np.ndarray, name: str, n_blocks: int, tables: BlockTables, heads: int) -> np.ndarray:
    """``[B, n_blocks*bs, H*D]`` → float64 ``[B, H, n_blocks, bs, D]``."""
    x = np.asarray(x, dtype=np.float64)
    bs = tables.block_size
    if x.ndim != 3 or x.shape[1] != n_blocks * bs or x.shape[2] % heads:
        raise ValueError(f"{name} must be [B, {n_blocks * bs}, H*D] with H={heads}, got shape {x.shape}")
    batch, _, width = x.shape
    return x.reshape(batch, n_blocks, bs, heads, width // heads).transpose(0, 3, 1, 2, 4)


def _merge(x: np.ndarray) -> np.ndarray:
    """``[B, H, n_blocks, bs, D]`` → ``[B, n_blocks*bs, H*D]``."""
    batch, heads, n_blocks, bs, depth = x.shape
    return x.transpose(0, 2, 3, 1, 4).reshape(batch, n_blocks * bs, heads * depth)


def _gather(x: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """``x [B, H, n_blocks, bs, D]``, ``idx [H, blocks]`` → ``[B, H, blocks, bs, D]`` (block ``idx[h, b]``)."""
    return x[:, np.arange(x.shape[1])[:, None], idx]


def _scatter_sum(parts: np.ndarray, idx: np.ndarray, n_blocks: int) -> np.ndarray:
    """Sum ``parts [B, H, blocks, bs, D]`` into the blocks ``idx [H, blocks]`` → ``[B, H, n_blocks, bs, D]``."""
    one_hot = (idx[:, None, :] == np.arange(n_blocks)[None, :, None]).astype(np.float64)  # [H, n_blocks, blocks]
    return np.einsum("hrb,nhbid->nhrid", one_hot, parts)


def _check_blocks(w: np.ndarray, tables: BlockTables, name: str = "w") -> np.ndarray:
    w = np.asarray(w)
    bs = tables.block_size
    if w.ndim != 5 or w.shape[2:] != (tables.blocks, bs, bs):
        raise ValueError(f"{name} must be [B, H, {tables.blocks}, {bs}, {bs}], got shape {w.shape}")
    return w


def nt(a: np.ndarray, b: np.ndarray, tables: BlockTables, heads: int) -> np.ndarray:
    """Block-sparse ``a · bᵀ``: ``a [B, Tq, H*D]``, ``b [B, Tk, H*D]`` → ``[B, H, blocks, bs, bs]``."""
    a5 = _split(a, "a", tables.ctx_blks_q, tables, heads)
    b5 = _split(b, "b", tables.ctx_blks_k, tables, heads)
    qb, kb = _block_coords(tables, heads)
    return np.einsum("nhbid,nhbjd->nhbij", _gather(a5, qb), _gather(b5, kb))


def _block_products(w: np.ndarray, x: np.ndarray) -> np.ndarray:
    """``w [B, H, blocks, m, k] @ x [B, H, blocks, k, D]`` with zero weights as structural zeros: ``0 * NaN``
    and ``0 * inf`` count as 0 (the kernels' rule for masked keys / fully masked queries)."""
    x = x.astype(np.float64)
    finite = np.isfinite(x)
    out = np.einsum("nhbij,nhbjd->nhbid", w, np.where(finite, x, 0.0))
    if not finite.all():  # add the non-finite partners' products with the nonzero weights only
        bad = np.where(finite, 0.0, x)[..., None, :, :]  # [B, H, blocks, 1, k, D]
        nonzero = (w != 0)[..., None]  # [B, H, blocks, m, k, 1]
        products = np.where(nonzero & ~finite[..., None, :, :], w[..., None] * bad, 0.0)
        out = out + products.sum(axis=-2)
    return out


def nn(w: np.ndarray, b: np.ndarray, tables: BlockTables) -> np.ndarray:
    """Block-sparse ``w · b``: ``w [B, H, blocks, bs, bs]``, ``b [B, Tk, H*D]`` → ``[B, Tq, H*D]``
    (``Tq = ctx_blks_q * bs``; query rows without blocks are 0)."""
    w = _check_blocks(w, tables).astype(np.float64)
    heads = w.shape[1]
    qb, kb = _block_coords(tables, heads)
    parts = _block_products(w, _gather(_split(b, "b", tables.ctx_blks_k, tables, heads), kb))
    return _merge(_scatter_sum(parts, qb, tables.ctx_blks_q))


def tn(w: np.ndarray, b: np.ndarray, tables: BlockTables) -> np.ndarray:
    """Block-sparse ``wᵀ · b``: ``w [B, H, blocks, bs, bs]``, ``b [B, Tq, H*D]`` → ``[B, Tk, H*D]``
    (``Tk = ctx_blks_k * bs``; key rows without blocks are 0)."""
    w = _check_blocks(w, tables).astype(np.float64)
    heads = w.shape[1]
    qb, kb = _block_coords(tables, heads)
    parts = _block_products(w.swapaxes(-1, -2), _gather(_split(b, "b", tables.ctx_blks_q, tables, heads), qb))
    return _merge(_scatter_sum(parts, kb, tables.ctx_blks_k))


def _scatter_blocks(w: np.ndarray, tables: BlockTables, fill) -> np.ndarray:
    """``w [B, H, blocks, bs, bs]`` → ``[B, H, Tq, Tk]`` of ``w``'s dtype, ``fill`` outside the blocks."""
    batch, heads = w.shape[:2]
    bs = tables.block_size
    qb, kb = _block_coords(tables, heads)
    out = np.full((batch, heads, tables.ctx_blks_q * bs, tables.ctx_blks_k * bs), fill, dtype=w.dtype)
    # A view [H, nQb, nKb, B, bs, bs] of out, so that one fancy-indexed assignment places every block.
    view = out.reshape(batch, heads, tables.ctx_blks_q, bs, tables.ctx_blks_k, bs).transpose(1, 2, 4, 0, 3, 5)
    view[np.arange(heads)[:, None], qb, kb] = w.transpose(1, 2, 0, 3, 4)
    return out


def dense_from_blocks(w: np.ndarray, tables: BlockTables, fill: float = 0.0) -> np.ndarray:
    """``w [B, H, blocks, bs, bs]`` → float64 ``[B, H, Tq, Tk]``, ``fill`` outside the active blocks."""
    return _scatter_blocks(_check_blocks(w, tables).astype(np.float64), tables, fill)


def blocks_from_dense(x: np.ndarray, tables: BlockTables) -> np.ndarray:
    """The active blocks of ``x [B, H, Tq, Tk]`` → float64 ``[B, H, blocks, bs, bs]``."""
    x = np.asarray(x, dtype=np.float64)
    batch, heads = x.shape[:2]
    bs = tables.block_size
    if x.ndim != 4 or x.shape[2:] != (tables.ctx_blks_q * bs, tables.ctx_blks_k * bs):
        raise ValueError(f"x must be [B, H, {tables.ctx_blks_q * bs}, {tables.ctx_blks_k * bs}], got {x.shape}")
    qb, kb = _block_coords(tables, heads)
    view = x.reshape(batch, heads, tables.ctx_blks_q, bs, tables.ctx_blks_k, bs).transpose(1, 2, 4, 0, 3, 5)
    return view[np.arange(heads)[:, None], qb, kb].transpose(2, 0, 1, 3, 4)


def _keep(tables: BlockTables, heads: int) -> np.ndarray:
    """In-block masks per head → bool ``[H, blocks, bs, bs]``."""
    keep = tables.keep_masks()
    if tables.lut_heads not in (1, heads):
        raise ValueError(f"tables have {tables.lut_heads} lut heads; heads={heads} needs 1 or {heads}")
    return np.broadcast_to(keep, (heads,) + keep.shape[1:])


def token_mask_from_tables(tables: BlockTables, heads: int) -> np.ndarray:
    """The layout expanded with its in-block masks → bool ``[H, Tq, Tk]``."""
    return _scatter_blocks(_keep(tables, heads)[None], tables, False)[0]


def masked_softmax(
    x: np.ndarray, tables: BlockTables, scale: float = 1.0, autoregress_at_key: int | None = None
) -> np.ndarray:
    """blocksparse's masked softmax: ``x [B, H, blocks, bs, bs]`` → ``[B, H, blocks, bs, bs]``.

    ``softmax(scale * x)`` over every kept key of the query row, across all blocks of the row. Masked entries
    are exactly 0, and so is a fully masked row (the original kernel gives NaN there) or one whose kept scores are
    all -inf; a NaN or +inf kept score makes the row's kept entries NaN. With
    ``autoregress_at_key``, query i keeps key j iff the mask keeps it and (``j < autoregress_at_key`` or
    ``j <= i``), absolute indices: bidirectional over a prefix, causal after it.
    """
    x = _check_blocks(x, tables, "x").astype(np.float64)
    heads = x.shape[1]
    keep = _keep(tables, heads)
    if autoregress_at_key is not None:
        n_k = tables.ctx_blks_k * tables.block_size
        if not 0 <= autoregress_at_key < n_k:
            raise ValueError(f"autoregress_at_key={autoregress_at_key} out of range [0, {n_k})")
        qb, kb = _block_coords(tables, heads)
        offsets = np.arange(tables.block_size)
        i = (qb * tables.block_size)[..., None, None] + offsets[:, None]
        j = (kb * tables.block_size)[..., None, None] + offsets[None, :]
        keep = keep & ((j < autoregress_at_key) | (j <= i))
    kept_scores = np.where(keep, scale * x, -np.inf)
    scores = _scatter_blocks(kept_scores, tables, -np.inf)
    # A NaN or +inf kept score poisons its row (NaN at the kept entries, as a dense softmax); -inf = masked.
    poisoned = (np.isnan(scores) | (scores == np.inf)).any(axis=-1, keepdims=True)
    scores = np.where(poisoned, -np.inf, scores)
    row_max = scores.max(axis=-1, keepdims=True)
    row_max = np.where(np.isfinite(row_max), row_max, 0.0)  # fully masked row: exp(-inf) = 0 everywhere
    e = np.exp(scores - row_max)
    total = e.sum(axis=-1, keepdims=True)
    y = blocks_from_dense(np.divide(e, total, out=np.zeros_like(e), where=total > 0), tables)
    row_poisoned = blocks_from_dense(np.broadcast_to(poisoned, e.shape).astype(np.float64), tables) > 0
    return np.where(row_poisoned & (kept_scores != -np.inf), np.nan, y)


def masked_softmax_grad(dy: np.ndarray, y: np.ndarray, tables: BlockTables, scale: float = 1.0) -> np.ndarray:
    """Gradient of ``masked_softmax``: ``scale * y * (dy - Σ_row dy·y)``, the sum over the whole query row
    (all its blocks); entries with ``y = 0`` (masked) contribute nothing and get 0, whatever ``dy`` holds. ``dy, y [B, H, blocks, bs, bs]``."""
    dy = _check_blocks(dy, tables, "dy").astype(np.float64)
    y = _check_blocks(y, tables, "y").astype(np.float64)
    dy = np.where(y == 0, 0.0, dy)  # y = 0 entries are structural: a NaN dy there does not reach the row
    row_sum = dense_from_blocks(dy * y, tables).sum(axis=-1)  # [B, H, Tq]
    bs = tables.block_size
    qb, _ = _block_coords(tables, y.shape[1])
    rows = (qb * bs)[..., None] + np.arange(bs)  # [H, blocks, bs]: query token of each block row
    per_block = row_sum[:, np.arange(y.shape[1])[:, None, None], rows]  # [B, H, blocks, bs]
    return np.where(y == 0, 0.0, scale * y * (dy - per_block[..., None]))


def blocksparse_attention(
    q: np.ndarray, k: np.ndarray, v: np.ndarray, tables: BlockTables, heads: int, scale: float | None = None
) -> np.ndarray:
    """nt → masked_softmax → nn: ``q [B, Tq, H*D]``, ``k, v [B, Tk, H*D]`` → ``[B, Tq, H*D]``;
    ``scale`` defaults to ``1/sqrt(D)``."""
    scale = _default_scale(q, heads, scale)
    return nn(masked_softmax(nt(q, k, tables, heads), tables, scale), v, tables)


# ---- dense attention ---------------------------------------------------------------------------------------


def _default_scale(q: np.ndarray, heads: int, scale: float | None) -> float:
    return 1.0 / np.sqrt(np.shape(q)[-1] // heads) if scale is None else scale


def _heads(x: np.ndarray, heads: int) -> np.ndarray:
    """``[B, T, H*D]`` → float64 ``[B, H, T, D]``."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 3 or x.shape[2] % heads:
        raise ValueError(f"inputs must be [B, T, H*D] with H={heads}, got shape {x.shape}")
    return x.reshape(x.shape[0], x.shape[1], heads, -1).transpose(0, 2, 1, 3)


def _kv_heads(x: np.ndarray, heads: int, kv_heads: int | None) -> np.ndarray:
    """K or V ``[B, T, KVH*D]`` → float64 ``[B, H, T, D]``: K/V head ``h // (H // KVH)`` for query head ``h``."""
    kv_heads = heads if kv_heads is None else kv_heads
    if heads % kv_heads:
        raise ValueError(f"kv_heads={kv_heads} must divide heads={heads}")
    return np.repeat(_heads(x, kv_heads), heads // kv_heads, axis=1)


def _sum_groups(x: np.ndarray, kv_heads: int | None) -> np.ndarray:
    """``[B, H, T, D]`` → ``[B, KVH, T, D]``: the sum over each K/V head's group of query heads."""
    if kv_heads is None or kv_heads == x.shape[1]:
        return x
    return x.reshape(x.shape[0], kv_heads, x.shape[1] // kv_heads, *x.shape[2:]).sum(axis=2)


def _segment_keep(q_segment_ids, k_segment_ids) -> np.ndarray | bool:
    """bool ``[B, 1, Tq, Tk]``: query i and key j share a segment (True without segment ids)."""
    if (q_segment_ids is None) != (k_segment_ids is None):
        raise ValueError("q_segment_ids and k_segment_ids: pass both or neither")
    if q_segment_ids is None:
        return True
    return np.asarray(q_segment_ids)[:, None, :, None] == np.asarray(k_segment_ids)[:, None, None, :]


def _unheads(x: np.ndarray) -> np.ndarray:
    """``[B, H, T, D]`` → ``[B, T, H*D]``."""
    return x.transpose(0, 2, 1, 3).reshape(x.shape[0], x.shape[2], -1)


def dense_attention(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    heads: int,
    mask: np.ndarray | None = None,
    scale: float | None = None,
    mask_value: float = -1e9,
) -> np.ndarray:
    """sparse_attention's ``attention_impl``: ``w = scale·q·kᵀ``, then ``w·mask + mask_value·(1 - mask)``,
    softmax over keys, ``·v``. ``q [B, Tq, H*D]``, ``k, v [B, Tk, H*D]``, ``mask`` broadcastable to
    ``[B, H, Tq, Tk]`` (1 = attend) → ``[B, Tq, H*D]``. ``scale`` defaults to ``1/sqrt(D)``."""
    scale = _default_scale(q, heads, scale)
    w = scale * np.einsum("nhid,nhjd->nhij", _heads(q, heads), _heads(k, heads))
    if mask is not None:
        mask = np.asarray(mask, dtype=np.float64)
        w = w * mask + mask_value * (1.0 - mask)
    w = np.exp(w - w.max(axis=-1, keepdims=True))
    w /= w.sum(axis=-1, keepdims=True)
    return _unheads(np.einsum("nhij,nhjd->nhid", w, _heads(v, heads)))


def _masked_probs(q, k, heads, mask, scale) -> np.ndarray:
    """Exactly masked attention probabilities → ``[B, H, Tq, Tk]`` (a fully masked row is all 0)."""
    w = scale * np.einsum("nhid,nhjd->nhij", _heads(q, heads), _heads(k, heads))
    keep = np.broadcast_to(np.asarray(mask, dtype=bool), w.shape)
    w = np.where(keep, w, -np.inf)
    row_max = w.max(axis=-1, keepdims=True)
    e = np.exp(w - np.where(np.isfinite(row_max), row_max, 0.0))
    total = e.sum(axis=-1, keepdims=True)
    return np.divide(e, total, out=np.zeros_like(e), where=total > 0)


def masked_attention(
    q: np.ndarray, k: np.ndarray, v: np.ndarray, heads: int, mask: np.ndarray, scale: float | None = None
) -> np.ndarray:
    """Attention with exact masking: masked keys are excluded and a fully masked query row gives 0.
    ``q [B, Tq, H*D]``, ``k, v [B, Tk, H*D]``, bool ``mask`` broadcastable to ``[B, H, Tq, Tk]`` → ``[B, Tq, H*D]``."""
    p = _masked_probs(q, k, heads, mask, _default_scale(q, heads, scale))
    return _unheads(np.einsum("nhij,nhjd->nhid", p, _heads(v, heads)))


def masked_attention_grad(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    heads: int,
    mask: np.ndarray,
    scale: float | None,
    dout: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Analytic gradients of ``masked_attention`` for the upstream ``dout [B, Tq, H*D]`` → ``(dq, dk, dv)``,
    shaped like ``q, k, v``."""
    scale = _default_scale(q, heads, scale)
    p = _masked_probs(q, k, heads, mask, scale)
    qh, kh, vh, doh = (_heads(x, heads) for x in (q, k, v, dout))
    dv = np.einsum("nhij,nhid->nhjd", p, doh)
    dp = np.einsum("nhid,nhjd->nhij", doh, vh)
    ds = p * (dp - (dp * p).sum(axis=-1, keepdims=True))  # softmax backward; 0 where p = 0
    dq = scale * np.einsum("nhij,nhjd->nhid", ds, kh)
    dk = scale * np.einsum("nhij,nhid->nhjd", ds, qh)
    return _unheads(dq), _unheads(dk), _unheads(dv)


# ---- fused attention ---------------------------------------------------------------------------------------
# The fused op takes scale and dropout_rate as float32 attributes; these references round them the same way.

_GOLDEN = 0x9E3779B97F4A7C15


def _fmix64(z: np.ndarray) -> np.ndarray:
    """murmur3's 64-bit finaliser on uint64 arrays (wrapping arithmetic)."""
    z = z ^ (z >> np.uint64(33))
    z = z * np.uint64(0xFF51AFD7ED558CCD)
    z = z ^ (z >> np.uint64(33))
    z = z * np.uint64(0xC4CEB9FE1A85EC53)
    return z ^ (z >> np.uint64(33))


def dropout_keep_mask(seed: int, rate: float, batch: int, heads: int, n_q: int, n_k: int,
                      rows: tuple[int, int] | None = None) -> np.ndarray:
    """The fused op's dropout decisions → bool ``[B, H, Tq, Tk]`` (True = kept); with ``rows = (start, count)``
    only the query rows ``[start, start + count)`` → ``[B, H, count, Tk]`` (a decoding step's).

    Entry ``(b, h, i, j)`` is kept iff the high 32 bits of ``fmix64(key ^ (counter * G))`` are at least
    ``floor(rate * 2^32)``, with ``counter = ((b*H + h)*Tq + i)*Tk + j``, ``key = fmix64(seed ^ G)`` and
    ``G = 0x9E3779B97F4A7C15`` (the C++ twin is in ``ops/cc/kernels/attention_math.h``).
    """
    rate = float(np.float32(rate))
    threshold = min(np.floor(rate * 2.0**32), 2.0**32 - 1)
    key = _fmix64(np.array([int(seed) & (2**64 - 1)], dtype=np.uint64) ^ np.uint64(_GOLDEN))[0]
    start, count = (0, n_q) if rows is None else rows
    bh = np.arange(batch * heads, dtype=np.uint64).reshape(batch, heads, 1, 1)
    i = np.arange(start, start + count, dtype=np.uint64).reshape(1, 1, count, 1)
    counter = (bh * np.uint64(n_q) + i) * np.uint64(n_k) + np.arange(n_k, dtype=np.uint64)
    bits = _fmix64(key ^ (counter * np.uint64(_GOLDEN)))
    return (bits >> np.uint64(32)) >= np.uint64(threshold)


def _bias4(bias: np.ndarray) -> np.ndarray:
    """The fused op's bias ``[B|1, H|1, Tq, Tk]`` (a rank-3 ``[H|1, Tq, Tk]`` as ``[1, H|1, Tq, Tk]``), float64."""
    bias = np.asarray(bias, dtype=np.float64)
    return bias[None] if bias.ndim == 3 else bias


def _decode_keep(tables: FusedTables, q_offset: int, n_rows: int) -> np.ndarray:
    """The attended pairs of a decoding step → bool ``[L, n_rows, Tk]``: rows ``[p, p + n_rows)`` of the tables'
    token mask, keys ``>= p + n_rows`` (not yet written) dropped."""
    p = int(q_offset)
    if p < 0 or p + n_rows > tables.n_q or p + n_rows > tables.n_k:
        raise ValueError(f"q_offset + Tq = {p} + {n_rows} must lie in [0, min(T_max, Tk)] = [0, "
                         f"{min(tables.n_q, tables.n_k)}]")
    return tables.token_mask()[:, p : p + n_rows] & (np.arange(tables.n_k) < p + n_rows)


def _to_tokens(x: np.ndarray, strided_period: int) -> np.ndarray:
    """``x [..., T, T]`` indexed by the strided-permuted positions of ``strided_period = L`` (position ``p`` is token
    ``(p % (T/L)) * L + p // (T/L)``) → indexed by tokens; ``x`` itself for 0."""
    if not strided_period:
        return x
    n = x.shape[-1]
    if x.shape[-2] != n or n % strided_period:
        raise ValueError(f"strided_period={strided_period} needs [..., T, T] with T % strided_period == 0, got "
                         f"{x.shape}")
    position = np.arange(n).reshape(strided_period, n // strided_period).T.reshape(-1)  # of token t: t%L*bT + t//L
    return x[..., position[:, None], position[None, :]]


def _fused_probs(q, k, tables, heads, scale, key_padding_mask, bias, kv_heads=None, q_segment_ids=None,
                 k_segment_ids=None, q_offset=None, strided_period=0):
    """``(p [B, H, Tq, Tk], lse [B, H, Tq], scale, keep [B|1, H, Tq, Tk])`` of the fused attention (no
    dropout), float64. ``keep``: the attended entries (tables, key padding, bias other than -inf); a NaN
    score elsewhere is never read, an attended one makes its row NaN (``lse`` too). With ``q_offset`` (decoding)
    q's rows are the positions ``[q_offset, q_offset + Tq)`` (``_decode_keep``). With ``strided_period`` the
    tables' mask is in permuted positions, everything else in token order (``_to_tokens``)."""
    qh, kh = _heads(q, heads), _kv_heads(k, heads, kv_heads)
    n_q = tables.n_q if q_offset is None else qh.shape[2]
    if qh.shape[2] != n_q or kh.shape[2] != tables.n_k:
        raise ValueError(f"q and k must have {n_q} and {tables.n_k} tokens, got {qh.shape[2]} and {kh.shape[2]}")
    if tables.lut_heads not in (1, heads):
        raise ValueError(f"tables have {tables.lut_heads} layout heads; heads={heads} needs 1 or {heads}")
    scale = float(np.float32(_default_scale(q, heads, scale)))
    mask = tables.token_mask() if q_offset is None else _decode_keep(tables, q_offset, n_q)
    mask = _to_tokens(mask, strided_period)
    keep = np.broadcast_to(mask[None], (1, heads, n_q, tables.n_k))
    if key_padding_mask is not None:
        keep = keep & np.asarray(key_padding_mask, dtype=bool)[:, None, None, :]
    keep = keep & _segment_keep(q_segment_ids, k_segment_ids)
    with np.errstate(invalid="ignore", over="ignore"):
        s = scale * np.einsum("nhid,nhjd->nhij", qh, kh)
        if bias is not None:
            s = s + _bias4(bias)
            keep = keep & (_bias4(bias) != -np.inf)
        s = np.where(keep, s, -np.inf)
        m = s.max(axis=-1, keepdims=True)
        m = np.where(np.isfinite(m), m, 0.0)
        e = np.exp(s - m)
        total = e.sum(axis=-1, keepdims=True)
        p = np.where(total == 0, 0.0, e / np.where(total == 0, 1.0, total))
    with np.errstate(divide="ignore", invalid="ignore"):
        lse = np.where(total == 0, -np.inf, m + np.log(total))[..., 0]
    return p, lse, scale, keep


def _kept_product(w: np.ndarray, x: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """``sum_j w[n, h, i, j] · x[n, h, j, :]`` over the attended ``j`` only (``keep``): a non-finite value of
    ``x`` at a masked entry is never read (``0 · NaN`` would be NaN)."""
    finite = np.isfinite(x)
    out = np.einsum("nhij,nhjd->nhid", w, np.where(finite, x, 0.0))
    keep = np.broadcast_to(keep, w.shape)
    read = ~finite & keep.any(axis=2)[..., None]  # the non-finite values some row attends
    with np.errstate(invalid="ignore"):
        for n, h, j, d in zip(*np.nonzero(read)):
            out[n, h, :, d] += np.where(keep[n, h, :, j], w[n, h, :, j] * x[n, h, j, d], 0.0)
    return out


def _dropout_scale(p: np.ndarray, dropout_rate: float, seed: int, rows: tuple[int, int] | None = None,
                   strided_period: int = 0) -> np.ndarray | float:
    """The factor applied to the probabilities: ``keep / (1 - rate)``, or 1 without dropout. ``rows = (q_offset,
    T_max)`` (decoding): ``p``'s rows are rows ``[q_offset, q_offset + Tq)`` of the full op's ``T_max``.
    ``strided_period``: the hash's rows and columns are the permuted positions (``_to_tokens``)."""
    if not dropout_rate:
        return 1.0
    batch, heads, n_q, n_k = p.shape
    rate = float(np.float32(dropout_rate))
    if rows is None:
        keep = _to_tokens(dropout_keep_mask(seed, rate, batch, heads, n_q, n_k), strided_period)
        return keep / (1.0 - rate)
    offset, t_max = rows
    return dropout_keep_mask(seed, rate, batch, heads, t_max, n_k, (offset, n_q)) / (1.0 - rate)


def fused_attention(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    tables: FusedTables,
    heads: int,
    scale: float | None = None,
    key_padding_mask: np.ndarray | None = None,
    bias: np.ndarray | None = None,
    dropout_rate: float = 0.0,
    seed: int = 0,
    kv_heads: int | None = None,
    q_segment_ids: np.ndarray | None = None,
    k_segment_ids: np.ndarray | None = None,
    q_offset: int | None = None,
    strided_period: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """The fused op: ``q [B, Tq, H*D]``, ``k, v [B, Tk, KVH*D]`` → ``(out [B, Tq, H*D], lse [B, H, Tq])``.

    ``q_offset = p`` (decoding with a KV cache): q's ``Tq`` rows (any number) are the queries at positions
    ``[p, p + Tq)``, attending what rows ``[p, p + Tq)`` of the tables' token mask keep among the keys ``< p + Tq``
    (the cache written so far; later keys are never read); ``bias [B|1, H|1, Tq, Tk]`` and ``q_segment_ids [B, Tq]``
    are those of the new rows; dropout decisions are those of the full op's rows ``p + i``.

    ``kv_heads`` (None = ``heads``): query head ``h`` reads K/V head ``h // (H // KVH)``. ``q_segment_ids [B, Tq]``,
    ``k_segment_ids [B, Tk]`` (both or neither): query ``i`` attends key ``j`` only if their ids are equal.

    Scores ``scale·q·kᵀ + bias`` (``bias [B|1, H|1, Tq, Tk]``, or ``[H|1, Tq, Tk]``) are kept where the tables' token mask and
    ``key_padding_mask [B, Tk]`` (True = real key) allow; ``lse`` is their log-sum-exp (-inf for a row with no
    kept key, whose output is 0); ``out = (P ⊙ keep / (1 - rate)) · v`` with the dropout mask of
    ``dropout_keep_mask``. ``scale`` defaults to ``1/sqrt(D)``. Masked entries are never read: NaN/Inf in ``k``, ``v``
    or ``bias`` there stays out of every result; an attended NaN score makes its row (and ``lse``) NaN.

    ``strided_period = L > 0`` (self-attention): the tables (and the dropout hash) address the permuted positions
    ``p`` of ``patterns.strided_permutation`` (position ``p`` is token ``(p % (T/L)) * L + p // (T/L)``); every array
    is in token order.
    """
    segments = (kv_heads, q_segment_ids, k_segment_ids)
    p, lse, _, keep = _fused_probs(q, k, tables, heads, scale, key_padding_mask, bias, *segments, q_offset=q_offset,
                                   strided_period=strided_period)
    rows = None if q_offset is None else (int(q_offset), tables.n_q)
    z = _dropout_scale(p, dropout_rate, seed, rows, strided_period)
    out = _kept_product(p * z, _kv_heads(v, heads, kv_heads), keep)
    return _unheads(out), lse


def fused_attention_grad(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    tables: FusedTables,
    heads: int,
    dout: np.ndarray,
    scale: float | None = None,
    key_padding_mask: np.ndarray | None = None,
    bias: np.ndarray | None = None,
    dropout_rate: float = 0.0,
    seed: int = 0,
    dlse: np.ndarray | None = None,
    kv_heads: int | None = None,
    q_segment_ids: np.ndarray | None = None,
    k_segment_ids: np.ndarray | None = None,
    strided_period: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """Analytic gradients of ``fused_attention`` for upstream ``dout [B, Tq, H*D]`` (and ``dlse [B, H, Tq]``)
    → ``(dq, dk, dv, dbias)``; ``dbias`` has the shape of ``bias`` (summed over the batch and/or heads it
    broadcasts over), None without a bias. ``dk``, ``dv`` are ``[B, Tk, KVH*D]``, summed over each K/V head's group
    of query heads. A query with no kept key contributes nothing (NaN in its q or dout included).
    ``strided_period``: as in ``fused_attention``."""
    segments = (kv_heads, q_segment_ids, k_segment_ids)
    p, _, scale, keep = _fused_probs(q, k, tables, heads, scale, key_padding_mask, bias, *segments,
                                     strided_period=strided_period)
    # Masked entries (other segments included) are never read, even in a NaN row: their P and dS are 0 and
    # no product reads their q, k, v or dout (a query with no kept key contributes nothing).
    active = np.broadcast_to(keep, p.shape)
    z = _dropout_scale(p, dropout_rate, seed, strided_period=strided_period)
    qh, doh = _heads(q, heads), _heads(dout, heads)
    kh, vh = _kv_heads(k, heads, kv_heads), _kv_heads(v, heads, kv_heads)
    p = np.where(active, p, 0.0)
    dv = _kept_product((p * z).transpose(0, 1, 3, 2), doh, np.swapaxes(active, 2, 3))
    with np.errstate(invalid="ignore"):
        dp = np.where(keep, np.einsum("nhid,nhjd->nhij", doh, vh), 0.0) * z  # masked entries: V never read
        delta = (p * dp).sum(axis=-1, keepdims=True)
        if dlse is not None:
            delta = delta - np.asarray(dlse, dtype=np.float64)[..., None]  # d lse / d s = p
        ds = np.where(active, p * (dp - delta), 0.0)
    dq = scale * _kept_product(ds, kh, keep)
    dk = scale * _kept_product(ds.transpose(0, 1, 3, 2), qh, np.swapaxes(active, 2, 3))
    dk, dv = _sum_groups(dk, kv_heads), _sum_groups(dv, kv_heads)
    dbias = None
    if bias is not None:  # summed over the dimensions bias broadcasts over, in bias's own shape
        b4 = _bias4(bias)
        dbias = ds.sum(axis=tuple(a for a in (0, 1) if b4.shape[a] == 1), keepdims=True).reshape(np.shape(bias))
    return _unheads(dq), _unheads(dk), _unheads(dv), dbias
