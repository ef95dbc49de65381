"""The block-sparse ops (nt, nn, tn, masked softmax) and their gradients against float64 references.

Every op is checked on its own inputs (the previous op's actual output), so errors do not compound:
``w = nt(q, k)``, ``y = masked_softmax(w)``, ``o = nn(y, v)``, ``t = tn(y, q)``, each with a random upstream
gradient. The analytic gradients are: nt → ``(nn(dc, k), tn(dc, q))``; nn → ``(nt(do, v), tn(y, do))``;
tn → ``(nt(q, dt), nn(y, dt))``; masked softmax → ``reference.masked_softmax_grad``.

Axes: all dtypes x all block sizes on the full chain; layouts (shared 2-D / per-head 3-D), Tq != Tk,
random layouts and callbacks, eager / tf.function on float32; fully masked rows on every dtype.
"""

import numpy as np
import pytest
import tensorflow as tf
from conftest import (
    RandomCallback,
    assert_close_rel,
    dense_grads,
    dense_masked_softmax,
    dense_nn,
    dense_nt,
    dense_tn,
    f64,
    maybe_function,
    random_layout,
    uniform,
)

from bsattn import blocksparse_ops as ops
from bsattn import reference
from bsattn.tables import build_tables, tables_for_callback

pytestmark = pytest.mark.ops

B, H, D = 2, 2, 16
C = H * D


def make_tables(rng, bs, n_qb, n_kb, shared, callback=True, density=0.6, masked_queries=(), empty_rows=()):
    layout = random_layout(rng, n_qb, n_kb, 1 if shared else H, density, empty_rows=empty_rows)
    if shared:
        layout = layout[0]
    if not callback:
        return build_tables(layout, bs)
    return tables_for_callback(layout, bs, RandomCallback(int(rng.integers(1 << 30)), masked_queries=masked_queries))


def make_inputs(rng, tables, dtype):
    """q [B, Tq, C], k, v [B, Tk, C] and the upstream gradients of the four ops."""
    tq, tk = tables.ctx_blks_q * tables.block_size, tables.ctx_blks_k * tables.block_size
    blocks = [B, H, tables.blocks, tables.block_size, tables.block_size]
    shapes = {
        "q": [B, tq, C],
        "k": [B, tk, C],
        "v": [B, tk, C],
        "dc": blocks,
        "dy": blocks,
        "do": [B, tq, C],
        "dt": [B, tk, C],
    }
    return {name: uniform(rng, shape, dtype) for name, shape in shapes.items()}


def op_results(x, tables, scale, autoregress_at_key=None):
    """Each op and its gradients, each op fed the previous op's output → dict of tensors."""
    q, k, v = x["q"], x["k"], x["v"]
    with tf.GradientTape(persistent=True) as tape:
        tape.watch([q, k, v])
        w = ops.nt(q, k, tables, H)
        w_in = tf.stop_gradient(w)  # each op's gradient alone, not the chain's
        tape.watch(w_in)
        y = ops.masked_softmax(w_in, tables, scale, autoregress_at_key)
        y_in = tf.stop_gradient(y)
        tape.watch(y_in)
        o = ops.nn(y_in, v, tables)
        t = ops.tn(y_in, q, tables)
    dq, dk = tape.gradient(w, [q, k], output_gradients=x["dc"])
    dx = tape.gradient(y, w_in, output_gradients=x["dy"])
    dp, dv = tape.gradient(o, [y_in, v], output_gradients=x["do"])
    dp2, dq2 = tape.gradient(t, [y_in, q], output_gradients=x["dt"])
    return {"w": w, "dq": dq, "dk": dk, "y": y, "dx": dx, "o": o, "dp": dp, "dv": dv, "t": t, "dp2": dp2, "dq2": dq2}


