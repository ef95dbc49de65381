"""Index tables of the fused attention op: per-head CSR lists of active blocks (NumPy only; cached).

For every layout head ``l`` (``L = 1``: one layout shared by all heads; else head ``h`` uses layout ``h``) the
active blocks ``(Qb, Kb)`` are listed twice, by query-block row and by key-block column, and heads may have
different block counts:

- ``row_ptr [L, nQb + 1]``: the blocks of row ``Qb`` of head ``l`` are ``row_entries[row_ptr[l, Qb] :
  row_ptr[l, Qb + 1]]`` (global offsets: head ``l``'s entries follow head ``l - 1``'s);
- ``row_entries [E, 2]``: ``(Kb, mask_id)``, ``Kb`` increasing along a row;
- ``col_ptr [L, nKb + 1]`` and ``col_entries [E, 2]``: ``(Qb, mask_id)``, the same blocks by column, ``Qb``
  increasing (for dK/dV without atomics);
- ``masks [P, bs, ceil(bs/32)]`` int32: the keep bits of the partially kept blocks only (bit ``j % 32`` of word
  ``j // 32`` of row ``i`` keeps key ``j`` for query ``i``), deduplicated; ``mask_id = -1`` marks a full block.

Blocks whose mask keeps nothing are dropped and blocks whose mask keeps everything are full, so a mask is only
ever applied where it matters.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import numpy as np

from bsattn import _checks as checks
from bsattn.patterns import BlockLayout, MaskCallback, Pattern
from bsattn.tables import (
    BLOCK_SIZES,
    BlockTables,
    PatternMasks,
    _pack_rows,
    check_table_fields,
)

MaskFn = Callable[[int, np.ndarray, np.ndarray], np.ndarray]
"""``mask_fn(layout_head, q_blocks [n], k_blocks [n]) -> bool [n, bs, bs]``: in-block masks of given blocks."""

# Blocks per mask_fn call: bounds the temporary [n, bs, bs] masks to a few MB.
_MASK_CHUNK_ELEMS = 1 << 22


@dataclasses.dataclass(frozen=True, eq=False)
class FusedTables:
    """The tables of one (layout, block size, masks); read-only int32 arrays (see the module docstring)."""

    block_size: int
    lut_heads: int  # L
    n_q_blocks: int
    n_k_blocks: int
    row_ptr: np.ndarray  # [L, nQb + 1]
    row_entries: np.ndarray  # [E, 2] (Kb, mask_id)
    col_ptr: np.ndarray  # [L, nKb + 1]
    col_entries: np.ndarray  # [E, 2] (Qb, mask_id)
    masks: np.ndarray  # [P, bs, W]

    def __post_init__(self) -> None:
        check_table_fields(self, ("row_ptr", "row_entries", "col_ptr", "col_entries", "masks"))

    @property
    def n_q(self) -> int:
        return self.n_q_blocks * self.block_size

    @property
    def n_k(self) -> int:
        return self.n_k_blocks * self.block_size

    @property
    def blocks_per_head(self) -> np.ndarray:
        """Active blocks of each layout head → int ``[L]``."""
        return (self.row_ptr[:, -1] - self.row_ptr[:, 0]).astype(np.int64)

    @property
    def density(self) -> float:
        """Active blocks over all blocks, averaged over the layout heads."""
        return float(self.blocks_per_head.mean()) / max(1, self.n_q_blocks * self.n_k_blocks)

    def block_coords(self, head: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(Qb, Kb, mask_id)`` of the blocks of layout head ``head``, row-major → three int ``[n]``."""
        start, stop = self.row_ptr[head, 0], self.row_ptr[head, -1]
        qb = np.repeat(np.arange(self.n_q_blocks), np.diff(self.row_ptr[head]))
        return qb, self.row_entries[start:stop, 0], self.row_entries[start:stop, 1]

    @property
    def layout(self) -> np.ndarray:
        """Active blocks → bool ``[L, nQb, nKb]``."""
        out = np.zeros((self.lut_heads, self.n_q_blocks, self.n_k_blocks), dtype=bool)
        for h in range(self.lut_heads):
            qb, kb, _ = self.block_coords(h)
            out[h, qb, kb] = True
        return out

    def unpacked_masks(self) -> np.ndarray:
        """The partial blocks' masks → bool ``[P, bs, bs]`` (row = query offset, column = key offset)."""
        as_bytes = self.masks.view(np.uint32).astype("<u4").view(np.uint8)
        return np.unpackbits(as_bytes, axis=-1, bitorder="little")[..., : self.block_size].astype(bool)

    def token_mask(self) -> np.ndarray:
        """The attended (query, key) pairs → bool ``[L, Tq, Tk]`` (for references and tests: O(T²))."""
        bs = self.block_size
        keep = self.unpacked_masks()
        full = np.ones((bs, bs), dtype=bool)
        out = np.zeros((self.lut_heads, self.n_q_blocks, bs, self.n_k_blocks, bs), dtype=bool)
        for h in range(self.lut_heads):
            for qb, kb, mask_id in zip(*(a.tolist() for a in self.block_coords(h)), strict=True):
                out[h, qb, :, kb, :] = full if mask_id < 0 else keep[mask_id]
        return out.reshape(self.lut_heads, self.n_q, self.n_k)


