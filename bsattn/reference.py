"""Float64 NumPy references of the block-sparse attention ops (the ground truth of every op test).

Conventions (blocksparse's): dense activations ``[B, T, H*D]`` with head ``h`` owning channels
``[h*D, (h+1)*D)``; block-sparse weights ``[B, H, blocks, bs, bs]`` where ``w[n, h, b, i, j]`` belongs to query
``Qb*bs + i`` and key ``Kb*bs + j``, ``(Qb, Kb) = tables.nt_lut[h if lut_heads > 1 else 0, b]``. Every function
computes in float64 whatever the input dtype.
"""

from __future__ import annotations

import numpy as np

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


def nn(w: np.ndarray, b: np.ndarray, tables: BlockTables) -> np.ndarray:
    """Block-sparse ``w · b``: ``w [B, H, blocks, bs, bs]``, ``b [B, Tk, H*D]`` → ``[B, Tq, H*D]``
    (``Tq = ctx_blks_q * bs``; query rows without blocks are 0)."""
    w = _check_blocks(w, tables).astype(np.float64)
    heads = w.shape[1]
    qb, kb = _block_coords(tables, heads)
    parts = np.einsum("nhbij,nhbjd->nhbid", w, _gather(_split(b, "b", tables.ctx_blks_k, tables, heads), kb))
    return _merge(_scatter_sum(parts, qb, tables.ctx_blks_q))


def tn(w: np.ndarray, b: np.ndarray, tables: BlockTables) -> np.ndarray:
    """Block-sparse ``wᵀ · b``: ``w [B, H, blocks, bs, bs]``, ``b [B, Tq, H*D]`` → ``[B, Tk, H*D]``
    (``Tk = ctx_blks_k * bs``; key rows without blocks are 0)."""
    w = _check_blocks(w, tables).astype(np.float64)
    heads = w.shape[1]
    qb, kb = _block_coords(tables, heads)
    parts = np.einsum("nhbij,nhbid->nhbjd", w, _gather(_split(b, "b", tables.ctx_blks_q, tables, heads), qb))
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
    are exactly 0, and so is a fully masked row (the original kernel gives NaN there). With
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
    scores = _scatter_blocks(np.where(keep, scale * x, -np.inf), tables, -np.inf)
    row_max = scores.max(axis=-1, keepdims=True)
    row_max = np.where(np.isfinite(row_max), row_max, 0.0)  # fully masked row: exp(-inf) = 0 everywhere
    e = np.exp(scores - row_max)
    total = e.sum(axis=-1, keepdims=True)
    y = np.divide(e, total, out=np.zeros_like(e), where=total > 0)
    return blocks_from_dense(y, tables)


def masked_softmax_grad(dy: np.ndarray, y: np.ndarray, tables: BlockTables, scale: float = 1.0) -> np.ndarray:
    """Gradient of ``masked_softmax``: ``scale * y * (dy - Σ_row dy·y)``, the sum over the whole query row
    (all its blocks); masked entries need no mask since ``y = 0`` there. ``dy, y [B, H, blocks, bs, bs]``."""
    dy = _check_blocks(dy, tables, "dy").astype(np.float64)
    y = _check_blocks(y, tables, "y").astype(np.float64)
    row_sum = dense_from_blocks(dy * y, tables).sum(axis=-1)  # [B, H, Tq]
    bs = tables.block_size
    qb, _ = _block_coords(tables, y.shape[1])
    rows = (qb * bs)[..., None] + np.arange(bs)  # [H, blocks, bs]: query token of each block row
    per_block = row_sum[:, np.arange(y.shape[1])[:, None, None], rows]  # [B, H, blocks, bs]
    return scale * y * (dy - per_block[..., None])


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