def reference_results(x, got, tables, scale, autoregress_at_key=None):
    """The float64 references of ``op_results``, from the exact values of the inputs it used."""
    q, k, v, dc, dy, do, dt = (f64(x[n]) for n in ("q", "k", "v", "dc", "dy", "do", "dt"))
    w, y = f64(got["w"]), f64(got["y"])
    y_exact = reference.masked_softmax(w, tables, scale, autoregress_at_key)
    return {
        "w": reference.nt(q, k, tables, H),
        "dq": reference.nn(dc, k, tables),
        "dk": reference.tn(dc, q, tables),
        "y": y_exact,
        "dx": reference.masked_softmax_grad(dy, y_exact, tables, scale),
        "o": reference.nn(y, v, tables),
        "dp": reference.nt(do, v, tables, H),
        "dv": reference.tn(y, do, tables),
        "t": reference.tn(y, q, tables),
        "dp2": reference.nt(q, dt, tables, H),
        "dq2": reference.nn(y, dt, tables),
    }


def dense_results(x, got, tables, scale, autoregress_at_key=None):
    """``op_results`` done with TF's dense ops in the same dtype, on the same inputs."""
    q, k, v = x["q"], x["k"], x["v"]
    w, y = got["w"], got["y"]
    dq, dk = dense_grads(lambda a, b: dense_nt(a, b, tables, H), [q, k], x["dc"])
    (dx,) = dense_grads(lambda s: dense_masked_softmax(s, tables, scale, autoregress_at_key), [w], x["dy"])
    dp, dv = dense_grads(lambda p, b: dense_nn(p, b, tables), [y, v], x["do"])
    dp2, dq2 = dense_grads(lambda p, b: dense_tn(p, b, tables), [y, q], x["dt"])
    return {
        "w": dense_nt(q, k, tables, H),
        "dq": dq,
        "dk": dk,
        "y": dense_masked_softmax(w, tables, scale, autoregress_at_key),
        "dx": dx,
        "o": dense_nn(y, v, tables),
        "dp": dp,
        "dv": dv,
        "t": dense_tn(y, q, tables),
        "dp2": dp2,
        "dq2": dq2,
    }


GRADS = ("dq", "dk", "dx", "dp", "dv", "dp2", "dq2")


def check_all(x, got, tables, scale, dtype, autoregress_at_key=None):
    ref = reference_results(x, got, tables, scale, autoregress_at_key)
    dense = dense_results(x, got, tables, scale, autoregress_at_key) if dtype in (tf.float16, tf.bfloat16) else {}
    for name, value in got.items():
        assert value.dtype == dtype, f"{name} has dtype {value.dtype.name}, expected {dtype.name}"
        assert_close_rel(value, ref[name], dense.get(name), dtype, grad=name in GRADS, name=name)


# ---- every dtype x every block size ------------------------------------------------------------------------

# (nQb, nKb, shared layout) per block size: Tq != Tk, both layout kinds, tiny sizes.
GRIDS = {8: (4, 3, True), 16: (3, 4, False), 32: (3, 3, True), 64: (2, 3, False), 128: (2, 1, True)}


@pytest.mark.parametrize("bs", sorted(GRIDS))
@pytest.mark.parametrize("dtype", [tf.float32, tf.float16, tf.bfloat16], ids=lambda d: d.name)
def test_ops_dtype_block_size(rng, dtype, bs):
    n_qb, n_kb, shared = GRIDS[bs]
    tables = make_tables(rng, bs, n_qb, n_kb, shared)
    x = make_inputs(rng, tables, dtype)
    got = op_results(x, tables, 0.25)
    check_all(x, got, tables, 0.25, dtype)


# ---- layouts, Tq != Tk, eager / tf.function (float32) ------------------------------------------------------


@pytest.mark.parametrize("mode", ["eager", "function"])
@pytest.mark.parametrize("grid", [(3, 3), (2, 4), (4, 2)], ids=lambda g: f"{g[0]}x{g[1]}")
@pytest.mark.parametrize("shared", [True, False], ids=["2d", "3d"])
def test_ops_layouts(rng, shared, grid, mode):
    tables = make_tables(rng, 8, *grid, shared, density=rng.uniform(0.3, 0.9))
    assert tables.lut_heads == (1 if shared else H)
    x = make_inputs(rng, tables, tf.float32)
    got = maybe_function(lambda x: op_results(x, tables, 0.3), mode)(x)
    check_all(x, got, tables, 0.3, tf.float32)


