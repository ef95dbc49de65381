"""Index tables of a block layout, in blocksparse's formats; computed once and cached.

For each layout head ("lut head") the active blocks ``(Qb, Kb)`` are listed row-major; the index in that list is
the block id ``b`` used by the block-sparse tensors ``[B, H, blocks, bs, bs]``. From that list:

- ``nt_lut [L, blocks, 2]``: ``(Qb, Kb)`` of block ``b``;
- ``nn_lut [L, ctx_blks_q + blocks, 2]``: a header ``(offset, count)`` per query-block row (offsets start at
  ``ctx_blks_q``), then the payload ``(block_id, Kb)`` row after row;
- ``tn_lut [L, ctx_blks_k + blocks, 2]``: a header per key-block column, then ``(block_id, Qb)``, ascending;
- ``mask_words [L, blocks, bs, W]`` (``W = ceil(bs / 32)``): bit ``j % 32`` of word ``j // 32`` of row ``i`` is set
  iff key column ``j`` is kept for query row ``i`` (int32 holding the uint32 bit pattern; bits past ``bs`` are 0);
- ``full_blocks [L, blocks]``: the block is kept entirely.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import numpy as np

from bsattn import _checks as checks
from bsattn.patterns import BlockLayout, MaskCallback, Pattern

BLOCK_SIZES = (8, 16, 32, 64, 128)

MaskFn = Callable[[int, np.ndarray, np.ndarray], np.ndarray]
"""``mask_fn(head, q_blocks [n], k_blocks [n]) -> bool [n, bs, bs]``: in-block masks of the given blocks."""

# Blocks per mask_fn call: bounds the temporary [n, bs, bs] masks to a few MB.
_MASK_CHUNK_ELEMS = 1 << 22
_SOFTMAX_MASK_DTYPES = {8: np.uint8, 16: np.uint16, 32: np.uint32, 64: np.uint64}


_INT32 = np.iinfo(np.int32)


def check_int32_table(array: object, name: str) -> np.ndarray:
    """``array`` as int32; a table of another kind (floats, booleans, entries outside int32) is a ``ValueError``
    naming it, instead of being truncated or wrapped by a conversion. Packed masks may be uint32 (bit patterns)."""
    a = np.asarray(array)
    if a.dtype == np.uint32 and name in ("mask_words", "masks"):
        a = a.view(np.int32)
    if a.dtype.kind not in "iu":
        raise ValueError(f"table {name} must hold integers, got dtype {a.dtype}")
    if a.size and (int(a.min()) < _INT32.min or int(a.max()) > _INT32.max):
        raise ValueError(
            f"table {name} has entries outside the int32 range [{_INT32.min}, {_INT32.max}]: "
            f"min {int(a.min())}, max {int(a.max())}"
        )
    return a.astype(np.int32, copy=False)


def check_table_fields(tables: object, names: tuple[str, ...]) -> None:
    """``check_int32_table`` on the named array fields of a tables dataclass (hand-built ones included)."""
    for name in names:
        check_int32_table(getattr(tables, name), name)


@dataclasses.dataclass(frozen=True, eq=False)
class BlockTables:
    """The tables of one (layout, block size, masks); arrays are read-only int32 unless noted."""

    block_size: int
    lut_heads: int
    ctx_blks_q: int
    ctx_blks_k: int
    blocks: int  # active blocks per lut head
    nn_max: int  # most blocks in a query-block row, over heads
    tn_max: int  # most blocks in a key-block column, over heads
    nt_lut: np.ndarray  # [L, blocks, 2]
    nn_lut: np.ndarray  # [L, ctx_blks_q + blocks, 2]
    tn_lut: np.ndarray  # [L, ctx_blks_k + blocks, 2]
    mask_words: np.ndarray  # [L, blocks, bs, ceil(bs/32)]
    full_blocks: np.ndarray  # bool [L, blocks]
    has_mask: bool  # False when built without mask_fn / callback: every block is fully kept

    def __post_init__(self) -> None:
        check_table_fields(self, ("nt_lut", "nn_lut", "tn_lut", "mask_words"))

    @property
    def layout(self) -> np.ndarray:
        """The active blocks → bool ``[L, ctx_blks_q, ctx_blks_k]``."""
        out = np.zeros((self.lut_heads, self.ctx_blks_q, self.ctx_blks_k), dtype=bool)
        heads = np.arange(self.lut_heads)[:, None]
        out[heads, self.nt_lut[..., 0], self.nt_lut[..., 1]] = True
        return out

    @functools.cached_property
    def softmax_mask_np(self) -> np.ndarray | None:
        """blocksparse's mask format → read-only ``[L, blocks, bs]`` uint8/16/32/64 for bs 8/16/32/64 (bit j =
        key column j), built on first access; None for bs 128, which blocksparse does not support."""
        dtype = _SOFTMAX_MASK_DTYPES.get(self.block_size)
        if dtype is None:
            return None
        words = self.mask_words.view(np.uint32).astype(np.uint64)
        packed = words[..., 0] if words.shape[-1] == 1 else words[..., 0] | (words[..., 1] << np.uint64(32))
        return _readonly(packed.astype(dtype))

    def keep_masks(self) -> np.ndarray:
        """The unpacked in-block masks → bool ``[L, blocks, bs, bs]`` (row = query offset, column = key offset)."""
        as_bytes = self.mask_words.view(np.uint32).astype("<u4").view(np.uint8)
        bits = np.unpackbits(as_bytes, axis=-1, bitorder="little")
        return bits[..., : self.block_size].astype(bool)


def _readonly(array: np.ndarray) -> np.ndarray:
    array.flags.writeable = False
    return array


def _header_lut(rows: np.ndarray, payload: np.ndarray, n_rows: int) -> tuple[np.ndarray, int]:
    """One head's nn/tn table: ``rows [blocks]`` (the grouping index, sorted) and ``payload [blocks, 2]``
    → int32 ``[n_rows + blocks, 2]``, and the largest group."""
    counts = np.bincount(rows, minlength=n_rows)
    offsets = n_rows + np.cumsum(counts) - counts  # empty rows point where the next row starts
    header = np.stack([offsets, counts], axis=1)
    return np.concatenate([header, payload]).astype(np.int32), int(counts.max())


def _pack_rows(masks: np.ndarray) -> np.ndarray:
    """bool ``[n, bs, bs]`` → int32 ``[n, bs, ceil(bs/32)]``, bit j % 32 of word j // 32 = column j."""
    n, bs, _ = masks.shape
    packed = np.packbits(masks, axis=-1, bitorder="little")  # [n, bs, bs/8], bit j%8 of byte j//8
    width = -(-bs // 32) * 4
    padded = np.zeros((n, bs, width), dtype=np.uint8)
    padded[..., : packed.shape[-1]] = packed
    return padded.view("<u4").view(np.int32)


def _check_layout(layout: np.ndarray, block_size: int, heads: int | None) -> np.ndarray:
    """Validate → bool ``[L, nQb, nKb]``."""
    layout = np.asarray(layout)
    if layout.ndim not in (2, 3):
        raise ValueError(f"layout must be [nQb, nKb] or [L, nQb, nKb], got shape {layout.shape}")
    checks.choice("block_size", block_size, BLOCK_SIZES)
    if 0 in layout.shape:
        raise ValueError(f"layout must have at least one query and one key block, got shape {layout.shape}")
    layout = np.ascontiguousarray(layout != 0).reshape((-1,) + layout.shape[-2:])
    if heads is not None and layout.shape[0] not in (1, heads):
        raise ValueError(f"layout has {layout.shape[0]} heads; with heads={heads} it must have 1 or {heads}")
    counts = layout.sum(axis=(1, 2))
    if (counts == 0).any():
        raise ValueError(f"layout head(s) {np.flatnonzero(counts == 0).tolist()} have no active block")
    if (counts != counts[0]).any():
        raise ValueError(f"number of layout blocks must be equal across heads; got {counts.tolist()} per head")
    return layout


def build_tables(
    layout: np.ndarray,
    block_size: int,
    heads: int | None = None,
    mask_fn: MaskFn | None = None,
    known_full: np.ndarray | None = None,
) -> BlockTables:
    """The tables of ``layout [nQb, nKb]`` or ``[L, nQb, nKb]`` (nonzero = active).

    ``mask_fn(head, q_blocks, k_blocks) -> bool [n, bs, bs]`` gives in-block masks (``head`` = lut head); None
    means every block is kept entirely. ``known_full`` (bool, the layout's shape) marks blocks known to be full,
    for which ``mask_fn`` is not called. ``heads``, if given, only checks ``L in (1, heads)``. Results are cached
    on (layout content, block_size, mask_fn, known_full): an identical call returns the same object, so
    ``mask_fn`` should compare by value (as ``tables_for_pattern``'s does) or be reused.
    """
    layout = _check_layout(layout, block_size, heads)
    full_key = None
    if mask_fn is not None and known_full is not None:
        known_full = np.ascontiguousarray(np.broadcast_to(np.asarray(known_full, dtype=bool), layout.shape))
        full_key = known_full.tobytes()
    return _build_cached(layout.shape, layout.tobytes(), block_size, mask_fn, full_key)


@functools.lru_cache(maxsize=32)
def _build_cached(shape, layout_bytes, block_size, mask_fn, full_bytes) -> BlockTables:
    layout = np.frombuffer(layout_bytes, dtype=bool).reshape(shape)
    known_full = None if full_bytes is None else np.frombuffer(full_bytes, dtype=bool).reshape(shape)
    n_heads, n_qb, n_kb = shape
    nt, nn, tn, words, full = [], [], [], [], []
    nn_max = tn_max = 0
    for h in range(n_heads):
        qb, kb = np.nonzero(layout[h])  # row-major: the block ids
        ids = np.arange(qb.size)
        nt.append(np.stack([qb, kb], axis=1))
        lut, longest = _header_lut(qb, np.stack([ids, kb], axis=1), n_qb)
        nn.append(lut)
        nn_max = max(nn_max, longest)
        by_col = np.argsort(kb, kind="stable")  # stable: ascending block id (= ascending Qb) within a column
        lut, longest = _header_lut(kb[by_col], np.stack([ids[by_col], qb[by_col]], axis=1), n_kb)
        tn.append(lut)
        tn_max = max(tn_max, longest)
        w, f = _head_masks(h, qb, kb, block_size, mask_fn, None if known_full is None else known_full[h][qb, kb])
        words.append(w)
        full.append(f)
    return BlockTables(
        block_size=block_size,
        lut_heads=n_heads,
        ctx_blks_q=n_qb,
        ctx_blks_k=n_kb,
        blocks=int(nt[0].shape[0]),
        nn_max=nn_max,
        tn_max=tn_max,
        nt_lut=_readonly(np.array(nt, dtype=np.int32)),
        nn_lut=_readonly(np.array(nn, dtype=np.int32)),
        tn_lut=_readonly(np.array(tn, dtype=np.int32)),
        mask_words=_readonly(np.array(words)),
        full_blocks=_readonly(np.array(full)),
        has_mask=mask_fn is not None,
    )


def _head_masks(head, qb, kb, block_size, mask_fn, known_full) -> tuple[np.ndarray, np.ndarray]:
    """Packed masks ``[blocks, bs, W]`` and full flags ``[blocks]`` of one lut head."""
    all_kept = _pack_rows(np.ones((1, block_size, block_size), dtype=bool))
    words = np.broadcast_to(all_kept, (qb.size,) + all_kept.shape[1:]).copy()
    if mask_fn is None:
        return words, np.ones(qb.size, dtype=bool)
    todo = np.arange(qb.size) if known_full is None else np.flatnonzero(~known_full)
    chunk = max(1, _MASK_CHUNK_ELEMS // (block_size * block_size))
    for s in range(0, todo.size, chunk):
        sel = todo[s : s + chunk]
        masks = np.asarray(mask_fn(head, qb[sel], kb[sel]))
        if masks.shape != (sel.size, block_size, block_size) or masks.dtype != bool:
            raise ValueError(
                f"mask_fn returned {masks.dtype} {masks.shape}; expected bool {(sel.size, block_size, block_size)}"
            )
        words[sel] = _pack_rows(masks)
    return words, (words == all_kept).all(axis=(1, 2))


@dataclasses.dataclass(frozen=True)
class PatternMasks:
    """``mask_fn`` of a pattern at given sizes; compares by value so that build_tables' cache can hit."""

    pattern: Pattern
    n_q: int
    n_k: int
    block_size: int

    def __call__(self, head: int, q_blocks: np.ndarray, k_blocks: np.ndarray) -> np.ndarray:
        return self.pattern.block_masks(head, q_blocks, k_blocks, self.block_size, self.n_q, self.n_k)


@functools.lru_cache(maxsize=32)
def tables_for_pattern(pattern: Pattern, n_q: int, n_k: int, block_size: int, heads: int | None = None) -> BlockTables:
    """The tables of ``pattern`` for ``n_q`` queries and ``n_k`` keys (cached).

    ``lut_heads`` = ``pattern.num_layouts``. Without partially kept blocks (e.g. ``Dense``) the tables have no
    mask (``has_mask`` False), so the unmasked softmax can be used.
    """
    checks.choice("block_size", block_size, BLOCK_SIZES)
    active, full = pattern.block_classes(n_q, n_k, block_size)
    if (full == active).all():
        return build_tables(active, block_size, heads)
    return build_tables(active, block_size, heads, PatternMasks(pattern, n_q, n_k, block_size), full)


def tables_for_callback(
    layout: np.ndarray, block_size: int, mask_callback: MaskCallback | None, heads: int | None = None
) -> BlockTables:
    """The tables of a raw ``layout`` plus a blocksparse ``mask_callback(blk_shape, head_idx, qry_idx, key_idx,
    blk_idx)``, called once per (lut head, block) as in blocksparse. Cached by layout content and the callable."""
    layout = _check_layout(layout, block_size, heads)
    if mask_callback is None:
        return build_tables(layout, block_size, heads)
    pattern = BlockLayout(layout, block_size, mask_callback)
    n_q, n_k = layout.shape[1] * block_size, layout.shape[2] * block_size
    return build_tables(layout, block_size, heads, PatternMasks(pattern, n_q, n_k, block_size))
