"""Self-consistency of the float64 references in bsattn.reference."""

import numpy as np
import pytest

from bsattn import reference as ref
from bsattn.patterns import Causal, Dense, Fixed, Local, Strided
from bsattn.tables import build_tables, tables_for_callback, tables_for_pattern

RNG = np.random.default_rng(0)


def randn(*shape):
    return RNG.standard_normal(shape)


def per_head(x, heads):
    """[B, T, H*D] → [B, H, T, D]."""
    return x.reshape(x.shape[0], x.shape[1], heads, -1).transpose(0, 2, 1, 3)


def merged(x):
    return x.transpose(0, 2, 1, 3).reshape(x.shape[0], x.shape[2], -1)


# Rectangular layouts (nQb != nKb), shared and per head, with a random in-block mask.
def random_tables(lut_heads, bs=8, n_qb=3, n_kb=5):
    layout = np.zeros((lut_heads, n_qb, n_kb), dtype=bool)
    for h in range(lut_heads):
        layout[h].flat[RNG.permutation(n_qb * n_kb)[:7]] = True
    masks = RNG.random((lut_heads, n_qb, n_kb, bs, bs)) < 0.7
    return tables_for_callback(layout, bs, lambda shape, h, qb, kb, b: masks[h, qb, kb])


@pytest.mark.parametrize("lut_heads", [1, 2])
def test_matmuls_equal_dense_einsums(lut_heads):
    heads, depth = 2, 4
    t = random_tables(lut_heads)
    q, k = randn(2, 24, heads * depth), randn(2, 40, heads * depth)
    w = randn(2, heads, t.blocks, 8, 8)
    np.testing.assert_array_equal(ref.blocks_from_dense(ref.dense_from_blocks(w, t), t), w)
    scores = np.einsum("nhid,nhjd->nhij", per_head(q, heads), per_head(k, heads))
    np.testing.assert_allclose(ref.nt(q, k, t, heads), ref.blocks_from_dense(scores, t), atol=1e-12)
    dense_w = ref.dense_from_blocks(w, t)
    np.testing.assert_allclose(ref.nn(w, k, t), merged(dense_w @ per_head(k, heads)), atol=1e-12)
    np.testing.assert_allclose(ref.tn(w, q, t), merged(dense_w.transpose(0, 1, 3, 2) @ per_head(q, heads)), atol=1e-12)
    assert ref.nt(q.astype(np.float32), k, t, heads).dtype == np.float64


def test_empty_rows_are_zero():
    t = build_tables(np.array([[1, 0], [0, 0], [1, 1]]), 8)
    out = ref.nn(randn(1, 1, t.blocks, 8, 8), randn(1, 16, 4), t)
    assert out.shape == (1, 24, 4) and not out[:, 8:16].any() and out[:, :8].any()


@pytest.mark.parametrize(
    "pattern, heads, n_q, n_k, bs",
    [
        (Causal(), 2, 64, 64, 8),
        (Causal(), 2, 32, 64, 16),
        (Local(16), 2, 64, 64, 8),
        (Strided(4), 1, 64, 64, 8),
        (Fixed(32, 2, 1, 4, 8), 4, 64, 64, 8),
        (Dense(), 2, 32, 48, 16),
    ],
)
def test_blocksparse_attention_equals_masked_attention(pattern, heads, n_q, n_k, bs):
    t = tables_for_pattern(pattern, n_q, n_k, bs, heads)
    q, k, v = randn(2, n_q, heads * 8), randn(2, n_k, heads * 8), randn(2, n_k, heads * 8)
    mask = np.broadcast_to(pattern.token_mask(n_q, n_k), (heads, n_q, n_k))
    np.testing.assert_array_equal(ref.token_mask_from_tables(t, heads), mask)
    expected = ref.masked_attention(q, k, v, heads, mask)
    np.testing.assert_allclose(ref.blocksparse_attention(q, k, v, t, heads), expected, atol=1e-12)
    if n_q == n_k:  # sparse_attention's attention_impl masks with -1e9: the same here (no fully masked row)
        np.testing.assert_allclose(ref.dense_attention(q, k, v, heads, mask.astype(np.float32)), expected, atol=1e-12)