def _readonly(array: np.ndarray) -> np.ndarray:
    array = np.ascontiguousarray(array, dtype=np.int32)
    array.flags.writeable = False
    return array


def build_fused_tables(
    active: np.ndarray, block_size: int, full: np.ndarray | None = None, mask_fn: MaskFn | None = None
) -> FusedTables:
    """The tables of the block map ``active`` (bool ``[nQb, nKb]`` or ``[L, nQb, nKb]``).

    ``full`` (same shape; default: ``active``) marks the blocks kept entirely; the others are partial and their
    masks come from ``mask_fn(layout_head, q_blocks, k_blocks) -> bool [n, bs, bs]`` (required when some block
    is partial). Not cached: see ``fused_tables_for_pattern`` / ``fused_tables_for_layout``.
    """
    checks.choice("block_size", block_size, BLOCK_SIZES)
    active = np.asarray(active)
    if active.ndim not in (2, 3):
        raise ValueError(f"active must be [nQb, nKb] or [L, nQb, nKb], got shape {active.shape}")
    if 0 in active.shape:
        raise ValueError(f"active must have at least one query and one key block, got shape {active.shape}")
    active = (active != 0).reshape((-1,) + active.shape[-2:])
    full = active if full is None else np.broadcast_to(np.asarray(full, dtype=bool), active.shape) & active
    partial = active & ~full
    if partial.any() and mask_fn is None:
        raise ValueError("mask_fn is required when some active block is not full")
    n_heads, n_qb, n_kb = active.shape
    all_kept = _pack_rows(np.ones((1, block_size, block_size), dtype=bool))[0]

    per_head, packed = [], []  # per head: (qb, kb, mask_id or -1 / index into packed)
    n_packed = 0
    for h in range(n_heads):
        qb, kb = np.nonzero(active[h])  # row-major: Kb increasing within a row
        mask_id = np.full(qb.size, -1, dtype=np.int64)
        keep = np.ones(qb.size, dtype=bool)
        todo = np.flatnonzero(partial[h][qb, kb])
        chunk = max(1, _MASK_CHUNK_ELEMS // (block_size * block_size))
        for s in range(0, todo.size, chunk):
            sel = todo[s : s + chunk]
            masks = np.asarray(mask_fn(h, qb[sel], kb[sel]))
            if masks.shape != (sel.size, block_size, block_size) or masks.dtype != bool:
                raise ValueError(
                    f"mask_fn returned {masks.dtype} {masks.shape}; expected bool {(sel.size, block_size, block_size)}"
                )
            words = _pack_rows(masks)
            is_full = (words == all_kept).all(axis=(1, 2))
            is_empty = (words == 0).all(axis=(1, 2))
            keep[sel[is_empty]] = False
            real = ~is_full & ~is_empty
            mask_id[sel[real]] = n_packed + np.arange(int(real.sum()))
            n_packed += int(real.sum())
            packed.append(words[real])
        per_head.append((qb[keep], kb[keep], mask_id[keep]))

    n_words = -(-block_size // 32)
    words = np.concatenate(packed) if packed else np.zeros((0, block_size, n_words), np.int32)
    unique, inverse = np.unique(words.reshape(len(words), block_size * n_words), axis=0, return_inverse=True)
    masks = unique.reshape(-1, block_size, n_words)
    inverse = np.asarray(inverse).reshape(-1)

    row_ptr, row_entries, col_ptr, col_entries = [], [], [], []
    offset = 0
    for qb, kb, mask_id in per_head:
        if inverse.size:  # ids into the deduplicated masks
            mask_id = np.where(mask_id >= 0, inverse[np.maximum(mask_id, 0)], -1)
        row_ptr.append(offset + np.concatenate([[0], np.cumsum(np.bincount(qb, minlength=n_qb))]))
        row_entries.append(np.stack([kb, mask_id], axis=1))
        by_col = np.lexsort((qb, kb))  # by Kb, then Qb
        col_ptr.append(offset + np.concatenate([[0], np.cumsum(np.bincount(kb, minlength=n_kb))]))
        col_entries.append(np.stack([qb[by_col], mask_id[by_col]], axis=1))
        offset += qb.size
    if offset >= 2**31:
        raise ValueError(f"{offset} active blocks exceed the int32 tables")
    return FusedTables(
        block_size=block_size,
        lut_heads=n_heads,
        n_q_blocks=n_qb,
        n_k_blocks=n_kb,
        row_ptr=_readonly(np.stack(row_ptr)),
        row_entries=_readonly(np.concatenate(row_entries).reshape(-1, 2)),
        col_ptr=_readonly(np.stack(col_ptr)),
        col_entries=_readonly(np.concatenate(col_entries).reshape(-1, 2)),
        masks=_readonly(masks),
    )


@functools.lru_cache(maxsize=32)
def fused_tables_for_pattern(pattern: Pattern, n_q: int, n_k: int, block_size: int) -> FusedTables:
    """The tables of ``pattern`` for ``n_q`` queries and ``n_k`` keys (cached; ``lut_heads = pattern.num_layouts``).

    Full blocks come from the pattern's analytic ``block_classes``; only partial blocks are evaluated token by
    token, so ``T = 65536`` at block size 64 takes well under a second for the built-in patterns.
    """
    checks.choice("block_size", block_size, BLOCK_SIZES)
    active, full = pattern.block_classes(n_q, n_k, block_size)
    return build_fused_tables(active, block_size, full, PatternMasks(pattern, n_q, n_k, block_size))


def fused_tables_for_layout(
    layout: np.ndarray, block_size: int, mask_callback: MaskCallback | None = None
) -> FusedTables:
    """The tables of a raw block ``layout`` (``[nQb, nKb]`` or ``[L, nQb, nKb]``, nonzero = active; heads may have
    different block counts) plus an optional blocksparse ``mask_callback(blk_shape, head_idx, qry_idx, key_idx,
    blk_idx)``. Cached by layout content and the callback's identity."""
    checks.choice("block_size", block_size, BLOCK_SIZES)
    pattern = BlockLayout(layout, block_size, mask_callback)
    n_q, n_k = pattern.layout.shape[1] * block_size, pattern.layout.shape[2] * block_size
    return fused_tables_for_pattern(pattern, n_q, n_k, block_size)


def from_block_tables(tables: BlockTables) -> FusedTables:
    """The fused tables of existing ``BlockTables`` (e.g. ``BlocksparseTransformer.tables`` or
    ``get_blocksparse_obj(...).tables``): the same blocks and in-block masks (cached per tables object)."""
    checks.instance("tables", tables, BlockTables, " (e.g. BlocksparseTransformer.tables)")
    return _from_block_tables(tables)


@functools.lru_cache(maxsize=32)
def _from_block_tables(tables: BlockTables) -> FusedTables:
    bs, n_heads = tables.block_size, tables.lut_heads
    active = np.zeros((n_heads, tables.ctx_blks_q, tables.ctx_blks_k), dtype=bool)
    full = np.zeros_like(active)
    block_id = np.full(active.shape, -1, dtype=np.int64)
    for h in range(n_heads):
        qb, kb = tables.nt_lut[h, :, 0], tables.nt_lut[h, :, 1]
        active[h, qb, kb] = True
        full[h, qb, kb] = tables.full_blocks[h]
        block_id[h, qb, kb] = np.arange(tables.blocks)

    def mask_fn(head: int, q_blocks: np.ndarray, k_blocks: np.ndarray) -> np.ndarray:
        words = tables.mask_words[head, block_id[head, q_blocks, k_blocks]]  # [n, bs, W]
        bits = np.unpackbits(words.view(np.uint32).astype("<u4").view(np.uint8), axis=-1, bitorder="little")
        return bits[..., :bs].astype(bool)

    return build_fused_tables(active, bs, full, mask_fn)
