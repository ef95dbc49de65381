"""Tests of bsattn.patterns: pictures, token/block consistency, sparse_attention equivalence, validation."""

import os
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from bsattn import reference
from bsattn.patterns import (
    BlockLayout,
    Causal,
    Dense,
    Fixed,
    Intersection,
    Local,
    Strided,
    Union,
    dense_attn_mask,
    get_callback,
    mode_pattern,
    strided_permutation,
)
from bsattn.tables import tables_for_callback


def picture(text: str) -> str:
    return textwrap.dedent(text).strip()


# ---- hand-drawn pictures (8 blocks of 8 tokens) ------------------------------------------------------------

CAUSAL_8 = """
    +.......
    #+......
    ##+.....
    ###+....
    ####+...
    #####+..
    ######+.
    #######+
"""

LOCAL_16_8 = """
    +.......
    #+......
    +#+.....
    .+#+....
    ..+#+...
    ...+#+..
    ....+#+.
    .....+#+
"""

# bT = 64 // 4 = 16 tokens = 2 blocks per residue class.
STRIDED_4_8 = """
    +.......
    #+......
    ..+.....
    ..#+....
    ....+...
    ....#+..
    ......+.
    ......#+
"""

# L = 32 tokens = 4 blocks; head 0 summarises block column 3 of each chunk, head 1 column 2.
FIXED_HEAD0 = """
    +.......
    #+......
    ##+.....
    ###+....
    ...#+...
    ...##+..
    ...###+.
    ...####+
"""

FIXED_HEAD1 = """
    +.......
    #+......
    ##+.....
    ###+....
    ..#.+...
    ..#.#+..
    ..#.##+.
    ..#.###+
"""

FIXED = Fixed(local_attn_ctx=32, num_verts=2, vertsize=1, num_heads=2, block_size=8)


def layout_from_picture(text: str) -> np.ndarray:
    return np.array([[c != "." for c in row] for row in picture(text).splitlines()])


@pytest.mark.parametrize(
    "pattern, head, expected",
    [
        (Causal(), 0, CAUSAL_8),
        (Local(16), 0, LOCAL_16_8),
        (Strided(4), 0, STRIDED_4_8),
        (FIXED, 0, FIXED_HEAD0),
        (FIXED, 1, FIXED_HEAD1),
    ],
)
def test_layout_pictures(pattern, head, expected):
    assert pattern.layout_ascii(64, block_size=8, head=head) == picture(expected)
    layout = pattern.block_layout(64, 64, 8)[pattern.layout_index(head)]
    np.testing.assert_array_equal(layout, layout_from_picture(expected))


def test_rectangular_picture():
    assert Causal().layout_ascii(16, 32, block_size=8) == "+...\n#+.."


def test_strided_token_pictures():
    transposed = """
        #.......
        ##......
        ###.....
        ####....
        ....#...
        ....##..
        ....###.
        ....####
    """
    original = """
        #.......
        .#......
        #.#.....
        .#.#....
        #.#.#...
        .#.#.#..
        #.#.#.#.
        .#.#.#.#
    """
    assert Strided(2).token_ascii(8) == picture(transposed)
    perm = strided_permutation(8, 2)
    np.testing.assert_array_equal(perm, [0, 2, 4, 6, 1, 3, 5, 7])
    back = Strided(2).token_mask(8)[0][np.ix_(np.argsort(perm), np.argsort(perm))]
    assert "\n".join("".join("#" if v else "." for v in row) for row in back) == picture(original)


# ---- token mask == block layout expanded with the in-block masks ------------------------------------------