@pytest.mark.parametrize("mode", ["eager", "function"])
def test_ops_float64(rng, mode):
    tables = make_tables(rng, 16, 3, 2, shared=False)
    x = make_inputs(rng, tables, tf.float64)
    # The scale input is float32 (as in blocksparse), so it is one that float32 holds exactly.
    got = maybe_function(lambda x: op_results(x, tables, 0.75), mode)(x)
    check_all(x, got, tables, 0.75, tf.float64)


@pytest.mark.parametrize("scale", [-0.7, 1.3])
def test_softmax_scale_tensor_and_sign(rng, scale):
    """``scale`` may be a float32 tensor, and a negative scale is ``softmax(scale * x)`` too."""
    tables = make_tables(rng, 8, 3, 3, shared=True)
    x = uniform(rng, [B, H, tables.blocks, 8, 8])
    y = ops.masked_softmax(x, tables, tf.constant(scale))
    assert_close_rel(y, reference.masked_softmax(f64(x), tables, scale), name="y")


@pytest.mark.parametrize("head_dim, dtype", [(1, tf.float32), (5, tf.float32), (33, tf.float32), (12, tf.float16)])
def test_ops_head_dims(rng, head_dim, dtype):
    """Head dims that are not multiples of the SIMD width (tails of the tile loops)."""
    tables = make_tables(rng, 16, 3, 2, shared=False)
    x = make_inputs(rng, tables, dtype)
    for name in ("q", "k", "v", "do", "dt"):
        x[name] = uniform(rng, x[name].shape[:2] + [H * head_dim], dtype)
    got = op_results(x, tables, 0.5)
    check_all(x, got, tables, 0.5, dtype)


def test_softmax_large_logits(rng):
    """Logits in the thousands: the row max is subtracted before exp (no overflow, no NaN)."""
    tables = make_tables(rng, 8, 3, 3, shared=False)
    x = uniform(rng, [B, H, tables.blocks, 8, 8]) * 3000.0
    y = ops.masked_softmax(x, tables, 1.0)
    assert_close_rel(y, reference.masked_softmax(f64(x), tables, 1.0), name="y")


def _nn_grads_with_unknown_dims(tables, w, v):
    @tf.function(input_signature=[tf.TensorSpec([None] * 5), tf.TensorSpec([None, None, 8])])
    def grads(w, v):
        with tf.GradientTape() as tape:
            tape.watch([w, v])
            y = ops.nn(w, v, tables)
        return tape.gradient(y, [w, v])

    return grads(w, v)


def test_nn_gradients_with_unknown_head_dim():
    """nn's gradient w.r.t. w runs nt(dc, b, heads), whose heads is an attribute: per-head tables supply it
    when w's head dimension is unknown; shared tables cannot, which is a clear ValueError."""
    per_head = build_tables(np.stack([np.tril(np.ones((2, 2)))] * 2), 8)
    dw, dv = _nn_grads_with_unknown_dims(per_head, tf.ones([1, 2, 3, 8, 8]), tf.ones([1, 16, 8]))
    assert dw.shape == (1, 2, 3, 8, 8) and dv.shape == (1, 16, 8)
    shared = build_tables(np.tril(np.ones((2, 2))), 8)
    with pytest.raises(ValueError, match="static head dimension"):
        _nn_grads_with_unknown_dims(shared, tf.ones([1, 2, 3, 8, 8]), tf.ones([1, 16, 8]))


# ---- fully masked rows, empty block rows and columns -------------------------------------------------------


