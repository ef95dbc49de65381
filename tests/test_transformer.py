"""BlocksparseTransformer: its attributes and tables, blocksparse's own tests (test/blocksparse_transformer_test.py,
reference §5.1 (1)-(4)) at reduced sizes and with assertions, and the dtype behaviour of its methods."""

import textwrap

import numpy as np
import pytest
import tensorflow as tf
from conftest import (
    RandomCallback,
    assert_close_rel,
    causal_callback,
    dense_attention_tf,
    dense_grads,
    dense_masked_softmax,
    dense_nn,
    dense_nt,
    dense_tn,
    f64,
    normal,
    uniform,
)

from bsattn import BlocksparseTransformer, reference
from bsattn.tables import build_tables

pytestmark = pytest.mark.ops


def grid(picture: str) -> np.ndarray:
    """An ASCII layout ('#' active, '.' inactive) → int ``[nQb, nKb]``."""
    rows = textwrap.dedent(picture).strip().splitlines()
    return np.array([[c == "#" for c in row.strip()] for row in rows], dtype=np.int32)


HEAD0 = grid("""
    #..#
    ##..
    .##.
""")
HEAD1 = grid("""
    .#..
    ###.
    ..##
""")


def pattern_callback(blk_shape, head_idx, qry_idx, key_idx, blk_idx):
    """A distinct, known mask per block: row i keeps column j iff (i + j + blk_idx + head_idx) % 3 != 0."""
    i, j = np.arange(blk_shape[0])[:, None], np.arange(blk_shape[1])[None, :]
    return (i + j + blk_idx + head_idx) % 3 != 0


# ---- attributes and tables ----------------------------------------------------------------------------------


def test_attributes_per_head_layout():
    bst = BlocksparseTransformer(np.stack([HEAD0, HEAD1]), block_size=8, name="attn")
    assert (bst.heads, bst.lut_heads, bst.ctx_blks_q, bst.ctx_blks_k) == (2, 2, 3, 4)
    assert (bst.blk_size, bst.blk_shape, bst.blocks, bst.name) == (8, (8, 8), 6, "attn")
    assert (bst.nn_max, bst.tn_max) == (3, 2)
    assert bst.softmax_dtype is None
    np.testing.assert_array_equal(
        bst.nt_lut,
        [[[0, 0], [0, 3], [1, 0], [1, 1], [2, 1], [2, 2]], [[0, 1], [1, 0], [1, 1], [1, 2], [2, 2], [2, 3]]],
    )
    # Header (offset, count) per query-block row, offsets from ctx_blks_q; then (block id, Kb).
    np.testing.assert_array_equal(
        bst.nn_lut,
        [
            [[3, 2], [5, 2], [7, 2], [0, 0], [1, 3], [2, 0], [3, 1], [4, 1], [5, 2]],
            [[3, 1], [4, 3], [7, 2], [0, 1], [1, 0], [2, 1], [3, 2], [4, 2], [5, 3]],
        ],
    )
    # Header per key-block column, offsets from ctx_blks_k; then (block id, Qb), ascending block id.
    np.testing.assert_array_equal(
        bst.tn_lut,
        [
            [[4, 2], [6, 2], [8, 1], [9, 1], [0, 0], [2, 1], [3, 1], [4, 2], [5, 2], [1, 0]],
            [[4, 1], [5, 2], [7, 2], [9, 1], [1, 1], [0, 0], [2, 1], [3, 1], [4, 2], [5, 2]],
        ],
    )
    for table in (bst.nt_lut, bst.nn_lut, bst.tn_lut):
        assert table.dtype == np.int32
    assert [lut.tolist() for lut in bst.nt_list] == bst.nt_lut.tolist()
    assert bst.block_coord(3) == (1, 1) and bst.block_coord(3, head=1) == (1, 2)
    assert bst.nn_list[1][1].tolist() == [[1, 0], [2, 1], [3, 2]]
    assert bst.tn_list[0][0].tolist() == [[0, 0], [2, 1]] and bst.tn_list[0][3].tolist() == [[1, 0]]
    assert bst.softmax_mask_np is None and bst.softmax_mask is None  # no callback


