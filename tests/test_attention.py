"""The sparse_attention API: head/state helpers, strided_transpose, get_attn_mask, get_blocksparse_obj, and
blocksparse_attention_impl against attention_impl (forward and gradients, eager and tf.function, recompute)."""

import numpy as np
import pytest
import tensorflow as tf
from conftest import assert_close_rel, f64, maybe_function, uniform

from bsattn import (
    attention_impl,
    blocksparse_attention_impl,
    get_attn_mask,
    get_blocksparse_obj,
    merge_heads,
    merge_states,
    reference,
    shape_list,
    split_heads,
    split_states,
    strided_transpose,
)
from bsattn.patterns import Fixed, strided_permutation
from bsattn.sparse_attention import _strided_untranspose

pytestmark = pytest.mark.ops


# ---- heads and states ---------------------------------------------------------------------------------------


def test_split_merge_states_and_heads(rng):
    x = uniform(rng, [2, 5, 12])
    s = split_states(x, 3)
    assert s.shape == (2, 5, 3, 4)
    np.testing.assert_array_equal(s.numpy(), x.numpy().reshape(2, 5, 3, 4))
    np.testing.assert_array_equal(merge_states(s).numpy(), x.numpy())
    h = split_heads(x, 3)
    assert h.shape == (2, 3, 5, 4)
    # Head h owns channels [h*D, (h+1)*D): h[b, head, t, d] = x[b, t, head*4 + d].
    np.testing.assert_array_equal(h.numpy()[1, 2, 3], x.numpy()[1, 3, 8:12])
    np.testing.assert_array_equal(h.numpy(), x.numpy().reshape(2, 5, 3, 4).transpose(0, 2, 1, 3))
    back = merge_heads(h)
    assert back.shape == (2, 5, 12)
    np.testing.assert_array_equal(back.numpy(), x.numpy())


def test_helpers_with_dynamic_shapes(rng):
    @tf.function(input_signature=[tf.TensorSpec([None, None, 12])])
    def round_trip(x):
        assert shape_list(x)[2] == 12 and tf.is_tensor(shape_list(x)[0])
        return merge_heads(split_heads(x, 3))

    x = uniform(rng, [2, 7, 12])
    np.testing.assert_array_equal(round_trip(x).numpy(), x.numpy())


# ---- strided_transpose ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("n, local_attn_ctx, blocksize", [(32, 4, 8), (64, 8, 8), (64, 2, 16)])
def test_strided_transpose(n, local_attn_ctx, blocksize):
    """Token t = a*L + b moves to p = b*(n/L) + a; the inverse restores the order."""
    x = tf.reshape(tf.cast(tf.range(2 * n * 3), tf.float32), [2, n, 3])
    y = strided_transpose(x, n, local_attn_ctx, blocksize).numpy()
    bt = n // local_attn_ctx
    for t in range(n):
        a, b = divmod(t, local_attn_ctx)
        np.testing.assert_array_equal(y[:, b * bt + a], x.numpy()[:, t])
    np.testing.assert_array_equal(y, x.numpy()[:, strided_permutation(n, local_attn_ctx)])
    np.testing.assert_array_equal(_strided_untranspose(tf.constant(y), n, local_attn_ctx).numpy(), x.numpy())


# ---- get_attn_mask ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "n, mode, ctx", [(12, "all", None), (12, "local", 3), (12, "local", 20), (12, "strided", 3), (16, "strided", 4)]
)
def test_get_attn_mask_formulas(n, mode, ctx):
    mask = get_attn_mask(n, mode, ctx)
    assert mask.dtype == tf.float32 and mask.shape == (1, 1, n, n)
    i, j = np.arange(n)[:, None], np.arange(n)[None, :]
    if mode == "all":
        expected = j <= i
    elif mode == "local":
        expected = (0 <= i - j) & (i - j <= min(n - 1, ctx - 1))
    else:
        expected = (j <= i) & ((i - j) % ctx == 0)
    np.testing.assert_array_equal(mask.numpy()[0, 0], expected.astype(np.float32))