@pytest.mark.parametrize("shared", [True, False], ids=["2d", "3d"])
@pytest.mark.parametrize("dtype", [tf.float32, tf.float16, tf.bfloat16], ids=lambda d: d.name)
def test_fully_masked_rows(rng, dtype, shared):
    """Query rows with no kept key give exactly 0 (no NaN), and so do their gradients; a query-block row
    without blocks gives 0 rows in nn, a key-block column without blocks 0 rows in tn."""
    bs, n_qb, n_kb = 8, 4, 3
    masked_queries = (9, 10, 15)  # in query-block row 1
    tables = make_tables(rng, bs, n_qb, n_kb, shared, density=0.5, masked_queries=masked_queries, empty_rows=(2,))
    assert tables.nn_lut[:, 2, 1].max() == 0  # query-block row 2 is empty
    x = make_inputs(rng, tables, dtype)
    got = op_results(x, tables, 0.5)
    check_all(x, got, tables, 0.5, dtype)

    qb = np.broadcast_to(tables.nt_lut[..., 0], (H, tables.blocks))
    in_row1 = qb == 1  # [H, blocks]
    assert in_row1.any()
    for name in ("y", "dx"):
        value = got[name].numpy()  # [B, H, blocks, bs, bs]
        for t in masked_queries:
            rows = value[:, in_row1][:, :, t % bs]
            assert not np.isnan(rows).any() and (rows == 0).all(), f"{name}: masked query {t} is not exactly 0"
    o, dq2 = got["o"].numpy(), got["dq2"].numpy()
    for t in masked_queries:
        assert (o[:, t] == 0).all(), f"o: masked query {t} is not exactly 0"
    assert (o[:, 2 * bs : 3 * bs] == 0).all() and (dq2[:, 2 * bs : 3 * bs] == 0).all()
    assert (got["dq"].numpy()[:, 2 * bs : 3 * bs] == 0).all()
    empty_cols = [c for c in range(n_kb) if (tables.tn_lut[:, c, 1] == 0).all()]
    for c in empty_cols:
        for name in ("t", "dk", "dv"):
            assert (got[name].numpy()[:, c * bs : (c + 1) * bs] == 0).all(), f"{name}: empty key column {c}"


def test_empty_key_column(rng):
    """tn writes zeros for a key-block column without blocks (the output is allocated, not zeroed, by TF)."""
    layout = np.array([[1, 0, 1], [1, 0, 1]])
    tables = build_tables(layout, 8)
    w = uniform(rng, [B, H, 4, 8, 8])
    b = uniform(rng, [B, 16, C])
    for _ in range(3):  # reuse of freed buffers would expose a missing write
        t = ops.tn(w, b, tables).numpy()
        assert (t[:, 8:16] == 0).all()
        assert_close_rel(t, reference.tn(f64(w), f64(b), tables), name="t")


# ---- softmax without mask, autoregress_at_key ---------------------------------------------------------------