def test_shared_layout_and_callback_calls():
    """A 2-D layout is shared: one lut head, and the callback sees head_idx 0 once per block."""
    callback = RandomCallback(3)
    bst = BlocksparseTransformer(HEAD1, block_size=16, heads=4, mask_callback=callback)
    assert (bst.heads, bst.lut_heads, bst.blocks) == (4, 1, 6)
    expected = [((16, 16), 0, int(qb), int(kb), b) for b, (qb, kb) in enumerate(bst.nt_lut[0])]
    assert sorted(callback.calls, key=lambda c: c[4]) == expected
    assert BlocksparseTransformer(HEAD1[None], block_size=16, heads=4).lut_heads == 1


@pytest.mark.parametrize("bs, word", [(8, np.uint8), (16, np.uint16), (32, np.uint32), (64, np.uint64)])
def test_softmax_mask_bits(bs, word):
    """blocksparse's packing: one word per block row, bit j (LSB = 0) = key column j."""
    bst = BlocksparseTransformer(np.stack([HEAD0, HEAD1]), block_size=bs, mask_callback=pattern_callback)
    packed = bst.softmax_mask_np
    assert packed.dtype == word and packed.shape == (2, 6, bs)
    expected = np.zeros((2, 6, bs), dtype=np.uint64)
    for h in range(2):
        for b in range(6):
            keep = pattern_callback((bs, bs), h, *bst.block_coord(b, h), b)
            for j in range(bs):
                expected[h, b] |= keep[:, j].astype(np.uint64) << np.uint64(j)
    np.testing.assert_array_equal(packed.astype(np.uint64), expected)
    np.testing.assert_array_equal(bst.softmax_mask, packed.transpose(0, 2, 1))


def test_block_size_128_has_no_blocksparse_mask_format():
    bst = BlocksparseTransformer(HEAD0, block_size=128, heads=2, mask_callback=causal_callback)
    assert bst.blk_size == 128 and bst.softmax_mask_np is None


# ---- blocksparse_transformer_test.py, reduced ---------------------------------------------------------------

B, HEADS, STATE, NB = 2, 2, 16, 4


def blocksparse_attention(bst, q, k, v, scale, masked=True):
    """query_key_op → (masked_)softmax → weight_value_op; returns (w, a, y)."""
    w = bst.query_key_op(q, k)
    a = bst.masked_softmax(w, scale=scale) if masked else bst.softmax(w, scale=scale)
    return w, a, bst.weight_value_op(a, v)


@pytest.mark.parametrize(
    "bs, dtype",
    [(8, tf.float32), (16, tf.float32), (32, tf.float32), (64, tf.float32), (16, tf.float16), (32, tf.bfloat16)],
)
def test_dense_layout_equals_dense_attention(rng, bs, dtype):
    """§5.1 (1): all-ones per-head layout, no callback, bst.softmax == dense (bidirectional) attention, Y and
    DQ/DK/DV."""
    t, scale = NB * bs, 1.0 / np.sqrt(STATE)
    bst = BlocksparseTransformer(np.ones((HEADS, NB, NB)), block_size=bs)
    q, k, v, e = (uniform(rng, [B, t, HEADS * STATE], dtype) for _ in range(4))
    with tf.GradientTape() as tape:
        tape.watch([q, k, v])
        y = blocksparse_attention(bst, q, k, v, scale, masked=False)[2]
    grads = tape.gradient(y, [q, k, v], output_gradients=e)
    q64, k64, v64, e64 = (f64(x) for x in (q, k, v, e))
    ones = np.ones((t, t), dtype=bool)
    y_ref = reference.dense_attention(q64, k64, v64, HEADS, scale=scale)
    grads_ref = reference.masked_attention_grad(q64, k64, v64, HEADS, ones, scale, e64)
    y_tf = dense_attention_tf(q, k, v, HEADS, scale)
    grads_tf = dense_grads(lambda *x: dense_attention_tf(*x, HEADS, scale), [q, k, v], e)
    assert_close_rel(y, y_ref, y_tf, name="Y")
    for name, ours, ref, dense in zip(("DQ", "DK", "DV"), grads, grads_ref, grads_tf):
        assert_close_rel(ours, ref, dense, grad=True, name=name)