def expand(pattern, n_q, n_k, bs):
    """Token mask rebuilt from block_layout + block_masks → bool [P, n_q, n_k]."""
    layout = pattern.block_layout(n_q, n_k, bs)
    out = np.zeros((layout.shape[0], n_q, n_k), dtype=bool)
    for h in range(layout.shape[0]):
        qb, kb = np.nonzero(layout[h])
        masks = pattern.block_masks(h, qb, kb, bs, n_q, n_k)
        view = out[h].reshape(n_q // bs, bs, n_k // bs, bs).transpose(0, 2, 1, 3)
        view[qb, kb] = masks
    return out


def check_blocks(pattern, n_q, n_k, bs):
    tokens = pattern.token_mask(n_q, n_k)
    np.testing.assert_array_equal(expand(pattern, n_q, n_k, bs), tokens)
    active, full = pattern.block_classes(n_q, n_k, bs)
    grid = tokens.reshape(tokens.shape[0], n_q // bs, bs, n_k // bs, bs)
    np.testing.assert_array_equal(active, grid.any(axis=(2, 4)))
    np.testing.assert_array_equal(full, grid.all(axis=(2, 4)))


CASES = [
    (Causal(), 64, 64, 8),
    (Causal(), 32, 96, 16),
    (Causal(), 96, 32, 8),
    (Dense(), 48, 32, 16),
    (Local(8), 64, 64, 8),
    (Local(32), 128, 128, 16),
    (Local(48), 96, 64, 16),
    (Local(256), 64, 64, 32),
    (Strided(4), 64, 64, 8),
    (Strided(8), 256, 256, 16),
    (Strided(2), 32, 32, 16),
    (Fixed(32, 1, 1, 4, 8), 128, 128, 8),
    (Fixed(32, 4, 1, 4, 8), 128, 128, 8),
    (Fixed(64, 2, 2, 4, 8), 192, 192, 8),
    (Fixed(48, 3, 1, 3, 16), 96, 96, 16),
    (Fixed(32, 1, 4, 2, 8), 96, 64, 8),
]


@pytest.mark.parametrize("pattern, n_q, n_k, bs", CASES, ids=lambda x: repr(x))
def test_token_mask_matches_blocks(pattern, n_q, n_k, bs):
    check_blocks(pattern, n_q, n_k, bs)


@pytest.mark.parametrize("bs", [8, 16, 32, 64])
def test_fixed_blocks_at_other_block_sizes(bs):
    # The analytic block classes of Fixed hold for any block size, not only the one defining its summary width.
    check_blocks(Fixed(64, 2, 2, 2, 16), 192, 192, bs)
    check_blocks(Fixed(48, 3, 1, 3, 16), 96, 96, bs // 2 if bs == 64 else bs)


def test_combinations():
    union = Local(16) | Strided(4)
    inter = Causal() & Fixed(16, 2, 1, 2, 8) & Local(24)
    assert isinstance(union, Union) and isinstance(inter, Intersection)
    assert repr(union) == "(Local(local_attn_ctx=16) | Strided(local_attn_ctx=4))"
    np.testing.assert_array_equal(union.token_mask(64), Local(16).token_mask(64) | Strided(4).token_mask(64))
    np.testing.assert_array_equal(inter.token_mask(64), Fixed(16, 2, 1, 2, 8).token_mask(64) & Local(24).token_mask(64))
    assert inter.num_layouts == 2
    for pattern in (union, inter, Local(8) | Local(16) | Dense(), (Local(8) | Strided(8)) & Causal()):
        check_blocks(pattern, 64, 64, 8)
    # A union of two partial blocks can be full: keys 0-3 from one side, 4-7 from the other.
    left = BlockLayout(np.ones((1, 1)), 8, lambda s, h, q, k, b: np.arange(8)[None, :].repeat(8, 0) < 4)
    right = BlockLayout(np.ones((1, 1)), 8, lambda s, h, q, k, b: np.arange(8)[None, :].repeat(8, 0) >= 4)
    assert (left | right).layout_ascii(8, block_size=8) == "#"
    assert (left & right).layout_ascii(8, block_size=8) == "."


def test_hashable_and_equal():
    assert Local(32) == Local(32) and hash(Local(32)) == hash(Local(32))
    assert Local(32) != Strided(32) and Causal() != Dense()
    assert len({Causal(), Causal(), Local(8), Local(np.int64(8))}) == 2
    assert Fixed(32, 2, 1, 2, 8) | Causal() == Fixed(32, 2, 1, 2, 8) | Causal()
    layout = np.tril(np.ones((4, 4)))
    assert BlockLayout(layout, 8) == BlockLayout(layout.astype(bool), 8)
    assert hash(BlockLayout(layout, 8)) == hash(BlockLayout(layout * 3, 8))
    assert BlockLayout(layout, 8) != BlockLayout(layout, 16)
    assert "Fixed(local_attn_ctx=32, num_verts=2" in repr(FIXED)


def test_block_layout_adapter():
    rng = np.random.default_rng(1)
    layout = rng.random((2, 3, 5)) < 0.5
    masks = rng.random((2, 3, 5, 8, 8)) < 0.5

    def callback(blk_shape, head_idx, qry_idx, key_idx, blk_idx):
        return masks[head_idx, qry_idx, key_idx]

    pattern = BlockLayout(layout, 8, callback)
    assert pattern.num_layouts == 2
    tokens = pattern.token_mask(24, 40)
    expected = (masks & layout[..., None, None]).transpose(0, 1, 3, 2, 4).reshape(2, 24, 40)
    np.testing.assert_array_equal(tokens, expected)
    np.testing.assert_array_equal(pattern.block_layout(24, 40, 8), layout)  # the raw layout, even if a mask is empty
    np.testing.assert_array_equal(pattern.full_blocks(24, 40, 8), np.zeros_like(layout))
    np.testing.assert_array_equal(BlockLayout(layout[0], 8).full_blocks(24, 40, 8), layout[:1])


# ---- sparse_attention equivalence -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "n, mode, ctx",
    [
        (64, "all", None),
        (96, "all", None),
        (64, "local", 8),
        (128, "local", 32),
        (64, "local", 104),
        (64, "strided", 4),
        (256, "strided", 8),
        (512, "strided", 16),
    ],
)
def test_dense_attn_mask_equivalence(n, mode, ctx):
    pattern = mode_pattern(mode, n, 4, ctx, blocksize=8)
    mask = dense_attn_mask(n, mode, ctx)
    assert mask.shape == (1, 1, n, n) and mask.dtype == np.float32
    tokens = pattern.token_mask(n)[0]
    if mode == "strided":
        perm = strided_permutation(n, ctx)
        np.testing.assert_array_equal(tokens, mask[0, 0][np.ix_(perm, perm)] == 1)
        i, j = np.arange(n)[:, None], np.arange(n)[None, :]
        np.testing.assert_array_equal(mask[0, 0] == 1, (j <= i) & ((i - j) % ctx == 0))
    else:
        np.testing.assert_array_equal(tokens, mask[0, 0] == 1)


def spec_layout(mode, n, bs, ctx=None, num_verts=1, vertsize=1, heads=1):
    """get_blocksparse_obj's layout, restated in block units from the spec → [1 or heads, nb, nb]."""
    nb = n // bs
    qb, kb = np.arange(nb)[:, None], np.arange(nb)[None, :]
    causal = kb <= qb
    if mode == "all":
        return causal[None]
    if mode == "local":
        return (causal & (qb - kb <= ctx // bs))[None]
    if mode == "strided":
        chunks = n // ctx // bs
        return (causal & (kb >= qb - qb % chunks))[None]
    stride = ctx // bs
    rows = np.arange(stride - 1, -1, -1).reshape(-1, vertsize)
    heads_out = heads if num_verts > 1 else 1
    return np.stack(
        [
            causal & ((kb // stride == qb // stride) | np.isin(kb % stride, rows[h % num_verts]))
            for h in range(heads_out)
        ]
    )


@pytest.mark.parametrize(
    "mode, n, bs, ctx, num_verts, vertsize, heads",
    [
        ("all", 128, 8, None, None, None, 2),
        ("local", 128, 8, 16, None, None, 2),
        ("local", 256, 16, 64, None, None, 1),
        ("strided", 256, 8, 8, None, None, 2),
        ("strided", 512, 16, 16, None, None, 1),
        ("fixed", 256, 8, 32, 1, 1, 2),
        ("fixed", 256, 8, 32, 4, 1, 4),
        ("fixed", 256, 8, 64, 2, 2, 4),
        ("fixed", 256, 16, 64, 2, 2, 2),
        ("fixed", 384, 8, 96, 3, 4, 6),
        ("fixed", 256, 8, 64, 1, 8, 1),
    ],
)
def test_modes_match_spec_layout_and_callback(mode, n, bs, ctx, num_verts, vertsize, heads):
    pattern = mode_pattern(mode, n, heads, ctx, blocksize=bs, num_verts=num_verts, vertsize=vertsize)
    expected = spec_layout(mode, n, bs, ctx, num_verts or 1, vertsize or 1, heads)
    np.testing.assert_array_equal(pattern.block_layout(n, n, bs), expected)
    # The original's layout + its callback, expanded token by token, is exactly the pattern's token mask.
    tables = tables_for_callback(expected, bs, get_callback(mode, ctx))
    tokens = reference.token_mask_from_tables(tables, heads)
    np.testing.assert_array_equal(tokens, np.broadcast_to(pattern.token_mask(n), tokens.shape))
    check_blocks(pattern, n, n, bs)


def test_fixed_closed_form():
    pattern = Fixed(local_attn_ctx=64, num_verts=2, vertsize=2, num_heads=4, block_size=8)
    i, j = np.arange(256)[:, None], np.arange(256)[None, :]
    c = 16
    for h in range(4):
        g = h % 2
        lo, hi = 64 - (g + 1) * c, 64 - g * c - 1
        expected = (j <= i) & ((j // 64 == i // 64) | ((j % 64 >= lo) & (j % 64 <= hi)))
        np.testing.assert_array_equal(pattern.token_mask(256)[h], expected)
    assert pattern.num_layouts == 4 and Fixed(64, 1, 2, 4, 8).num_layouts == 1


@pytest.mark.parametrize(
    "mode, ctx, num_verts, vertsize, expected",
    [
        ("all", None, None, None, 528),
        ("local", 32, None, None, 63),
        ("local", 128, None, None, 150),
        ("strided", 32, None, None, 32),
        ("strided", 16, None, None, 48),
        ("fixed", 128, 4, 1, 192),
        ("fixed", 128, 2, 2, 304),
        ("fixed", 256, 1, 4, 336),
    ],
)
def test_spec_block_counts(mode, ctx, num_verts, vertsize, expected):
    pattern = mode_pattern(mode, 1024, 4, ctx, blocksize=32, num_verts=num_verts, vertsize=vertsize)
    counts = pattern.block_layout(1024, 1024, 32).sum(axis=(1, 2))
    assert counts.tolist() == [expected] * len(counts)


def test_fixed_defaults():
    assert mode_pattern("fixed", 256, 4, 64, blocksize=8) == Fixed(64, 1, 1, 4, 8)


def test_get_callback():
    local = get_callback("local", 16)
    pattern = Local(16)
    for qb, kb in [(2, 2), (2, 1), (2, 0), (3, 0)]:
        np.testing.assert_array_equal(local((8, 8), 0, qb, kb, 0), pattern.block_masks(0, [qb], [kb], 8, 64, 64)[0])
    for mode in ("all", "strided", "fixed"):
        cb = get_callback(mode)
        np.testing.assert_array_equal(cb((8, 8), 0, 3, 3, 7), np.tril(np.ones((8, 8), bool)))
        assert cb((8, 8), 0, 3, 1, 7).all()


def test_large_layouts_are_fast():
    start = time.perf_counter()
    for pattern in (Causal(), Local(1024), Strided(256), Fixed(512, 4, 2, 4, 64)):
        pattern.block_classes(65536, 65536, 64)
    assert time.perf_counter() - start < 2.0


# ---- validation ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: Local(0), "local_attn_ctx"),
        (lambda: Local(24).block_layout(64, 64, 16), "local_attn_ctx=24 must be a multiple of block_size"),
        (lambda: Local(16).block_layout(60, 64, 8), "n_q=60"),
        (lambda: Local(16).block_layout(64, 60, 8), "n_k=60"),
        (lambda: Causal().token_mask(0), "n_q"),
        (lambda: Strided(3).token_mask(64), "local_attn_ctx=3"),
        (lambda: Strided(4).block_layout(64, 64, 32), "block_size=32"),
        (lambda: Strided(4).token_mask(64, 32), "n_k=32"),
        (lambda: Fixed(32, 3, 1, 4, 8), "num_heads=4"),
        (lambda: Fixed(32, 1, 8, 4, 8), "vertsize=8"),
        (lambda: Fixed(48, 1, 4, 4, 8), "vertsize=4"),
        (lambda: Fixed(32, 4, 2, 4, 8), "num_verts=4"),
        (lambda: Fixed(36, 1, 1, 4, 8), "local_attn_ctx=36"),
        (lambda: Fixed(32, 1, 1, 0, 8), "num_heads"),
        (lambda: mode_pattern("sparse", 64, 4), "all, local, strided, fixed"),
        (lambda: mode_pattern("local", 64, 4), "local_attn_ctx"),
        (lambda: mode_pattern("strided", 64, 4, 4, blocksize=32), "block_size=32"),
        (lambda: mode_pattern("local", 64, 4, 12, blocksize=8), "local_attn_ctx=12"),
        (lambda: get_callback("dense"), "valid modes"),
        (lambda: dense_attn_mask(64, "fixed", 16), "'all', 'local', 'strided'"),
        (lambda: strided_permutation(10, 4), "local_attn_ctx=4"),
        (lambda: Fixed(32, 2, 1, 2, 8) | Fixed(32, 4, 1, 4, 8), "per-head layouts"),
        (lambda: FIXED.layout_ascii(64, block_size=8, head=2), "head=2"),
        (lambda: BlockLayout(np.ones(4), 8), "layout"),
        (lambda: BlockLayout(np.ones((2, 2)), 8).token_mask(24, 16), "n_q=24"),
        (lambda: BlockLayout(np.ones((2, 2)), 8).block_layout(16, 16, 16), "block_size=16"),
        (lambda: BlockLayout(np.ones((2, 2)), 8, lambda *a: np.ones((4, 4), bool)).token_mask(16), "mask_callback"),
        (lambda: BlockLayout(np.ones((2, 2)), 8, lambda *a: np.ones((8, 8))).token_mask(16), "mask_callback"),
    ],
)
def test_validation(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_public_names_resolve_and_numpy_parts_need_no_tensorflow():
    """Importing bsattn and its NumPy-only modules does not import TensorFlow (the GPU device harness runs without
    it); every name of ``bsattn.__all__`` and of the lazy subpackages resolves."""
    code = (
        "import sys, bsattn, bsattn.colt5, bsattn.memory_efficient\n"
        "from bsattn import patterns, tables, fused_tables, reference\n"
        "assert 'tensorflow' not in sys.modules, 'bsattn imported TensorFlow'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    import bsattn
    import bsattn.colt5
    import bsattn.memory_efficient

    for pkg in (bsattn, bsattn.colt5, bsattn.memory_efficient):
        assert not [n for n in pkg.__all__ if getattr(pkg, n, None) is None], pkg.__name__
        assert set(pkg.__all__) <= set(dir(pkg))