def test_masked_softmax_rows():
    # Query 0 keeps nothing (its only block, the diagonal one, masks its row 0 entirely).
    def callback(shape, h, qb, kb, b):
        keep = np.tril(np.ones(shape, bool)) if qb == kb else np.ones(shape, bool)
        if qb == 0:
            keep[0] = False
        return keep

    t = tables_for_callback(np.tril(np.ones((3, 3))), 8, callback)
    x = randn(2, 2, t.blocks, 8, 8)
    y = ref.masked_softmax(x, t, scale=0.5)
    rows = ref.dense_from_blocks(y, t).sum(axis=-1)
    expected = np.ones(24)
    expected[0] = 0.0
    np.testing.assert_allclose(rows, np.broadcast_to(expected, rows.shape), atol=1e-12)
    assert not y[:, :, ~t.keep_masks()[0]].any()  # masked entries are exactly 0
    # Equal to a dense softmax of the kept scores.
    mask = ref.token_mask_from_tables(t, 2)
    dense_x = np.where(mask, 0.5 * ref.dense_from_blocks(x, t), -np.inf)[:, :, 1:]
    dense_y = np.exp(dense_x - dense_x.max(-1, keepdims=True))
    dense_y /= dense_y.sum(-1, keepdims=True)
    np.testing.assert_allclose(ref.dense_from_blocks(y, t)[:, :, 1:], dense_y, atol=1e-12)


def numeric_grad(f, x, dy, eps=1e-6):
    """Central differences of sum(f(x) * dy) with respect to every element of x."""
    grad = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
        step = np.zeros_like(x)
        step[idx] = eps
        grad[idx] = ((f(x + step) - f(x - step)) * dy).sum() / (2 * eps)
    return grad


def test_masked_softmax_grad_finite_differences():
    t = tables_for_pattern(Causal(), 16, 16, 8, 1)
    x, dy = randn(1, 1, t.blocks, 8, 8), randn(1, 1, t.blocks, 8, 8)
    y = ref.masked_softmax(x, t, scale=0.7)
    numeric = numeric_grad(lambda z: ref.masked_softmax(z, t, scale=0.7), x, dy)
    np.testing.assert_allclose(ref.masked_softmax_grad(dy, y, t, scale=0.7), numeric, atol=1e-7)


def test_attention_grad_finite_differences():
    heads, n = 2, 6
    q, k, v, dout = randn(1, n, heads * 3), randn(1, n, heads * 3), randn(1, n, heads * 3), randn(1, n, heads * 3)
    mask = np.tril(np.ones((n, n), bool))
    mask[2] = False  # a fully masked row: output 0, no gradient through it
    mask = np.stack([mask, mask.T])  # per head: causal and anti-causal
    out = ref.masked_attention(q, k, v, heads, mask, scale=0.8)
    assert not out[:, 2, :3].any()
    grads = ref.masked_attention_grad(q, k, v, heads, mask, 0.8, dout)
    for i, x in enumerate((q, k, v)):

        def f(z, i=i):
            args = [q, k, v]
            args[i] = z
            return ref.masked_attention(*args, heads, mask, scale=0.8)

        np.testing.assert_allclose(grads[i], numeric_grad(f, x, dout), atol=1e-7)


@pytest.mark.parametrize("key", [0, 5, 13, 23])
def test_autoregress_at_key(key):
    # Checkerboard in-block mask on a dense layout (blocksparse's disabled softmax test), plus the prefix rule.
    def checkerboard(shape, h, qb, kb, b):
        i, j = np.indices(shape)
        return (i + j) % 2 == 0

    t = tables_for_callback(np.ones((3, 3)), 8, checkerboard)
    x = randn(1, 2, t.blocks, 8, 8)
    y = ref.masked_softmax(x, t, scale=0.5, autoregress_at_key=key)
    i, j = np.indices((24, 24))
    keep = ((i + j) % 2 == 0) & ((j < key) | (j <= i))
    dense_x = np.where(keep, 0.5 * ref.dense_from_blocks(x, t), -np.inf)
    expected = np.exp(dense_x - dense_x.max(-1, keepdims=True))
    expected /= expected.sum(-1, keepdims=True)
    np.testing.assert_allclose(ref.dense_from_blocks(y, t), expected, atol=1e-12)


def test_validation():
    t = tables_for_pattern(Causal(), 16, 16, 8, 1)
    with pytest.raises(ValueError, match="autoregress_at_key"):
        ref.masked_softmax(randn(1, 1, t.blocks, 8, 8), t, autoregress_at_key=16)
    with pytest.raises(ValueError, match="a must be"):
        ref.nt(randn(1, 24, 4), randn(1, 16, 4), t, 2)
    with pytest.raises(ValueError, match="w must be"):
        ref.nn(randn(1, 1, 2, 8, 8), randn(1, 16, 4), t)
    with pytest.raises(ValueError, match="heads=3"):
        ref.nt(randn(1, 16, 6), randn(1, 16, 6), tables_for_pattern(Fixed(16, 2, 1, 2, 8), 16, 16, 8, 2), 3)