@pytest.mark.parametrize("bs", [8, 32])
def test_sparse_causal_chain(rng, bs):
    """§5.1 (2): causal [2, nb, nb] layout + causal callback; W, A, Y, DV, DK, DQ against the object's numpy
    helpers (float64), and Y/DQ/DK/DV against dense causal attention."""
    t, scale = NB * bs, 1.0 / 8
    bst = BlocksparseTransformer(np.tril(np.ones((HEADS, NB, NB))), block_size=bs, mask_callback=causal_callback)
    assert bst.blocks == NB * (NB + 1) // 2
    q, k, v, e = (uniform(rng, [B, t, HEADS * STATE]) for _ in range(4))
    with tf.GradientTape() as tape:
        tape.watch([q, k, v])
        w, a, y = blocksparse_attention(bst, q, k, v, scale)
    dq, dk, dv = tape.gradient(y, [q, k, v], output_gradients=e)
    Q, K, V, E = (f64(x) for x in (q, k, v, e))
    W = bst.nt_test(Q, K)
    A = bst.masked_softmax_test(W, scale)
    DW = bst.masked_softmax_grad_test(bst.nt_test(E, V), A, scale)
    expected = {
        "W": W,
        "A": A,
        "Y": bst.nn_test(A, V),
        "DV": bst.tn_test(A, E),
        "DK": bst.tn_test(DW, Q),
        "DQ": bst.nn_test(DW, K),
    }
    for name, ours in {"W": w, "A": a, "Y": y, "DV": dv, "DK": dk, "DQ": dq}.items():
        assert ours.dtype == tf.float32
        assert_close_rel(ours, expected[name], name=name)
    causal = np.tril(np.ones((t, t), dtype=bool))
    assert_close_rel(y, reference.masked_attention(Q, K, V, HEADS, causal, scale), name="Y dense")
    for name, ours, ref in zip(
        ("DQ", "DK", "DV"), (dq, dk, dv), reference.masked_attention_grad(Q, K, V, HEADS, causal, scale, E)
    ):
        assert_close_rel(ours, ref, name=f"{name} dense")


@pytest.mark.parametrize("dtype", [tf.float32, tf.bfloat16], ids=lambda d: d.name)
def test_raw_matmuls_shared_layout(rng, dtype):
    """§5.1 (3): shared causal layout [1, nb, nb] with heads=4; nt_op / nn_op / tn_op forward."""
    bs, heads, state = 32, 4, 8
    bst = BlocksparseTransformer(
        np.tril(np.ones((1, NB, NB))), block_size=bs, heads=heads, mask_callback=causal_callback
    )
    assert (bst.lut_heads, bst.blocks) == (1, 10)
    q, k = (uniform(rng, [B, NB * bs, heads * state], dtype) for _ in range(2))
    w = uniform(rng, [B, heads, bst.blocks, bs, bs], dtype)
    tables = bst.tables
    for name, ours, ref, dense in (
        ("nt", bst.nt_op(q, k), bst.nt_test(f64(q), f64(k)), lambda: dense_nt(q, k, tables, heads)),
        ("nn", bst.nn_op(w, k), bst.nn_test(f64(w), f64(k)), lambda: dense_nn(w, k, tables)),
        ("tn", bst.tn_op(w, q), bst.tn_test(f64(w), f64(q)), lambda: dense_tn(w, q, tables)),
    ):
        assert ours.dtype == dtype
        assert_close_rel(ours, ref, dense() if dtype != tf.float32 else None, name=name)


