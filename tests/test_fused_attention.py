"""The fused block-sparse attention op (bsattn.fused_attention) against the float64 reference
(bsattn.reference.fused_attention / fused_attention_grad) and against the unfused path.

Every feature is checked forward and backward (dq, dk, dv, dbias, and the lse output with its gradient) in
float64 (exact: 1e-10) and float32 (1e-5); float16/bfloat16 are bounded by the error of dense TF attention in
the same dtype (conftest.assert_close_rel). Also: block sizes x head dims, the four sparse_attention modes
fused == unfused, BlocksparseTransformer tables, determinism, dropout (reproducible by seed, the keep mask
itself, keep-rate statistics, finite differences), the ISA fallbacks, and clear errors for bad input.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from conftest import (
    RandomCallback,
    assert_close_rel,
    f64,
    maybe_function,
    random_layout,
    uniform,
)

from bsattn import (
    BlocksparseTransformer,
    blocksparse_attention_impl,
    patterns,
    reference,
)
from bsattn._loader import load_ops
from bsattn.fused_attention import fused_attention
from bsattn.fused_tables import (
    from_block_tables,
    fused_tables_for_layout,
    fused_tables_for_pattern,
)

pytestmark = pytest.mark.ops

B, H = 2, 2


# ---- cases --------------------------------------------------------------------------------------------------


def make_tables(rng, kind: str, bs: int = 16, heads: int = H):
    """'causal': a shared 2-D causal layout, T = 4 blocks. 'random': per-head 3-D layouts with different block
    counts, an empty query-block row, random in-block masks with a fully masked query, Tq = 4 != Tk = 6 blocks."""
    if kind == "causal":
        return fused_tables_for_pattern(patterns.Causal(), 4 * bs, 4 * bs, bs)
    layout = random_layout(rng, 4, 6, heads, density=0.5, equal_counts=False, empty_rows=(1,))
    return fused_tables_for_layout(layout, bs, RandomCallback(int(rng.integers(1 << 30)), 0.7, masked_queries=(5,)))


def make_inputs(rng, tables, dtype, d=16, heads=H, kpm=False, bias_heads=None, dlse=False, bias_batch=None):
    """bias: [bias_heads, Tq, Tk] (rank 3, the older form), or [bias_batch, bias_heads, Tq, Tk] with bias_batch."""
    tq, tk = tables.n_q, tables.n_k
    x = {
        "q": uniform(rng, [B, tq, heads * d], dtype),
        "k": uniform(rng, [B, tk, heads * d], dtype),
        "v": uniform(rng, [B, tk, heads * d], dtype),
        "dout": uniform(rng, [B, tq, heads * d], dtype),
        "kpm": None,
        "bias": None,
        "dlse": None,
    }
    if kpm:
        keep = rng.random((B, tk)) > 0.25
        keep[0, : tables.block_size] = False  # a key block that is all padding
        keep[1, :] = False  # a batch entry with nothing to attend: every row empty
        keep[1, 3] = True
        x["kpm"] = keep
    if bias_heads:
        lead = (bias_heads,) if bias_batch is None else (bias_batch, bias_heads)
        x["bias"] = tf.constant(0.5 * rng.standard_normal((*lead, tq, tk)), dtype)
    if dlse:
        lse_dtype = tf.float64 if dtype == tf.float64 else tf.float32
        x["dlse"] = uniform(rng, [B, heads, tq], lse_dtype)
    return x


def run_fused(x, tables, heads, mode="eager", **kwargs):
    """(out, lse, [dq, dk, dv(, dbias)]) for the upstream gradients dout (and dlse)."""

    def fn(q, k, v, bias, dout, dlse):
        with tf.GradientTape() as tape:
            watched = [q, k, v] + ([bias] if bias is not None else [])
            tape.watch(watched)
            out, lse = fused_attention(
                q, k, v, tables, heads, key_padding_mask=x["kpm"], bias=bias, return_lse=True, **kwargs
            )
        targets, upstream = ([out, lse], [dout, dlse]) if dlse is not None else ([out], [dout])
        return out, lse, tape.gradient(targets, watched, output_gradients=upstream)

    return maybe_function(fn, mode)(x["q"], x["k"], x["v"], x["bias"], x["dout"], x["dlse"])


def run_reference(x, tables, heads, scale=None, dropout_rate=0.0, seed=0):
    args = {
        "scale": scale,
        "key_padding_mask": x["kpm"],
        "bias": None if x["bias"] is None else f64(x["bias"]),
        "dropout_rate": dropout_rate,
        "seed": seed,
    }
    q, k, v, dout = (f64(x[n]) for n in ("q", "k", "v", "dout"))
    out, lse = reference.fused_attention(q, k, v, tables, heads, **args)
    dlse = None if x["dlse"] is None else f64(x["dlse"])
    dq, dk, dv, dbias = reference.fused_attention_grad(q, k, v, tables, heads, dout, dlse=dlse, **args)
    return out, lse, [dq, dk, dv] + ([dbias] if dbias is not None else [])


def dense_tf(x, tables, heads, dtype, scale, dropout_rate=0.0, seed=0):
    """The same attention with TF's dense ops in ``dtype`` → (out, grads): the error baseline of float16/bfloat16."""
    keep = np.broadcast_to(tables.token_mask()[None], (B, heads, tables.n_q, tables.n_k))
    if x["kpm"] is not None:
        keep = keep & x["kpm"][:, None, None, :]
    keep_t = tf.constant(keep)
    z = reference._dropout_scale(keep.astype(float), dropout_rate, seed)

    def heads_of(t):
        b, n, c = t.shape
        return tf.transpose(tf.reshape(t, [b, n, heads, c // heads]), [0, 2, 1, 3])

    def attention(q, k, v, bias):
        s = tf.matmul(heads_of(q), heads_of(k), transpose_b=True) * tf.constant(scale, dtype)
        if bias is not None:
            s = s + (bias[None] if bias.shape.rank == 3 else bias)
        s = tf.where(keep_t, s, tf.constant(dtype.min, dtype))
        p = tf.where(tf.reduce_any(keep_t, axis=-1, keepdims=True), tf.nn.softmax(s), tf.zeros_like(s))
        p = p * tf.constant(z, dtype)
        o = tf.matmul(p, heads_of(v))
        b, _, n, d = o.shape
        return tf.reshape(tf.transpose(o, [0, 2, 1, 3]), [b, n, heads * d])

    inputs = [x["q"], x["k"], x["v"]] + ([x["bias"]] if x["bias"] is not None else [])
    with tf.GradientTape() as tape:
        tape.watch(inputs)
        out = attention(x["q"], x["k"], x["v"], x["bias"])
    return out, tape.gradient(out, inputs, output_gradients=x["dout"])


def assert_lse(lse, ref):
    """-inf exactly where the reference has an empty row, float32-accurate elsewhere."""
    lse = f64(lse)
    empty = np.isneginf(ref)
    np.testing.assert_array_equal(np.isneginf(lse), empty)
    assert_close_rel(lse[~empty], ref[~empty], dtype=tf.float32, name="lse")


def check(got, want, dtype, dense=None):
    out, lse, grads = got
    ref_out, ref_lse, ref_grads = want
    assert out.dtype == dtype and lse.dtype == (tf.float64 if dtype == tf.float64 else tf.float32)
    dense_out, dense_grads = dense if dense is not None else (None, [None] * len(grads))
    assert_close_rel(out, ref_out, dense_out, dtype, name="out")
    assert_lse(lse, ref_lse)
    assert len(grads) == len(ref_grads)
    for name, g, r, dg in zip(("dq", "dk", "dv", "dbias"), grads, ref_grads, dense_grads):
        assert g.dtype == dtype
        assert_close_rel(g, r, dg, dtype, grad=True, name=name)
    # A query with no kept key: output exactly 0.
    rows = np.isneginf(ref_lse).transpose(0, 2, 1)  # [B, Tq, H]
    out_heads = f64(out).reshape(rows.shape + (-1,))
    assert (out_heads[rows] == 0).all()


# ---- every feature, float64 and float32 ---------------------------------------------------------------------

FEATURES = {
    "causal_2d": {"kind": "causal"},
    "per_head_random": {"kind": "random"},
    "key_padding": {"kind": "causal", "kpm": True},
    "bias_per_head": {"kind": "random", "bias_heads": H},
    "bias_shared": {"kind": "causal", "bias_heads": 1},
    "dropout": {"kind": "random", "dropout_rate": 0.25, "seed": 11},
    "scale": {"kind": "causal", "scale": 0.3},
    "lse_grad": {"kind": "random", "dlse": True},
    "everything": {
        "kind": "random",
        "kpm": True,
        "bias_heads": 1,
        "dropout_rate": 0.4,
        "seed": -5,
        "scale": 0.5,
        "dlse": True,
    },
}


def feature_case(rng, dtype, kind, kpm=False, bias_heads=None, dlse=False, **op_args):
    tables = make_tables(rng, kind)
    return tables, make_inputs(rng, tables, dtype, kpm=kpm, bias_heads=bias_heads, dlse=dlse), op_args


@pytest.mark.parametrize("dtype", [tf.float64, tf.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("feature", list(FEATURES))
def test_feature(rng, feature, dtype):
    tables, x, op_args = feature_case(rng, dtype, **FEATURES[feature])
    check(run_fused(x, tables, H, **op_args), run_reference(x, tables, H, **op_args), dtype)


@pytest.mark.parametrize("dtype", [tf.float64, tf.float32], ids=["float64", "float32"])
def test_everything_in_tf_function(rng, dtype):
    tables, x, op_args = feature_case(rng, dtype, **FEATURES["everything"])
    check(run_fused(x, tables, H, mode="function", **op_args), run_reference(x, tables, H, **op_args), dtype)


@pytest.mark.parametrize("dtype", [tf.float16, tf.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("feature", ["per_head_random", "everything"])
def test_reduced_precision(rng, feature, dtype):
    spec = dict(FEATURES[feature], dlse=False)  # the dense baseline has no lse
    tables, x, op_args = feature_case(rng, dtype, **spec)
    scale = op_args.get("scale", 1 / np.sqrt(16))
    dense = dense_tf(x, tables, H, dtype, scale, op_args.get("dropout_rate", 0.0), op_args.get("seed", 0))
    check(run_fused(x, tables, H, **op_args), run_reference(x, tables, H, **op_args), dtype, dense)


@pytest.mark.parametrize("bs, d", [(8, 32), (16, 64), (32, 128), (64, 64), (128, 32), (128, 128), (64, 24), (16, 20)])
def test_block_sizes_and_head_dims(rng, bs, d):
    tables = fused_tables_for_pattern(patterns.Causal() | patterns.Local(bs), max(2 * bs, 64), max(2 * bs, 64), bs)
    x = make_inputs(rng, tables, tf.float32, d=d, kpm=True, bias_heads=H)
    check(
        run_fused(x, tables, H, dropout_rate=0.2, seed=3),
        run_reference(x, tables, H, dropout_rate=0.2, seed=3),
        tf.float32,
    )


BIAS_BROADCASTS = [(B, H), (1, H), (B, 1), (1, 1)]


@pytest.mark.parametrize("dtype", [tf.float64, tf.float32, tf.float16, tf.bfloat16],
                         ids=["float64", "float32", "float16", "bfloat16"])
@pytest.mark.parametrize("bias_batch, bias_heads", BIAS_BROADCASTS, ids=[f"{b}x{h}" for b, h in BIAS_BROADCASTS])
def test_bias_broadcasts(rng, bias_batch, bias_heads, dtype):
    """bias [B|1, H|1, Tq, Tk] with per-head layouts and key padding: out, lse, dq, dk, dv and dbias (summed over
    what it broadcasts over) against the float64 reference; 16-bit dtypes within dense TF's error."""
    tables = make_tables(rng, "random")
    x = make_inputs(rng, tables, dtype, kpm=True, bias_heads=bias_heads, bias_batch=bias_batch)
    dense = dense_tf(x, tables, H, dtype, 1 / np.sqrt(16)) if dtype in (tf.float16, tf.bfloat16) else None
    got = run_fused(x, tables, H)
    assert tuple(got[2][3].shape) == (bias_batch, bias_heads, tables.n_q, tables.n_k)
    check(got, run_reference(x, tables, H), dtype, dense)


@pytest.mark.parametrize("bias_batch, bias_heads", BIAS_BROADCASTS, ids=[f"{b}x{h}" for b, h in BIAS_BROADCASTS])
def test_bias_broadcasts_in_tf_function(rng, bias_batch, bias_heads):
    tables = make_tables(rng, "random")
    x = make_inputs(rng, tables, tf.float32, kpm=True, bias_heads=bias_heads, bias_batch=bias_batch, dlse=True)
    check(run_fused(x, tables, H, mode="function", dropout_rate=0.3, seed=4),
          run_reference(x, tables, H, dropout_rate=0.3, seed=4), tf.float32)


def test_rank3_bias_is_a_batch_broadcast(rng):
    """The older [H|1, Tq, Tk] bias equals [1, H|1, Tq, Tk]: same outputs, and dbias keeps the rank-3 shape."""
    tables = make_tables(rng, "causal")
    x = make_inputs(rng, tables, tf.float64, bias_heads=H)
    three = run_fused(x, tables, H)
    four = run_fused(dict(x, bias=x["bias"][None]), tables, H)
    assert three[2][3].shape == x["bias"].shape
    np.testing.assert_array_equal(three[0], four[0])
    np.testing.assert_array_equal(three[2][3], four[2][3][0])


def test_bias_broadcast_dbias_deterministic(rng):
    """dbias shared by the batch and the heads, with per-head layouts on 2 threads: the same bits every run
    (one writer per dbias entry: batch entries and heads are walked in turn by one unit)."""
    tables = make_tables(rng, "random")
    x = make_inputs(rng, tables, tf.float32, d=32, kpm=True, bias_heads=1, bias_batch=1)
    first = run_fused(x, tables, H)[2]
    for _ in range(3):
        for a, b in zip(first, run_fused(x, tables, H)[2]):
            np.testing.assert_array_equal(a, b)


def test_per_head_pattern_with_four_heads(rng):
    """'fixed' with num_verts = 4: four layouts; heads differ in which summary columns they read."""
    tables = fused_tables_for_pattern(patterns.Fixed(32, 4, 1, 4, 8), 64, 64, 8)
    x = make_inputs(rng, tables, tf.float64, d=8, heads=4, bias_heads=4)
    check(run_fused(x, tables, 4), run_reference(x, tables, 4), tf.float64)


def test_dynamic_batch_in_tf_function(rng):
    tables = make_tables(rng, "causal")
    spec = tf.TensorSpec([None, tables.n_q, H * 16], tf.float32)

    @tf.function(input_signature=[spec, spec, spec])
    def attend(q, k, v):
        with tf.GradientTape() as tape:
            tape.watch(q)
            out = fused_attention(q, k, v, tables, H)
        return out, tape.gradient(out, q)

    x = make_inputs(rng, tables, tf.float32)
    out, dq = attend(x["q"], x["k"], x["v"])
    ref_out, _ = reference.fused_attention(f64(x["q"]), f64(x["k"]), f64(x["v"]), tables, H)
    ones = np.ones(ref_out.shape)
    ref_dq = reference.fused_attention_grad(f64(x["q"]), f64(x["k"]), f64(x["v"]), tables, H, ones)[0]
    assert_close_rel(out, ref_out, name="out")
    assert_close_rel(dq, ref_dq, name="dq")


# ---- the unfused path ----------------------------------------------------------------------------------------

MODES = [
    ("all", {}),
    ("local", {"local_attn_ctx": 32}),
    ("strided", {"local_attn_ctx": 8}),
    ("fixed", {"local_attn_ctx": 32, "num_verts": 2, "vertsize": 1}),
]


@pytest.mark.parametrize("mode, kwargs", MODES, ids=[m for m, _ in MODES])
def test_fused_equals_unfused_modes(rng, mode, kwargs):
    q, k, v, dout = (uniform(rng, [B, 128, 4 * 16]) for _ in range(4))
    results = []
    for engine in ("fused", "unfused"):
        with tf.GradientTape() as tape:
            tape.watch([q, k, v])
            out = blocksparse_attention_impl(q, k, v, 4, mode, blocksize=16, engine=engine, **kwargs)
        results.append([out] + tape.gradient(out, [q, k, v], output_gradients=dout))
    for name, fused, unfused in zip(("out", "dq", "dk", "dv"), *results):
        assert_close_rel(fused, f64(unfused), name=name)


def test_blocksparse_transformer_tables(rng):
    """A BlocksparseTransformer with a random mask callback: fused on from_block_tables == its three ops."""
    layout = random_layout(rng, 4, 4, H, density=0.6)
    bst = BlocksparseTransformer(layout, block_size=16, mask_callback=RandomCallback(3, masked_queries=(2,)))
    tables = from_block_tables(bst.tables)
    q, k, v = (uniform(rng, [B, 64, H * 16], tf.float64) for _ in range(3))
    unfused = bst.weight_value_op(bst.masked_softmax(bst.query_key_op(q, k), scale=0.25), v)
    fused = fused_attention(q, k, v, tables, H, scale=0.25)
    assert_close_rel(fused, f64(unfused), name="out")


def test_recompute(rng):
    q, k, v = (uniform(rng, [1, 64, 32]) for _ in range(3))
    results = []
    for recompute in (False, True):
        with tf.GradientTape() as tape:
            tape.watch([q, k, v])
            out = blocksparse_attention_impl(q, k, v, 2, "all", blocksize=16, recompute=recompute)
        results.append([out] + tape.gradient(out, [q, k, v]))
    for a, b in zip(*results):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


# ---- determinism and dropout ----------------------------------------------------------------------------------


def test_deterministic(rng):
    """Two runs (several threads, dynamic scheduling) give identical bits, forward and backward."""
    tables = fused_tables_for_pattern(patterns.Fixed(64, 2, 1, 4, 32), 256, 256, 32)
    x = make_inputs(rng, tables, tf.float32, d=32, heads=4, kpm=True, bias_heads=1, dlse=True)
    first, second = (run_fused(x, tables, 4, dropout_rate=0.1, seed=9) for _ in range(2))
    for a, b in zip([first[0], first[1], *first[2]], [second[0], second[1], *second[2]]):
        assert a.numpy().tobytes() == b.numpy().tobytes()


def test_dropout_seed(rng):
    tables = make_tables(rng, "causal")
    x = make_inputs(rng, tables, tf.float32)

    @tf.function
    def attend(seed):
        return fused_attention(x["q"], x["k"], x["v"], tables, H, dropout_rate=0.5, seed=seed)

    a, b, c = attend(tf.constant(1, tf.int64)), attend(tf.constant(1, tf.int64)), attend(tf.constant(2, tf.int64))
    assert attend.experimental_get_tracing_count() == 1  # a seed tensor does not retrace
    assert a.numpy().tobytes() == b.numpy().tobytes()
    assert not np.allclose(a.numpy(), c.numpy())
    # Without a seed every call draws one.
    d, e = (fused_attention(x["q"], x["k"], x["v"], tables, H, dropout_rate=0.5) for _ in range(2))
    assert not np.allclose(d.numpy(), e.numpy())


@pytest.mark.parametrize("rate", [0.1, 0.5, 0.9])
def test_dropout_keep_mask(rate):
    """With q = 0 every kept key gets probability 1/Tk and one-hot values read each entry's dropout factor
    back: it must be the reference hash's mask, and kept at a rate 1 - p within 5 sigma."""
    n, bs, seed = 64, 16, 1234
    tables = fused_tables_for_pattern(patterns.Dense(), n, n, bs)
    q = tf.zeros([B, n, n], tf.float64)
    v = tf.tile(tf.eye(n, dtype=tf.float64)[None], [B, 1, 1])  # key j carries e_j: out[b, i, j] = z_ij / n
    out = fused_attention(q, q, v, tables, 1, dropout_rate=rate, seed=seed).numpy()
    rate32 = float(np.float32(rate))
    kept = out * n * (1 - rate32)
    np.testing.assert_allclose(kept, np.round(kept), atol=1e-9)
    expected = reference.dropout_keep_mask(seed, rate, B, 1, n, n)[:, 0]
    np.testing.assert_array_equal(np.round(kept).astype(bool), expected)
    count = expected.size
    sigma = np.sqrt(count * rate * (1 - rate))
    assert abs(expected.sum() - count * (1 - rate)) < 5 * sigma


def test_dropout_gradient_finite_differences(rng):
    """With a fixed seed the dropped function is smooth: directional derivatives in float64 match."""
    tables = make_tables(rng, "random")
    x = make_inputs(rng, tables, tf.float64, d=8, kpm=True, bias_heads=H, dlse=True)
    args = {"key_padding_mask": x["kpm"], "dropout_rate": 0.3, "seed": 77, "return_lse": True}
    w_out, w_lse = x["dout"], x["dlse"]

    def loss(q, k, v, bias):
        out, lse = fused_attention(q, k, v, tables, H, bias=bias, **args)
        finite = tf.where(tf.math.is_inf(lse), tf.zeros_like(lse), lse)
        return tf.reduce_sum(out * w_out) + tf.reduce_sum(finite * w_lse)

    inputs = [x["q"], x["k"], x["v"], x["bias"]]
    with tf.GradientTape() as tape:
        tape.watch(inputs)
        value = loss(*inputs)
    grads = tape.gradient(value, inputs)
    eps = 1e-6
    for i, name in enumerate(("q", "k", "v", "bias")):
        direction = tf.constant(rng.standard_normal(inputs[i].shape), tf.float64)
        plus = [t + eps * direction if j == i else t for j, t in enumerate(inputs)]
        minus = [t - eps * direction if j == i else t for j, t in enumerate(inputs)]
        numeric = float(loss(*plus) - loss(*minus)) / (2 * eps)
        analytic = float(tf.reduce_sum(grads[i] * direction))
        assert abs(numeric - analytic) <= 1e-6 * max(1.0, abs(analytic)), (name, numeric, analytic)


# ---- ISA levels ------------------------------------------------------------------------------------------------

_ISA_SCRIPT = """
import json, sys
import numpy as np, tensorflow as tf
from bsattn import patterns, reference
from bsattn.fused_tables import fused_tables_for_pattern
from bsattn.fused_attention import fused_attention
rng = np.random.default_rng(0)
t = fused_tables_for_pattern(patterns.Causal() | patterns.Local(32), 128, 128, 32)
q, k, v, do = (rng.uniform(-1, 1, (2, 128, 96)) for _ in range(4))
qt, kt, vt = (tf.constant(a, tf.float32) for a in (q, k, v))
with tf.GradientTape() as tape:
    tape.watch([qt, kt, vt])
    out = fused_attention(qt, kt, vt, t, 2)
grads = tape.gradient(out, [qt, kt, vt], output_gradients=tf.constant(do, tf.float32))
ref = [reference.fused_attention(q, k, v, t, 2)[0], *reference.fused_attention_grad(q, k, v, t, 2, do)[:3]]
errors = [float(np.abs(a.numpy() - r).max() / np.abs(r).max()) for a, r in zip([out, *grads], ref)]
print(json.dumps(errors))
"""


def test_lower_isa_levels():
    """The AVX2 and baseline instances of the matmul/exp kernels (this CPU runs AVX-512) are as accurate."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    procs = {
        isa: subprocess.Popen(
            [sys.executable, "-c", _ISA_SCRIPT],
            env=dict(env, BSATTN_CPU_ISA=isa),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=Path(__file__).parent,
        )
        for isa in ("avx2", "baseline")
    }
    for isa, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr[-2000:]
        errors = json.loads(stdout.strip().splitlines()[-1])
        assert max(errors) < 1e-5, (isa, errors)


# ---- errors ---------------------------------------------------------------------------------------------------

BS, D = 8, 4
ROW_PTR = np.array([[0, 1, 3]], np.int32)  # layout [[1, 0], [1, 1]]: row 0 = block (0, 0), row 1 = (1, 0), (1, 1)
ROW_ENTRIES = np.array([[0, 0], [0, -1], [1, 0]], np.int32)  # diagonal blocks partial (mask 0), (1, 0) full
COL_PTR = np.array([[0, 2, 3]], np.int32)
COL_ENTRIES = np.array([[0, 0], [1, -1], [1, 0]], np.int32)
MASKS = np.array([[[(1 << (i + 1)) - 1] for i in range(BS)]], np.int32)  # causal inside the block


def forward_inputs(**changes):
    x = {
        "q": tf.ones([1, 16, H * D]),
        "k": tf.ones([1, 16, H * D]),
        "v": tf.ones([1, 16, H * D]),
        "row_ptr": ROW_PTR,
        "row_entries": ROW_ENTRIES,
        "masks": MASKS,
        "key_padding_mask": tf.ones([1, 16], tf.bool),
        "bias": tf.zeros([1, 1, 16, 16]),
        "q_segment_ids": tf.zeros([0, 0], tf.int32),
        "k_segment_ids": tf.zeros([0, 0], tf.int32),
        "seed": tf.constant(0, tf.int64),
        "q_offset": tf.constant(0, tf.int32),
        "heads": H,
        "block_size": BS,
        "scale": 0.5,
        "dropout_rate": 0.1,
        "has_key_padding_mask": True,
        "has_bias": True,
    }
    x.update(changes)
    return x


def without_q_offset(x):
    """The forward's raw inputs as the gradient op's (which has no q_offset)."""
    return {name: value for name, value in x.items() if name != "q_offset"}


def grad_inputs(**changes):
    fwd = forward_inputs()
    out, lse = load_ops().bsattn_fused_attention(**fwd)
    x = dict(without_q_offset(fwd), out=out, lse=lse, dout=tf.ones_like(out), dlse=tf.ones_like(lse), col_ptr=COL_PTR,
             col_entries=COL_ENTRIES, has_dlse=True)  # fmt: skip
    x.update(changes)
    return x


FORWARD_ERRORS = {
    "q_rank": ({"q": tf.ones([16, 8])}, r"q must be \[batch, time, heads\*head_dim\]"),
    "q_length": ({"q": tf.ones([1, 12, 8])}, r"q length 12 is not a multiple of block_size 8"),
    "width_heads": (
        {"q": tf.ones([1, 16, 9]), "k": tf.ones([1, 16, 9]), "v": tf.ones([1, 16, 9])},
        r"width 9 is not divisible by heads 2",
    ),
    "v_shape": ({"v": tf.ones([1, 8, 8])}, r"v must have shape \[1,16,8\], got \[1,8,8\]"),
    "batch": ({"q": tf.ones([2, 16, 8])}, r"q and k must have the same batch and width"),
    "block_size": ({"block_size": 12}, r"block_size = 12 is not a supported block size"),
    "scale": ({"scale": float("inf")}, r"scale must be finite"),
    "dropout": ({"dropout_rate": 1.0}, r"dropout_rate must be in \[0, 1\), got 1"),
    "masks_shape": ({"masks": np.zeros((1, 16, 1), np.int32)}, r"masks must have shape \[P, 8, 1\], got \[1,16,1\]"),
    "row_ptr_shape": ({"row_ptr": ROW_PTR[:, :2]}, r"row_ptr must have shape \[L, 3\], got \[1,2\]"),
    "row_ptr_heads": (
        {"row_ptr": np.repeat(ROW_PTR, 3, axis=0)},
        r"row_ptr has 3 layouts; expected 1 \(shared\) or heads = 2",
    ),
    "row_ptr_decreasing": (
        {"row_ptr": np.array([[0, 2, 1]], np.int32)},
        r"row_ptr\[0, 2\] = 1 breaks the row pointers",
    ),
    "row_ptr_past_end": ({"row_ptr": np.array([[0, 1, 4]], np.int32)}, r"row_ptr\[0, 2\] = 4 .*within \[0, 3\]"),
    "row_ptr_negative": ({"row_ptr": np.array([[-1, 1, 3]], np.int32)}, r"row_ptr\[0, 0\] = -1"),
    "row_entries_shape": (
        {"row_entries": np.zeros((3, 3), np.int32)},
        r"row_entries must have shape \[E, 2\], got \[3,3\]",
    ),
    "row_block_range": (
        {"row_entries": np.array([[0, 0], [0, -1], [2, 0]], np.int32)},
        r"row_entries\[2\] = \(2, 0\) in layout 0, row 1: blocks must be in \[0, 2\)",
    ),
    "row_block_order": (
        {"row_entries": np.array([[0, 0], [1, -1], [0, 0]], np.int32)},
        r"row_entries\[2\] = \(0, 0\).*strictly increasing",
    ),
    "row_block_twice": (
        {"row_entries": np.array([[0, 0], [1, -1], [1, 0]], np.int32)},
        r"row_entries\[2\] = \(1, 0\).*strictly increasing",
    ),
    "mask_id_high": (
        {"row_entries": np.array([[0, 1], [0, -1], [1, 0]], np.int32)},
        r"row_entries\[0\] = \(0, 1\): mask id must be -1 \(full block\) or in \[0, 1\)",
    ),
    "mask_id_low": (
        {"row_entries": np.array([[0, -2], [0, -1], [1, 0]], np.int32)},
        r"row_entries\[0\] = \(0, -2\): mask id",
    ),
    "key_padding_mask": (
        {"key_padding_mask": tf.ones([1, 8], tf.bool)},
        r"key_padding_mask must have shape \[1,16\], got \[1,8\]",
    ),
    "bias_heads": (
        {"bias": tf.zeros([1, 3, 16, 16])},
        r"bias must have shape \[1 or 1, 1 or 2, 16, 16\], got \[1,3,16,16\]",
    ),
    "bias_batch": ({"bias": tf.zeros([2, 1, 16, 16])}, r"bias must have shape \[1 or 1, 1 or 2, 16, 16\], got \[2,1,16,16\]"),
    "bias_rank": ({"bias": tf.zeros([1, 16, 16])}, r"bias must have shape \[1 or 1, 1 or 2, 16, 16\], got \[1,16,16\]"),
    "bias_length": ({"bias": tf.zeros([1, 1, 16, 8])}, r"bias must have shape .*got \[1,1,16,8\]"),
    "seed": ({"seed": tf.constant([1, 2], tf.int64)}, r"seed must be a scalar, got shape \[2\]"),
}


def raises_invalid(match):
    return pytest.raises(tf.errors.InvalidArgumentError, match=match)


def test_bias_rank_in_graph_mode():
    """The shape functions name bias when its rank is not 4."""
    for op, inputs in (("bsattn_fused_attention", forward_inputs), ("bsattn_fused_attention_grad", grad_inputs)):
        x = inputs(bias=np.zeros([1, 16, 16], np.float32))
        with pytest.raises(ValueError, match=r"bias must have rank 4 \[batch or 1, heads or 1, Tq, Tk\]"):
            tf.function(lambda x=x, op=op: getattr(load_ops(), op)(**x)).get_concrete_function()


def test_valid_inputs_run():
    out, lse = load_ops().bsattn_fused_attention(**forward_inputs())
    assert out.shape == (1, 16, 8) and lse.shape == (1, H, 16)
    _dq, _dk, _dv, dbias = load_ops().bsattn_fused_attention_grad(**grad_inputs())
    assert dbias.shape == (1, 1, 16, 16)


@pytest.mark.parametrize("case", list(FORWARD_ERRORS))
def test_forward_errors(case):
    changes, match = FORWARD_ERRORS[case]
    with raises_invalid(match):
        load_ops().bsattn_fused_attention(**forward_inputs(**changes))


GRAD_ERRORS = {
    "out_shape": ({"out": tf.ones([1, 8, 8])}, r"out must have shape \[1,16,8\], got \[1,8,8\]"),
    "dout_shape": ({"dout": tf.ones([1, 16, 4])}, r"dout must have shape \[1,16,8\]"),
    "lse_shape": ({"lse": tf.ones([1, 16, 2])}, r"lse must have shape \[1,2,16\], got \[1,16,2\]"),
    "dlse_shape": ({"dlse": tf.ones([1, 2])}, r"dlse must have shape \[1,2,16\]"),
    "col_ptr_shape": ({"col_ptr": np.array([[0, 3]], np.int32)}, r"col_ptr must have shape \[L, 3\]"),
    "col_block_range": (
        {"col_entries": np.array([[0, 0], [5, -1], [1, 0]], np.int32)},
        r"col_entries\[1\] = \(5, -1\) in layout 0, row 0: blocks must be in \[0, 2\)",
    ),
    "col_missing_block": (
        {"col_entries": np.array([[0, 0], [1, 0], [1, 0]], np.int32)},
        r"col_entries do not match row_entries: block \(1, 0\) with mask id -1",
    ),
    "col_counts": (
        {"col_ptr": np.array([[0, 1, 3]], np.int32), "col_entries": np.array([[0, 0], [0, -1], [1, 0]], np.int32)},
        r"col_entries do not match row_entries",
    ),
    "col_layouts": ({"col_ptr": np.repeat(COL_PTR, 2, axis=0)}, r"col_ptr has 2 layouts but row_ptr has 1"),
}


@pytest.mark.parametrize("case", list(GRAD_ERRORS))
def test_grad_errors(case):
    changes, match = GRAD_ERRORS[case]
    with raises_invalid(match):
        load_ops().bsattn_fused_attention_grad(**grad_inputs(**changes))


def test_python_errors(rng):
    tables = make_tables(rng, "causal")  # T = 64, bs 16
    q = tf.ones([1, 64, 32])
    with pytest.raises(ValueError, match=r"q must have shape \[\?, 64, \?\], got \(1, 48, 32\)"):
        fused_attention(tf.ones([1, 48, 32]), q, q, tables, 2)
    with pytest.raises(ValueError, match=r"k must have shape \[1, 64, 32\]"):
        fused_attention(q, tf.ones([1, 64, 16]), q, tables, 2)
    with pytest.raises(ValueError, match=r"heads must be a positive integer"):
        fused_attention(q, q, q, tables, 0)
    with pytest.raises(ValueError, match=r"tables have 2 layout heads; with heads=4 they need 1 or 4"):
        fused_attention(q, q, q, fused_tables_for_layout(np.ones((2, 4, 4)), 16), 4)
    with pytest.raises(ValueError, match=r"dropout_rate must be in \[0, 1\)"):
        fused_attention(q, q, q, tables, 2, dropout_rate=1.0)
    expected = r"bias must have shape \[1 or 1, 1 or 2, 64, 64\] \(or \[1 or 2, 64, 64\]\)"
    for bad in ([1, 64, 32], [3, 64, 64], [2, 1, 64, 64], [1, 3, 64, 64], [64, 64], [1, 1, 1, 64, 64]):
        with pytest.raises(ValueError, match=expected + rf", got \({', '.join(map(str, bad))},?\)"):
            fused_attention(q, q, q, tables, 2, bias=tf.zeros(bad))
    with pytest.raises(ValueError, match=r"key_padding_mask must have shape \[1, 64\]"):
        fused_attention(q, q, q, tables, 2, key_padding_mask=tf.ones([1, 32], tf.bool))
    with pytest.raises(ValueError, match=r"scale must be finite"):
        fused_attention(q, q, q, tables, 2, scale=float("nan"))
    with pytest.raises(TypeError, match=r"q, k and v must share one dtype"):
        fused_attention(q, tf.ones([1, 64, 32], tf.float16), q, tables, 2)
    with pytest.raises(TypeError, match=r"tables must be a FusedTables"):
        fused_attention(q, q, q, object(), 2)
    with pytest.raises(ValueError, match=r"engine must be one of \('fused', 'unfused'\)"):
        blocksparse_attention_impl(q, q, q, 2, "all", blocksize=16, engine="flash")


# ---- reliability: masked positions never read, NaN rows, empty batches ----------------------------------------

REDUCED = {"float32": tf.float32, "float16": tf.float16, "bfloat16": tf.bfloat16}


def poisoned(x, name, index, value=np.nan):
    """x with x[name][index] = value (a new tensor)."""
    a = f64(x[name]).copy()
    a[index] = value
    return dict(x, **{name: tf.constant(a, x[name].dtype)})


def check_ignored(x_clean, x_bad, tables, dtype, **op_args):
    """The op on x_bad (NaN/Inf only at masked positions) is finite and matches the float64 reference (which
    never reads masked entries); 16-bit dtypes within dense TF's error on the clean inputs."""
    dense = None
    if dtype != tf.float32:
        dense = dense_tf(x_clean, tables, H, dtype, op_args.get("scale", 1 / np.sqrt(16)))
    check(run_fused(x_bad, tables, H, **op_args), run_reference(x_bad, tables, H, **op_args), dtype, dense)


@pytest.mark.parametrize("dtype", list(REDUCED.values()), ids=list(REDUCED))
@pytest.mark.parametrize("where", ["v", "k", "bias"])
def test_nan_at_padded_key_never_read(rng, where, dtype):
    """NaN / Inf in v, k or the bias of padded keys (key_padding_mask False) reach no output or gradient (it
    used to make every output of the batch entry NaN, and every dq NaN for k)."""
    tables = make_tables(rng, "random")
    x = make_inputs(rng, tables, dtype, kpm=True, bias_heads=H, bias_batch=B)
    padded = np.nonzero(~x["kpm"])
    if where == "bias":
        a = f64(x["bias"]).copy()
        a[padded[0], :, :, padded[1]] = np.nan
        bad = dict(x, bias=tf.constant(a, dtype))
    else:
        a = f64(x[where]).copy()
        a[padded] = np.where(rng.random((len(padded[0]), 1)) < 0.5, np.nan, -np.inf)
        bad = dict(x, **{where: tf.constant(a, dtype)})
    check_ignored(x, bad, tables, dtype)


@pytest.mark.parametrize("dtype", list(REDUCED.values()), ids=list(REDUCED))
def test_nan_under_minus_inf_bias_never_read(rng, dtype):
    """A key column under a -inf bias (a per-example mask given as a bias) with NaN k and v: ignored."""
    tables = make_tables(rng, "causal")
    x = make_inputs(rng, tables, dtype, bias_heads=1, bias_batch=B)
    a = f64(x["bias"]).copy()
    a[0, :, :, 37] = -np.inf
    a[1, :, 40:, 9] = -np.inf  # part of a column only: rows 40.. ignore key 9
    x = dict(x, bias=tf.constant(a, dtype))
    bad = poisoned(poisoned(x, "v", (0, 37)), "k", (0, 37))
    bad = poisoned(poisoned(bad, "v", (1, 9), np.inf), "k", (1, 9), np.nan)
    got = run_fused(bad, tables, H)
    out = f64(got[0])
    assert np.isfinite(out[0]).all() and np.isfinite(out[1, :9]).all() and np.isfinite(out[1, 40:]).all()
    assert np.isnan(out[1, 9:40]).all()  # they attend key 9, whose k is NaN
    assert np.isfinite(f64(got[2][3])[0]).all()  # dbias of batch entry 0
    assert_nan_aware(got, run_reference(bad, tables, H), dtype)


def assert_nan_aware(got, want, dtype):
    """NaN exactly where the reference has NaN (out, lse, every gradient); the finite values close to it."""
    names = ("out", "lse", "dq", "dk", "dv", "dbias")
    for name, g, w in zip(names, [got[0], got[1], *got[2]], [want[0], want[1], *want[2]]):
        g, w = f64(g), np.asarray(w)
        np.testing.assert_array_equal(np.isnan(g), np.isnan(w), err_msg=f"{name}: NaN positions")
        finite = np.isfinite(w)
        np.testing.assert_array_equal(np.isfinite(g), finite, err_msg=f"{name}: finite positions")
        tol = {tf.float32: 1e-5, tf.float16: 1e-2, tf.bfloat16: 8e-2}[dtype]
        scale = max(np.abs(w[finite]).max(initial=0.0), 1e-30)
        assert np.abs(g[finite] - w[finite]).max(initial=0.0) <= tol * scale, name


@pytest.mark.parametrize("dtype", list(REDUCED.values()), ids=list(REDUCED))
def test_nan_value_inside_a_partial_block(rng, dtype):
    """Causal tables (bs 16) with NaN v[20]: rows 0-19 (earlier blocks, and rows 16-19 of key 20's own block,
    which mask it) stay finite, dq of rows < 20 too; rows >= 20 attend key 20 and become NaN, as in dense TF."""
    tables = make_tables(rng, "causal")
    x = make_inputs(rng, tables, dtype)
    bad = poisoned(x, "v", (0, 20))
    got, want = run_fused(bad, tables, H), run_reference(bad, tables, H)
    out, dq = f64(got[0]), f64(got[2][0])
    assert np.isfinite(out[0, :20]).all() and np.isnan(out[0, 20:]).all() and np.isfinite(out[1]).all()
    assert np.isfinite(dq[0, :20]).all() and np.isfinite(f64(got[2][2])).all()  # dv: P is finite
    assert_nan_aware(got, want, dtype)


@pytest.mark.parametrize("dtype", list(REDUCED.values()), ids=list(REDUCED))
def test_nan_key_inside_a_partial_block(rng, dtype):
    """NaN k[20] with causal tables: rows 16-19 mask key 20 inside its block, so their out and dq stay finite."""
    tables = make_tables(rng, "causal")
    x = make_inputs(rng, tables, dtype)
    bad = poisoned(x, "k", (1, 20))
    got = run_fused(bad, tables, H)
    out, dq = f64(got[0]), f64(got[2][0])
    assert np.isfinite(out[1, :20]).all() and np.isfinite(dq[1, :20]).all() and np.isfinite(out[0]).all()
    assert np.isnan(out[1, 20:]).all()
    assert_nan_aware(got, run_reference(bad, tables, H), dtype)


@pytest.mark.parametrize("dtype", list(REDUCED.values()), ids=list(REDUCED))
def test_lse_of_a_nan_row_is_nan(rng, dtype):
    """An attended NaN score (NaN q at row 5, head 0) gives that row NaN output and NaN lse (not -inf, the
    'no kept key' marker); every other row is unaffected."""
    tables = make_tables(rng, "causal")
    x = make_inputs(rng, tables, dtype, dlse=True)
    bad = poisoned(x, "q", (0, 5, slice(0, 16)))
    got = run_fused(bad, tables, H)
    lse = f64(got[1])
    assert np.isnan(lse[0, 0, 5]) and np.isfinite(np.delete(lse[0, 0], 5)).all() and np.isfinite(lse[1]).all()
    out = f64(got[0])
    assert np.isnan(out[0, 5, :16]).all() and np.isfinite(out[0, 5, 16:]).all()
    assert_nan_aware(got, run_reference(bad, tables, H), dtype)


@pytest.mark.parametrize("tq,tk", [(0, 16), (16, 0), (0, 0)], ids=["tq0", "tk0", "both0"])
def test_zero_lengths_of_the_raw_ops(rng, tq, tk):
    """Tq = 0 or Tk = 0 through the raw CPU ops (tables built by hand: the table builders need positive lengths):
    empty outputs of the right shapes; with no key every row is empty: output 0, lse -inf, gradients 0."""
    n_qb, n_kb = tq // BS, tk // BS
    x = forward_inputs(
        q=tf.constant(rng.standard_normal((1, tq, H * D)), tf.float32),
        k=tf.constant(rng.standard_normal((1, tk, H * D)), tf.float32),
        v=tf.constant(rng.standard_normal((1, tk, H * D)), tf.float32),
        row_ptr=np.zeros((1, n_qb + 1), np.int32), row_entries=np.zeros((0, 2), np.int32),
        key_padding_mask=tf.ones([1, tk], tf.bool), bias=tf.zeros([1, 1, tq, tk]), dropout_rate=0.0)
    out, lse = load_ops().bsattn_fused_attention(**x)
    assert out.shape == (1, tq, H * D) and lse.shape == (1, H, tq)
    np.testing.assert_array_equal(out.numpy(), 0)
    assert np.isneginf(lse.numpy()).all()
    dout = tf.constant(rng.standard_normal(out.shape), tf.float32)
    grads = load_ops().bsattn_fused_attention_grad(**dict(
        without_q_offset(x), out=out, lse=lse, dout=dout, dlse=tf.ones_like(lse), col_ptr=np.zeros((1, n_kb + 1), np.int32),
        col_entries=np.zeros((0, 2), np.int32), has_dlse=True))
    for grad, like in zip(grads, (x["q"], x["k"], x["v"], x["bias"])):
        assert grad.shape == like.shape
        np.testing.assert_array_equal(grad.numpy(), 0)


@pytest.mark.parametrize("dtype", [tf.float32, tf.float16, tf.bfloat16, tf.float64],
                         ids=["float32", "float16", "bfloat16", "float64"])
@pytest.mark.parametrize("bias", [None, (1, H), (1, 1), (0, H)], ids=["no_bias", "bias_1xH", "bias_1x1", "bias_0xH"])
def test_batch_zero(rng, bias, dtype):
    """Batch 0 (the gradient used to divide by zero and kill the process): empty outputs of the right shapes,
    and a bias broadcast over the (empty) batch gets a zero gradient."""
    tables = fused_tables_for_pattern(patterns.Causal(), 32, 32, block_size=16)
    q = tf.zeros([0, 32, 16], dtype)
    b = None if bias is None else tf.constant(rng.standard_normal((*bias, 32, 32)), dtype)
    with tf.GradientTape() as tape:
        tape.watch([q] + ([b] if b is not None else []))
        out, lse = fused_attention(q, q, q, tables, heads=2, bias=b, return_lse=True)
        loss = tf.reduce_sum(tf.cast(out, lse.dtype)) + tf.reduce_sum(lse)
    grads = tape.gradient(loss, [q] + ([b] if b is not None else []))
    assert out.shape == (0, 32, 16) and lse.shape == (0, 2, 32) and grads[0].shape == (0, 32, 16)
    if b is not None:
        assert grads[1].shape == b.shape and not f64(grads[1]).any()
