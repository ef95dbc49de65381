"""The fused op's tables (bsattn.fused_tables): hand-drawn grids, per-head block counts, mask classification and
deduplication, agreement with the patterns' token masks and with the unfused tables, caching and speed."""

import time

import numpy as np
import pytest
from conftest import RandomCallback, causal_callback, random_layout

from bsattn import patterns
from bsattn.fused_tables import (
    FusedTables,
    build_fused_tables,
    from_block_tables,
    fused_tables_for_layout,
    fused_tables_for_pattern,
)
from bsattn.tables import build_tables, tables_for_callback, tables_for_pattern


def grid(picture: str) -> np.ndarray:
    """ASCII block map → (active, full) bool [nQb, nKb]: '#' full, '+' partial, '.' inactive."""
    rows = [line.split()[-1] for line in picture.strip().splitlines()]
    cells = np.array([list(r) for r in rows])
    return cells != ".", cells == "#"


def lower_triangle(head, q_blocks, k_blocks, bs=8):
    """Partial masks for the grid tests: causal inside the block → bool [n, bs, bs]."""
    return np.broadcast_to(np.tril(np.ones((bs, bs), dtype=bool)), (len(q_blocks), bs, bs)).copy()


def transposed(tables: FusedTables, head: int) -> np.ndarray:
    """Blocks (Kb, Qb, mask_id) listed by the column table of ``head`` → int [n, 3], column-major."""
    out = []
    for kb in range(tables.n_k_blocks):
        for qb, mask_id in tables.col_entries[tables.col_ptr[head, kb] : tables.col_ptr[head, kb + 1]]:
            out.append((kb, qb, mask_id))
    return np.array(out, dtype=np.int64).reshape(-1, 3)


def check_columns_match_rows(tables: FusedTables) -> None:
    for h in range(tables.lut_heads):
        qb, kb, mask_id = tables.block_coords(h)
        by_col = np.lexsort((qb, kb))
        expected = np.stack([kb[by_col], qb[by_col], mask_id[by_col]], axis=1)
        np.testing.assert_array_equal(transposed(tables, h), expected)


def test_hand_drawn_grid():
    active, full = grid(
        """
        Qb0 #...
        Qb1 ++..
        Qb2 ....
        Qb3 #.+#
        """
    )
    t = build_fused_tables(active, 8, full, lower_triangle)
    assert (t.lut_heads, t.n_q_blocks, t.n_k_blocks, t.n_q, t.n_k) == (1, 4, 4, 32, 32)
    np.testing.assert_array_equal(t.row_ptr, [[0, 1, 3, 3, 6]])  # row 2 is empty
    np.testing.assert_array_equal(t.row_entries, [[0, -1], [0, 0], [1, 0], [0, -1], [2, 0], [3, -1]])
    np.testing.assert_array_equal(t.col_ptr, [[0, 3, 4, 5, 6]])
    np.testing.assert_array_equal(t.col_entries, [[0, -1], [1, 0], [3, -1], [1, 0], [3, 0], [3, -1]])
    # The three partial blocks share one mask: the lower triangle, bit j of row i set iff j <= i.
    assert t.masks.shape == (1, 8, 1)
    np.testing.assert_array_equal(t.masks[0, :, 0], [(1 << (i + 1)) - 1 for i in range(8)])
    assert t.masks.dtype == np.int32 and not t.masks.flags.writeable and not t.row_ptr.flags.writeable
    np.testing.assert_array_equal(t.layout[0], active)
    np.testing.assert_array_equal(t.blocks_per_head, [6])


def test_per_head_block_counts_and_global_offsets():
    layout = np.zeros((3, 2, 3), dtype=bool)
    layout[0] = [[1, 0, 0], [0, 0, 0]]  # 1 block
    layout[1] = [[1, 1, 1], [1, 1, 1]]  # 6 blocks
    layout[2] = [[0, 0, 0], [0, 0, 0]]  # none: every output row of this head is 0
    t = build_fused_tables(layout, 16)
    np.testing.assert_array_equal(t.blocks_per_head, [1, 6, 0])
    np.testing.assert_array_equal(t.row_ptr, [[0, 1, 1], [1, 4, 7], [7, 7, 7]])
    np.testing.assert_array_equal(t.col_ptr, [[0, 1, 1, 1], [1, 3, 5, 7], [7, 7, 7, 7]])
    assert (t.row_entries[:, 1] == -1).all() and t.masks.shape == (0, 16, 1)
    np.testing.assert_array_equal(t.layout, layout)
    check_columns_match_rows(t)


def test_mask_classification_and_deduplication():
    """Partial blocks whose mask keeps everything become full, those keeping nothing are dropped, equal masks
    are stored once."""
    bs = 8
    active = np.ones((1, 2, 3), dtype=bool)
    full = np.zeros_like(active)
    tril = np.tril(np.ones((bs, bs), dtype=bool))

    def mask_fn(head, q_blocks, k_blocks):
        masks = {0: np.ones((bs, bs), bool), 1: np.zeros((bs, bs), bool), 2: tril}
        return np.stack([masks[int(k)] if q == 0 else tril.T for q, k in zip(q_blocks, k_blocks)])

    t = build_fused_tables(active, bs, full, mask_fn)
    qb, kb, mask_id = t.block_coords(0)
    np.testing.assert_array_equal(qb, [0, 0, 1, 1, 1])  # block (0, 1) kept nothing: dropped
    np.testing.assert_array_equal(kb, [0, 2, 0, 1, 2])
    assert mask_id[0] == -1  # all kept: a full block
    assert len(set(mask_id[2:])) == 1 and mask_id[1] != mask_id[2]  # tril.T stored once
    assert t.masks.shape == (2, bs, 1)
    unpacked = t.unpacked_masks()
    np.testing.assert_array_equal(unpacked[mask_id[1]], tril)
    np.testing.assert_array_equal(unpacked[mask_id[2]], tril.T)