@pytest.mark.parametrize("w_dtype", [tf.bfloat16, tf.float16], ids=lambda d: d.name)
def test_reduced_precision_weights_with_float32_activations(rng, w_dtype):
    """blocksparse's mixed precision: nn_op / tn_op with bf16/fp16 weights and float32 activations (per-head
    layout, 3x4 blocks), forward and gradients against float64 of the same values; the result is float32."""
    bs, heads = 16, 2
    bst = BlocksparseTransformer(np.stack([HEAD0, HEAD1]), block_size=bs, heads=heads, mask_callback=pattern_callback)
    w = uniform(rng, [B, heads, bst.blocks, bs, bs], w_dtype)
    for op, ref, rows_in, rows_out in ((bst.nn_op, bst.nn_test, 4, 3), (bst.tn_op, bst.tn_test, 3, 4)):
        x = uniform(rng, [B, rows_in * bs, heads * STATE], tf.float32)
        dc = uniform(rng, [B, rows_out * bs, heads * STATE], tf.float32)
        with tf.GradientTape() as tape:
            tape.watch([w, x])
            c = op(w, x)
        dw, dx = tape.gradient(c, [w, x], output_gradients=dc)
        assert (c.dtype, dw.dtype, dx.dtype) == (tf.float32, w_dtype, tf.float32)
        assert_close_rel(c, ref(f64(w), f64(x)), name="c")
        # d/dw of sum(dc * c): nt of (dc, x) for nn, (x, dc) for tn; the float32 result rounded to w's dtype.
        dw_ref = bst.nt_test(f64(dc), f64(x)) if op == bst.nn_op else bst.nt_test(f64(x), f64(dc))
        assert_close_rel(dw, dw_ref, tf.cast(tf.constant(dw_ref, tf.float32), w_dtype), grad=True, name="dw")
        dx_ref = bst.tn_test(f64(w), f64(dc)) if op == bst.nn_op else bst.nn_test(f64(w), f64(dc))
        assert_close_rel(dx, dx_ref, name="dx")
    with pytest.raises(TypeError, match="w must have b's dtype, or be float16/bfloat16 with a float32 b"):
        bst.nn_op(w, tf.zeros([B, 4 * bs, heads * STATE], tf.float16 if w_dtype == tf.bfloat16 else tf.bfloat16))
    with pytest.raises(TypeError, match="w: float32, b: bfloat16"):
        bst.tn_op(tf.cast(w, tf.float32), tf.zeros([B, 3 * bs, heads * STATE], tf.bfloat16))


def checkerboard(blk_shape, head_idx, qry_idx, key_idx, blk_idx):
    mask = np.ones(blk_shape, dtype=bool)
    mask[::2, 1::2] = mask[1::2, ::2] = False
    return mask


@pytest.mark.parametrize(
    "bs, dtype", [(8, tf.float32), (16, tf.float32), (32, tf.float32), (64, tf.float32), (16, tf.bfloat16)]
)
def test_checkerboard_softmax_autoregress_at_key(rng, bs, dtype):
    """§5.1 (4) (disabled in blocksparse): checkerboard callback, all-ones layout, autoregress_at_key=7,
    scale 0.5, forward and gradient; also against a dense NumPy softmax of the token rule
    ``(i + j) even and (j < 7 or j <= i)``."""
    key, scale, t = 7, 0.5, NB * bs
    bst = BlocksparseTransformer(np.ones((1, NB, NB)), block_size=bs, mask_callback=checkerboard)
    x = normal(rng, [1, 1, bst.blocks, bs, bs], dtype)
    e = uniform(rng, x.shape, dtype)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = bst.masked_softmax(x, scale=scale, autoregress_at_key=key)
    dx = tape.gradient(y, x, output_gradients=e)
    X, E = f64(x), f64(e)
    Y = bst.masked_softmax_test(X, scale, autoregress_at_key=key)
    DX = bst.masked_softmax_grad_test(E, Y, scale)
    dense, dense_dx = None, None
    if dtype != tf.float32:
        dense = dense_masked_softmax(x, bst.tables, scale, key)
        (dense_dx,) = dense_grads(lambda s: dense_masked_softmax(s, bst.tables, scale, key), [x], e)
    assert_close_rel(y, Y, dense, name="Y")
    assert_close_rel(dx, DX, dense_dx, grad=True, name="DX")

    i, j = np.arange(t)[:, None], np.arange(t)[None, :]
    keep = ((i + j) % 2 == 0) & ((j < key) | (j <= i))
    s = np.where(keep, scale * reference.dense_from_blocks(X, bst.tables)[0, 0], -np.inf)
    p = np.exp(s - s.max(axis=1, keepdims=True))
    np.testing.assert_allclose(
        reference.dense_from_blocks(Y, bst.tables)[0, 0], p / p.sum(axis=1, keepdims=True), atol=1e-12
    )


