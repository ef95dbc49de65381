"""Tests of bsattn.tables: LUT contents, mask packing, validation, caching."""

import numpy as np
import pytest

from bsattn.patterns import Causal, Dense, Fixed, Local, get_callback
from bsattn.tables import BLOCK_SIZES, build_tables, tables_for_callback, tables_for_pattern

# 3 query-block rows x 4 key-block columns; row 1 is empty:
#   # . # .
#   . . . .
#   # # . #
LAYOUT = np.array([[1, 0, 1, 0], [0, 0, 0, 0], [1, 1, 0, 1]])


def test_luts_2d():
    t = build_tables(LAYOUT, 8)
    assert (t.block_size, t.lut_heads, t.ctx_blks_q, t.ctx_blks_k, t.blocks) == (8, 1, 3, 4, 5)
    np.testing.assert_array_equal(t.nt_lut, [[[0, 0], [0, 2], [2, 0], [2, 1], [2, 3]]])
    # Header (offset, count) per query row, offsets from ctx_blks_q = 3; then (block id, Kb).
    np.testing.assert_array_equal(t.nn_lut, [[[3, 2], [5, 0], [5, 3], [0, 0], [1, 2], [2, 0], [3, 1], [4, 3]]])
    # Header per key column, offsets from ctx_blks_k = 4; then (block id, Qb), ascending.
    np.testing.assert_array_equal(t.tn_lut, [[[4, 2], [6, 1], [7, 1], [8, 1], [0, 0], [2, 2], [3, 2], [1, 0], [4, 2]]])
    assert (t.nn_max, t.tn_max) == (3, 2)
    for lut in (t.nt_lut, t.nn_lut, t.tn_lut, t.mask_words):
        assert lut.dtype == np.int32 and not lut.flags.writeable
    assert not t.has_mask and t.full_blocks.all()
    np.testing.assert_array_equal(t.layout[0], LAYOUT != 0)


def test_luts_3d():
    # Head 0: LAYOUT; head 1 (also 5 blocks):
    #   . # # #
    #   # . . .
    #   . . . #
    layout = np.stack([LAYOUT, [[0, 1, 1, 1], [1, 0, 0, 0], [0, 0, 0, 1]]])
    t = build_tables(layout, 16, heads=2)
    assert (t.lut_heads, t.blocks, t.nn_max, t.tn_max) == (2, 5, 3, 2)
    np.testing.assert_array_equal(t.nt_lut[1], [[0, 1], [0, 2], [0, 3], [1, 0], [2, 3]])
    np.testing.assert_array_equal(t.nn_lut[1], [[3, 3], [6, 1], [7, 1], [0, 1], [1, 2], [2, 3], [3, 0], [4, 3]])
    np.testing.assert_array_equal(t.tn_lut[1], [[4, 1], [5, 1], [6, 1], [7, 2], [3, 1], [0, 0], [1, 0], [2, 0], [4, 2]])
    np.testing.assert_array_equal(t.nn_lut[0], build_tables(LAYOUT, 16).nn_lut[0])