PATTERNS = [
    (patterns.Causal(), 64, 64, 8),
    (patterns.Causal(), 32, 64, 16),  # Tq != Tk
    (patterns.Dense(), 32, 48, 16),
    (patterns.Local(24), 64, 64, 8),
    (patterns.Strided(4), 64, 64, 16),
    (patterns.Fixed(32, 2, 1, 4, 8), 96, 96, 8),  # per-head layouts
    (patterns.Causal() & patterns.Local(16) | patterns.Fixed(32, 1, 1, 2, 8), 64, 64, 8),
]


@pytest.mark.parametrize("pattern, n_q, n_k, bs", PATTERNS, ids=[repr(p[0])[:40] for p in PATTERNS])
def test_pattern_token_mask(pattern, n_q, n_k, bs):
    t = fused_tables_for_pattern(pattern, n_q, n_k, bs)
    assert t.lut_heads == pattern.num_layouts
    np.testing.assert_array_equal(t.token_mask(), pattern.token_mask(n_q, n_k))
    check_columns_match_rows(t)
    # Full blocks carry no mask; partial ones one that is neither all kept nor empty.
    unpacked = t.unpacked_masks()
    assert not unpacked.all(axis=(1, 2)).any() and unpacked.any(axis=(1, 2)).all()
    assert len(np.unique(t.masks.reshape(len(t.masks), bs * t.masks.shape[2]), axis=0)) == len(t.masks)


def test_from_block_tables_of_a_mode():
    bst_tables = tables_for_pattern(patterns.mode_pattern("fixed", 128, 4, 32, blocksize=16, num_verts=2), 128, 128, 16)
    t = from_block_tables(bst_tables)
    assert t is from_block_tables(bst_tables)
    from bsattn.reference import token_mask_from_tables

    np.testing.assert_array_equal(t.token_mask(), token_mask_from_tables(bst_tables, bst_tables.lut_heads))


def test_from_block_tables_with_callback(rng):
    layout = random_layout(rng, 4, 5, 3, density=0.5)
    bst_tables = tables_for_callback(layout, 8, RandomCallback(7, keep=0.6, masked_queries=(3,)))
    t = from_block_tables(bst_tables)
    from bsattn.reference import token_mask_from_tables

    np.testing.assert_array_equal(t.token_mask(), token_mask_from_tables(bst_tables, 3))
    check_columns_match_rows(t)
    # Without masks every block is full.
    plain = from_block_tables(build_tables(layout, 8))
    assert (plain.row_entries[:, 1] == -1).all() and len(plain.masks) == 0


def test_layout_with_callback_matches_pattern(rng):
    layout = random_layout(rng, 3, 4, 2, density=0.6, equal_counts=False)
    t = fused_tables_for_layout(layout, 16, causal_callback)
    expected = patterns.BlockLayout(layout, 16, causal_callback).token_mask(48, 64)
    np.testing.assert_array_equal(t.token_mask(), expected)
    assert t is fused_tables_for_layout(layout, 16, causal_callback)  # cached by content


def test_cached():
    a = fused_tables_for_pattern(patterns.Causal(), 64, 64, 16)
    assert a is fused_tables_for_pattern(patterns.Causal(), 64, 64, 16)


def test_fast_at_long_context():
    """T = 65536 at block size 64: full blocks come from the analytic classes, only partial ones are unpacked."""
    start = time.perf_counter()
    t = fused_tables_for_pattern(patterns.Fixed(256, 4, 1, 4, 64), 65536, 65536, 64)
    s = fused_tables_for_pattern(patterns.Strided(256), 65536, 65536, 64)
    elapsed = time.perf_counter() - start
    assert elapsed < 5.0, f"{elapsed:.1f} s"
    assert t.lut_heads == 4 and len(t.masks) == 1 and 0.1 < t.density < 0.15
    assert s.lut_heads == 1 and len(s.masks) == 1


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: build_fused_tables(np.ones((2, 2)), 12), r"block_size must be one of"),
        (lambda: build_fused_tables(np.ones(4), 8), r"active must be \[nQb, nKb\] or \[L, nQb, nKb\]"),
        (lambda: build_fused_tables(np.ones((2, 2)), 8, np.zeros((2, 2))), r"mask_fn is required"),
        (
            lambda: build_fused_tables(np.ones((2, 2)), 8, np.zeros((2, 2)), lambda h, q, k: np.ones((len(q), 4, 4))),
            r"mask_fn returned float64 \(4, 4, 4\); expected bool \(4, 8, 8\)",
        ),
        (lambda: fused_tables_for_pattern(patterns.Causal(), 60, 64, 16), r"n_q=60 must be a multiple of block_size"),
        (lambda: fused_tables_for_layout(np.ones((2, 2)), 24), r"block_size must be one of"),
    ],
)
def test_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()