# ---- dtypes and methods ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [tf.float16, tf.bfloat16, tf.float32], ids=lambda d: d.name)
def test_results_keep_input_dtype(rng, dtype):
    bs = 8
    bst = BlocksparseTransformer(np.tril(np.ones((NB, NB))), block_size=bs, heads=HEADS, mask_callback=causal_callback)
    q, k, v = (uniform(rng, [B, NB * bs, HEADS * STATE], dtype) for _ in range(3))
    w = bst.query_key_op(q, k)
    assert bst.softmax_dtype == dtype
    a = bst.masked_softmax(w, scale=0.25)
    outs = {
        "w": w,
        "a": a,
        "softmax": bst.softmax(w),
        "y": bst.weight_value_op(a, v),
        "nn": bst.nn_op(a, v),
        "tn": bst.tn_op(a, q),
    }
    for name, out in outs.items():
        assert out.dtype == dtype, f"{name}: {out.dtype.name}"


def test_masked_softmax_dtype_argument(rng):
    bst = BlocksparseTransformer(np.tril(np.ones((NB, NB))), block_size=8, heads=HEADS, mask_callback=causal_callback)
    x = uniform(rng, [B, HEADS, bst.blocks, 8, 8], tf.float16)
    y = bst.masked_softmax(x, scale=0.5)
    for dtype in (tf.float32, tf.bfloat16):
        cast = bst.masked_softmax(x, scale=0.5, dtype=dtype)
        assert cast.dtype == dtype
        np.testing.assert_array_equal(cast.numpy(), tf.cast(y, dtype).numpy())
    assert bst.softmax(x, scale=0.5, dtype=tf.float32).dtype == tf.float32


def test_softmax_ignores_masks(rng):
    layout = np.tril(np.ones((NB, NB)))
    bst = BlocksparseTransformer(layout, block_size=8, heads=HEADS, mask_callback=checkerboard)
    x = uniform(rng, [B, HEADS, bst.blocks, 8, 8])
    plain = reference.masked_softmax(f64(x), build_tables(layout, 8), 0.5)
    assert_close_rel(bst.softmax(x, scale=0.5), plain, name="softmax")
    masked = bst.masked_softmax(x, scale=0.5)
    assert_close_rel(masked, reference.masked_softmax(f64(x), bst.tables, 0.5), name="masked_softmax")
    assert np.abs(masked.numpy() - plain).max() > 0.05
    # Without a callback, masked_softmax is softmax.
    unmasked = BlocksparseTransformer(layout, block_size=8, heads=HEADS)
    np.testing.assert_array_equal(unmasked.masked_softmax(x, scale=0.5).numpy(), unmasked.softmax(x, scale=0.5).numpy())


def test_autoregress_at_key_without_callback():
    bst = BlocksparseTransformer(np.tril(np.ones((NB, NB))), block_size=8, heads=HEADS)
    with pytest.raises(ValueError, match="autoregress_at_key requires a mask_callback"):
        bst.masked_softmax(tf.ones([1, HEADS, bst.blocks, 8, 8]), autoregress_at_key=3)


def test_bench_is_ignored_with_a_warning(rng):
    bst = BlocksparseTransformer(np.tril(np.ones((NB, NB))), block_size=8, heads=HEADS)
    q = uniform(rng, [1, NB * 8, HEADS * 4])
    with pytest.warns(UserWarning, match="bench is ignored"):
        w = bst.query_key_op(q, q, name="qk", bench=1)
    np.testing.assert_array_equal(w.numpy(), bst.nt_op(q, q).numpy())


@pytest.mark.parametrize("mode", ["eager", "function"])
def test_methods_under_tf_function(rng, mode):
    bst = BlocksparseTransformer(np.tril(np.ones((HEADS, NB, NB))), block_size=16, mask_callback=causal_callback)
    q, k, v = (uniform(rng, [B, NB * 16, HEADS * STATE]) for _ in range(3))

    def run(q, k, v):
        return blocksparse_attention(bst, q, k, v, 0.25)[2]

    y = (tf.function(run) if mode == "function" else run)(q, k, v)
    causal = np.tril(np.ones((NB * 16, NB * 16), dtype=bool))
    assert_close_rel(y, reference.masked_attention(f64(q), f64(k), f64(v), HEADS, causal, 0.25), name="Y")