def fixed_closed_form(n, heads, local_attn_ctx, blocksize, num_verts, vertsize):
    """sparse_attention's 'fixed' token rule (reference §1.2) → bool [heads, n, n]: j <= i and (same L-chunk or
    (j // bs) mod S in R[h mod num_verts]), R = rows of [S-1, ..., 0] reshaped to [-1, vertsize]."""
    stride = local_attn_ctx // blocksize
    rows = np.arange(stride - 1, -1, -1).reshape(-1, vertsize)
    i, j = np.arange(n)[:, None], np.arange(n)[None, :]
    out = []
    for h in range(heads):
        summary = np.isin((j // blocksize) % stride, rows[h % num_verts])
        out.append((j <= i) & ((j // local_attn_ctx == i // local_attn_ctx) | summary))
    return np.stack(out)


FIXED = [
    # (T, heads, local_attn_ctx, blocksize, num_verts, vertsize)
    (64, 2, 32, 8, 1, 1),
    (64, 2, 32, 8, 2, 2),
    (64, 4, 32, 8, 4, 1),
    (64, 2, 32, 8, 1, 4),
    (96, 3, 32, 16, 1, 2),
]


@pytest.mark.parametrize("n, heads, ctx, bs, nv, vs", FIXED)
def test_get_attn_mask_fixed(n, heads, ctx, bs, nv, vs):
    mask = get_attn_mask(n, "fixed", ctx, blocksize=bs, num_verts=nv, vertsize=vs, heads=heads).numpy()
    expected = fixed_closed_form(n, heads, ctx, bs, nv, vs)
    assert mask.shape == ((1, heads, n, n) if nv > 1 else (1, 1, n, n))
    token_mask = Fixed(ctx, nv, vs, heads, bs).token_mask(n)
    np.testing.assert_array_equal(mask[0], token_mask.astype(np.float32))
    np.testing.assert_array_equal(mask[0].astype(bool), expected[: mask.shape[1]])
    if nv == 1:  # shared by every head
        assert (expected == expected[0]).all()


# ---- get_blocksparse_obj --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "heads, mode, ctx, nv, vs, blocks",
    [
        (4, "all", None, None, None, 528),
        (4, "local", 32, None, None, 63),
        (4, "local", 128, None, None, 150),
        (4, "strided", 32, None, None, 32),
        (4, "strided", 16, None, None, 48),
        (4, "fixed", 128, 4, 1, 192),
        (4, "fixed", 128, 2, 2, 304),
        (4, "fixed", 256, 1, 4, 336),
    ],
)
def test_blocksparse_obj_block_counts(heads, mode, ctx, nv, vs, blocks):
    """sparse_attention's block counts at n_ctx = 1024, blocksize 32 (reference §1.2)."""
    bst = get_blocksparse_obj(1024, heads, mode, 32, ctx, nv, vs)
    assert bst.blocks == blocks and bst.heads == heads
    assert bst.lut_heads == (heads if mode == "fixed" and nv > 1 else 1)


@pytest.mark.parametrize("n, heads, ctx, bs, nv, vs", FIXED)
def test_blocksparse_obj_fixed_layout(n, heads, ctx, bs, nv, vs):
    """The 'fixed' block layout of sparse_attention: Kb <= Qb and (same chunk or Kb mod S in R[h mod nv])."""
    bst = get_blocksparse_obj(n, heads, "fixed", bs, ctx, nv, vs)
    stride, nb = ctx // bs, n // bs
    rows = np.arange(stride - 1, -1, -1).reshape(-1, vs)
    qb, kb = np.arange(nb)[:, None], np.arange(nb)[None, :]
    for h in range(bst.lut_heads):
        expected = (kb <= qb) & ((kb // stride == qb // stride) | np.isin(kb % stride, rows[h % nv]))
        np.testing.assert_array_equal(bst.tables.layout[h], expected)


# ---- blocksparse_attention_impl == attention_impl ------------------------------------------------------------

CASES = [
    # (T, heads, attn_mode, local_attn_ctx, blocksize, num_verts, vertsize)
    (64, 2, "all", None, 16, None, None),
    (64, 4, "all", None, 8, None, None),
    (64, 2, "local", 16, 8, None, None),
    (64, 2, "local", 32, 16, None, None),
    (64, 2, "strided", 4, 16, None, None),
    (64, 2, "strided", 8, 8, None, None),
] + [(t, h, "fixed", ctx, bs, nv, vs) for t, h, ctx, bs, nv, vs in FIXED]
B, D = 2, 8


def case_id(case):
    t, h, mode, ctx, bs, nv, vs = case
    return f"{mode}-T{t}-H{h}-L{ctx}-bs{bs}" + (f"-nv{nv}-vs{vs}" if mode == "fixed" else "")


def token_mask(case):
    """The exact token mask of a case → bool [1 or H, T, T] (original coordinates)."""
    t, h, mode, ctx, bs, nv, vs = case
    if mode == "fixed":
        return fixed_closed_form(t, h, ctx, bs, nv, vs)
    return get_attn_mask(t, mode, ctx).numpy()[0].astype(bool)


def attend(fn, case, q, k, v, e, recompute=False):
    """fn(q, k, v, ...) and its gradients for the upstream e → (y, dq, dk, dv)."""
    _t, h, mode, ctx, bs, nv, vs = case
    with tf.GradientTape() as tape:
        tape.watch([q, k, v])
        if fn is attention_impl:
            y = attention_impl(q, k, v, h, mode, ctx, blocksize=bs, num_verts=nv, vertsize=vs, recompute=recompute)
        else:
            y = blocksparse_attention_impl(q, k, v, h, mode, ctx, bs, nv, vs, recompute=recompute)
    return (y, *tape.gradient(y, [q, k, v], output_gradients=e))


def inputs(rng, case, dtype=tf.float32):
    t, h = case[:2]
    return [uniform(rng, [B, t, h * D], dtype) for _ in range(4)]


def references(case, q, k, v, e):
    q, k, v, e = (f64(x) for x in (q, k, v, e))
    mask = token_mask(case)
    heads = case[1]
    y = reference.masked_attention(q, k, v, heads, mask)
    return (y, *reference.masked_attention_grad(q, k, v, heads, mask, None, e))


NAMES = ("y", "dq", "dk", "dv")


@pytest.mark.parametrize("mode", ["eager", "function"])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_blocksparse_equals_dense_float32(rng, case, mode):
    q, k, v, e = inputs(rng, case)
    ours = maybe_function(lambda *x: attend(blocksparse_attention_impl, case, *x), mode)(q, k, v, e)
    dense = maybe_function(lambda *x: attend(attention_impl, case, *x), mode)(q, k, v, e)
    for name, o, d, r in zip(NAMES, ours, dense, references(case, q, k, v, e)):
        assert o.dtype == tf.float32
        assert_close_rel(o, r, name=f"blocksparse {name}")
        assert_close_rel(d, r, name=f"attention_impl {name}")


REDUCED_CASES = [CASES[0], CASES[2], CASES[4], CASES[7], CASES[8]]


@pytest.mark.parametrize("dtype", [tf.float16, tf.bfloat16], ids=lambda d: d.name)
@pytest.mark.parametrize("case", REDUCED_CASES, ids=case_id)
def test_blocksparse_equals_dense_reduced(rng, case, dtype):
    """float16 / bfloat16: the error of blocksparse_attention_impl is within 2x (3x for gradients) of
    attention_impl's own error in that dtype."""
    q, k, v, e = inputs(rng, case, dtype)
    ours = attend(blocksparse_attention_impl, case, q, k, v, e)
    dense = attend(attention_impl, case, q, k, v, e)
    for name, o, d, r in zip(NAMES, ours, dense, references(case, q, k, v, e)):
        assert o.dtype == dtype
        assert_close_rel(o, r, d, grad=name != "y", name=name)


@pytest.mark.parametrize("mode", ["eager", "function"])
@pytest.mark.parametrize("case", [CASES[0], CASES[5], CASES[7]], ids=case_id)
def test_recompute_same_results(rng, case, mode):
    """recompute=True gives the outputs and gradients of recompute=False (both functions)."""
    q, k, v, e = inputs(rng, case)
    for fn in (blocksparse_attention_impl, attention_impl):
        plain = maybe_function(lambda *x, fn=fn: attend(fn, case, *x, recompute=False), mode)(q, k, v, e)
        again = maybe_function(lambda *x, fn=fn: attend(fn, case, *x, recompute=True), mode)(q, k, v, e)
        for name, a, b in zip(NAMES, plain, again):
            assert b is not None, f"{fn.__name__} {name}: no gradient with recompute=True"
            np.testing.assert_allclose(
                b.numpy(), a.numpy(), rtol=0, atol=1e-6 * np.abs(a.numpy()).max(), err_msg=f"{fn.__name__} {name}"
            )