@pytest.mark.parametrize("mode", ["eager", "function"])
@pytest.mark.parametrize("shared", [True, False], ids=["2d", "3d"])
def test_softmax_without_mask(rng, shared, mode):
    tables = make_tables(rng, 16, 3, 4, shared, callback=False)
    assert not tables.has_mask
    x = uniform(rng, [B, H, tables.blocks, 16, 16])
    dy = uniform(rng, x.shape)

    def run(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = ops.masked_softmax(x, tables, 0.5)
        return y, tape.gradient(y, x, output_gradients=dy)

    y, dx = maybe_function(run, mode)(x)
    y_ref = reference.masked_softmax(f64(x), tables, 0.5)
    assert_close_rel(y, y_ref, name="y")
    assert_close_rel(dx, reference.masked_softmax_grad(f64(dy), y_ref, tables, 0.5), name="dx")
    # Every query row of a non-empty block row sums to 1 over all of its blocks.
    row_sums = reference.dense_from_blocks(f64(y), tables).sum(axis=-1)
    has_blocks = np.broadcast_to(tables.layout.any(axis=2), (H, tables.ctx_blks_q)).repeat(16, axis=1)
    np.testing.assert_allclose(row_sums[:, has_blocks], 1.0, rtol=1e-6)


@pytest.mark.parametrize(
    "key, as_tensor, mode",
    [(0, False, "eager"), (5, True, "eager"), (13, False, "function"), (20, True, "function"), (31, False, "eager")],
)
def test_autoregress_at_key(rng, key, as_tensor, mode):
    """Key j of query i is kept iff the mask keeps it and (j < key or j <= i); checked against the reference
    and against TF's dense softmax in float64 (independent of the reference)."""
    tables = make_tables(rng, 8, 3, 4, shared=False, density=0.7)
    x = uniform(rng, [B, H, tables.blocks, 8, 8])
    dy = uniform(rng, x.shape)
    key_arg = tf.constant(key) if as_tensor else key

    def run(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = ops.masked_softmax(x, tables, 0.5, autoregress_at_key=key_arg)
        return y, tape.gradient(y, x, output_gradients=dy)

    y, dx = maybe_function(run, mode)(x)
    y_ref = reference.masked_softmax(f64(x), tables, 0.5, autoregress_at_key=key)
    np.testing.assert_allclose(y_ref, dense_masked_softmax(tf.cast(x, tf.float64), tables, 0.5, key), atol=1e-12)
    assert_close_rel(y, y_ref, name="y")
    assert_close_rel(dx, reference.masked_softmax_grad(f64(dy), y_ref, tables, 0.5), name="dx")
    if key < 31:  # the key really changes the result
        assert np.abs(y_ref - reference.masked_softmax(f64(x), tables, 0.5)).max() > 1e-3


def test_autoregress_fully_masked_row(rng):
    """A row that the autoregressive cut empties is 0 too: the callback keeps only keys after the query."""

    def upper(blk_shape, head_idx, qry_idx, key_idx, blk_idx):
        q, k = np.arange(blk_shape[0])[:, None] + qry_idx * 8, np.arange(blk_shape[1])[None, :] + key_idx * 8
        return k > q

    tables = tables_for_callback(np.ones((2, 2)), 8, upper)
    x = uniform(rng, [1, H, 4, 8, 8])
    y = ops.masked_softmax(x, tables, 1.0, autoregress_at_key=0).numpy()
    assert not np.isnan(y).any() and (y == 0).all()


# ---- references, gradient check, determinism ---------------------------------------------------------------


def test_references_match_dense_tf_float64(rng):
    """The float64 references and the dense-TF baselines agree (each validates the other)."""
    tables = make_tables(rng, 8, 3, 2, shared=False)
    x = make_inputs(rng, tables, tf.float64)
    got = {"w": dense_nt(x["q"], x["k"], tables, H)}
    got["y"] = dense_masked_softmax(got["w"], tables, 0.4)
    ref = reference_results(x, got, tables, 0.4)
    dense = dense_results(x, got, tables, 0.4)
    for name in ref:
        np.testing.assert_allclose(f64(dense[name]), ref[name], atol=1e-12, err_msg=name)


def test_compute_gradient_float64_chain(rng):
    """Finite differences through nt → masked_softmax → nn (tiny, float64, with a causal-style callback)."""
    bs, heads = 8, 2
    layout = np.array([[[1, 0], [1, 1]], [[1, 1], [0, 1]]])
    tables = tables_for_callback(layout, bs, RandomCallback(7, keep=0.6))
    q, k, v = (uniform(rng, [1, 2 * bs, heads * 4], tf.float64) for _ in range(3))

    def chain(q, k, v):
        w = ops.nt(q, k, tables, heads)
        return ops.nn(ops.masked_softmax(w, tables, 0.5), v, tables)

    theoretical, numerical = tf.test.compute_gradient(chain, [q, k, v], delta=2.0**-14)
    for name, t, n in zip("qkv", theoretical, numerical):
        assert np.abs(t - n).max() <= 1e-6, f"d{name}: max error {np.abs(t - n).max():.3e}"
        assert np.abs(t).max() > 1e-3


@pytest.mark.parametrize("dtype", [tf.float32, tf.bfloat16], ids=lambda d: d.name)
def test_deterministic(rng, dtype):
    tables = make_tables(rng, 16, 4, 4, shared=False)
    x = make_inputs(rng, tables, dtype)
    first = op_results(x, tables, 0.25)
    second = op_results(x, tables, 0.25)
    for name in first:
        a, b = first[name].numpy(), second[name].numpy()
        assert a.tobytes() == b.tobytes(), f"{name} differs between two runs"