def word_bit(words, i, j):
    return (int(words[i, j // 32]) >> (j % 32)) & 1


@pytest.mark.parametrize("bs", BLOCK_SIZES)
def test_mask_packing(bs):
    rng = np.random.default_rng(bs)
    layout = np.tril(np.ones((3, 3), dtype=int))
    masks = rng.random((3, 3, bs, bs)) < 0.5
    t = tables_for_callback(layout, bs, lambda shape, h, qb, kb, b: masks[qb, kb])
    assert t.mask_words.shape == (1, 6, bs, -(-bs // 32)) and t.has_mask
    kept = t.keep_masks()
    for b, (qb, kb) in enumerate(t.nt_lut[0]):
        np.testing.assert_array_equal(kept[0, b], masks[qb, kb])
        for i, j in [(0, 0), (bs - 1, bs - 1), (1, bs // 2 + 1), (bs // 3, 31 % bs)]:
            assert word_bit(t.mask_words[0, b], i, j) == masks[qb, kb, i, j]
    softmax_mask = t.softmax_mask_np
    if bs == 128:
        assert softmax_mask is None
        return
    assert softmax_mask.shape == (1, 6, bs) and softmax_mask.dtype == np.dtype(f"uint{bs}")
    b, (qb, kb) = 4, t.nt_lut[0, 4]
    for i in range(bs):
        assert int(softmax_mask[0, b, i]) == sum(1 << j for j in range(bs) if masks[qb, kb, i, j])


@pytest.mark.parametrize("bs", BLOCK_SIZES)
def test_unmasked_words(bs):
    t = build_tables(np.ones((2, 2)), bs)
    expected = [(1 << min(bs - 32 * w, 32)) - 1 for w in range(-(-bs // 32))]  # bits past bs stay 0
    np.testing.assert_array_equal(t.mask_words[0, 0, 0].view(np.uint32), expected)
    assert t.keep_masks().all()


def test_full_blocks_and_known_full():
    evaluated = []

    def mask_fn(head, q_blocks, k_blocks):
        evaluated.extend(zip(q_blocks.tolist(), k_blocks.tolist(), strict=True))
        return np.broadcast_to(np.tril(np.ones((8, 8), bool)), (q_blocks.size, 8, 8)).copy()

    layout = np.tril(np.ones((4, 4)))
    t = build_tables(layout, 8, mask_fn=mask_fn, known_full=np.tril(np.ones((4, 4)), -1))
    assert sorted(evaluated) == [(0, 0), (1, 1), (2, 2), (3, 3)]
    diagonal = t.nt_lut[0, :, 0] == t.nt_lut[0, :, 1]
    np.testing.assert_array_equal(t.full_blocks[0], ~diagonal)
    assert t.has_mask
    # Without the hint every block is evaluated; a block whose mask keeps everything counts as full.
    evaluated.clear()
    t2 = build_tables(np.ones((2, 2)), 8, mask_fn=lambda h, q, k: np.ones((q.size, 8, 8), bool))
    assert t2.full_blocks.all() and t2.has_mask


def test_callback_calls():
    calls = []

    def callback(blk_shape, head_idx, qry_idx, key_idx, blk_idx):
        calls.append((head_idx, qry_idx, key_idx, blk_idx))
        assert blk_shape == (8, 8)
        return np.ones(blk_shape, dtype=bool)

    layout = np.stack([LAYOUT, LAYOUT[:, ::-1]])
    tables_for_callback(layout, 8, callback)
    assert len(calls) == 10  # once per (lut head, block)
    assert calls[:5] == [(0, 0, 0, 0), (0, 0, 2, 1), (0, 2, 0, 2), (0, 2, 1, 3), (0, 2, 3, 4)]
    assert [c[0] for c in calls[5:]] == [1] * 5 and [c[3] for c in calls[5:]] == list(range(5))


def test_caching():
    layout = np.tril(np.ones((4, 4)))
    assert build_tables(layout, 8) is build_tables(layout.astype(bool), 8)
    assert build_tables(layout, 8) is not build_tables(layout, 16)
    assert tables_for_pattern(Causal(), 64, 64, 16) is tables_for_pattern(Causal(), 64, 64, 16)
    assert tables_for_pattern(Local(32), 64, 64, 16) is not tables_for_pattern(Local(16), 64, 64, 16)
    callback = get_callback("all")
    assert tables_for_callback(layout, 8, callback) is tables_for_callback(layout.copy(), 8, callback)
    assert tables_for_callback(layout, 8, callback) is not tables_for_callback(layout, 8, get_callback("all"))


def test_tables_for_pattern():
    t = tables_for_pattern(Fixed(32, 2, 1, 2, 8), 64, 64, 8, heads=2)
    assert t.lut_heads == 2 and t.blocks == 24 and t.has_mask
    dense = tables_for_pattern(Dense(), 32, 48, 16)
    assert not dense.has_mask and dense.blocks == 6
    causal = tables_for_pattern(Causal(), 64, 64, 16)
    assert causal.full_blocks.sum() == 6 and causal.blocks == 10


def layout_with(shape, counts):
    out = np.zeros(shape)
    for h, n in enumerate(counts):
        out[h].flat[:n] = 1
    return out


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: build_tables(np.ones(4), 8), "layout must be"),
        (lambda: build_tables(np.ones((1, 1, 2, 2)), 8), "layout must be"),
        (lambda: build_tables(np.ones((2, 2)), 24), "block_size"),
        (lambda: build_tables(np.ones((2, 2)), 4), "block_size"),
        (lambda: build_tables(np.zeros((2, 2)), 8), r"head\(s\) \[0\]"),
        (lambda: build_tables(layout_with((3, 2, 2), [1, 0, 1]), 8), r"head\(s\) \[1\]"),
        (lambda: build_tables(layout_with((2, 2, 2), [1, 2]), 8), r"equal across heads; got \[1, 2\]"),
        (lambda: build_tables(np.ones((3, 2, 2)), 8, heads=2), "heads=2"),
        (lambda: build_tables(np.ones((2, 2)), 8, mask_fn=lambda h, q, k: np.ones((q.size, 8, 8))), "mask_fn"),
        (lambda: tables_for_callback(np.ones((2, 2)), 8, lambda *a: np.ones((8, 4), bool)), "mask_callback"),
        (lambda: tables_for_callback(np.ones((2, 2)), 8, lambda *a: np.full((8, 8), 0.5)), "mask_callback"),
        (lambda: tables_for_pattern(Causal(), 64, 64, 12), "block_size"),
        (lambda: tables_for_pattern(Causal(), 64, 60, 16), "n_k=60"),
        (lambda: tables_for_pattern(Fixed(32, 2, 1, 2, 8), 64, 64, 8, heads=3), "heads=3"),
    ],
)
def test_validation(call, match):
    with pytest.raises(ValueError, match=match):
        call()
