"""The fused op's ``strided_period`` (sparse_attention's 'strided' without the four transposes).

With ``strided_period=L`` the tables address the permuted positions of ``strided_transpose`` while q, k, v, the
outputs, key padding and segment ids stay in token order. Checked: bit-for-bit equality (forward out and lse,
dq/dk/dv) with the transposed path (permute the inputs, run the op with ``strided_period=0``, un-permute) for
float32/float16/bfloat16/float64, block sizes 8..128, several L, grouped-query K/V, key padding, segment ids (and
the blocks they skip), dropout, dlse, per-head random layouts; the float64 reference; ``blocksparse_attention_impl
('strided')`` running one op with no transpose and equal to its previous transposed result; the XLA fallback; NaN
at padded keys reaching nothing; clear errors naming ``strided_period``.
"""

import numpy as np
import pytest
import tensorflow as tf
from conftest import RandomCallback, assert_close_rel, f64, random_layout, uniform
from test_fused_attention import forward_inputs

from bsattn import patterns, reference
from bsattn._loader import load_ops
from bsattn.fused_attention import fused_attention, fused_table_tensors
from bsattn.fused_tables import fused_tables_for_layout, fused_tables_for_pattern
from bsattn.sparse_attention import _strided_untranspose, blocksparse_attention_impl, strided_transpose

pytestmark = pytest.mark.ops

B, H, D = 2, 4, 16
DTYPES = {"float32": tf.float32, "float16": tf.float16, "bfloat16": tf.bfloat16, "float64": tf.float64}


def segment_ids(rng, n: int) -> np.ndarray:
    """int32 ``[B, n]``: three runs of random lengths per batch entry (packed sequences in token order)."""
    out = np.zeros((B, n), np.int32)
    for b in range(B):
        cuts = np.sort(rng.choice(np.arange(1, n), size=2, replace=False))
        out[b] = np.repeat(np.arange(3), np.diff(np.concatenate([[0], cuts, [n]])))
    return out


def make_inputs(rng, n, dtype, kv_heads=H, kpm=False, segments=False, dlse=False):
    """Inputs in token order: q [B, n, H*D], k/v [B, n, kv_heads*D], dout; optional padding, ids, dlse."""
    x = {
        "q": uniform(rng, [B, n, H * D], dtype),
        "k": uniform(rng, [B, n, kv_heads * D], dtype),
        "v": uniform(rng, [B, n, kv_heads * D], dtype),
        "dout": uniform(rng, [B, n, H * D], dtype),
        "kpm": rng.random((B, n)) > 0.25 if kpm else None,
        "ids": segment_ids(rng, n) if segments else None,
        "dlse": None,
    }
    if dlse:
        lse_dtype = tf.float64 if dtype == tf.float64 else tf.float32
        x["dlse"] = uniform(rng, [B, H, n], lse_dtype)
    return x


def run_op(x, tables, kv_heads, period, **kw):
    """``[out, lse, dq, dk, dv]`` of ``fused_attention`` as NumPy arrays in the inputs' dtype."""
    q, k, v = x["q"], x["k"], x["v"]
    with tf.GradientTape() as tape:
        tape.watch([q, k, v])
        out, lse = fused_attention(q, k, v, tables, H, key_padding_mask=x["kpm"], return_lse=True, kv_heads=kv_heads,
                                   q_segment_ids=x["ids"], k_segment_ids=x["ids"], strided_period=period, **kw)
    targets, grads = ([out], [x["dout"]]) if x["dlse"] is None else ([out, lse], [x["dout"], x["dlse"]])
    dq, dk, dv = tape.gradient(targets, [q, k, v], output_gradients=grads)
    return [t.numpy() for t in (out, lse, dq, dk, dv)]


def permuted(x, perm):
    """The inputs in permuted order (position p holds token perm[p]), as the transposed path gives them."""

    def take(a, axis):
        return None if a is None else tf.gather(a, perm, axis=axis)

    kpm, ids = (None if x[name] is None else x[name][:, perm] for name in ("kpm", "ids"))
    return dict(x, q=take(x["q"], 1), k=take(x["k"], 1), v=take(x["v"], 1), dout=take(x["dout"], 1), kpm=kpm,
                ids=ids, dlse=take(x["dlse"], 2))  # fmt: skip


def run_transposed(x, tables, kv_heads, period, **kw):
    """The op on permuted inputs with ``strided_period=0``, outputs un-permuted to token order."""
    perm = patterns.strided_permutation(tables.n_q, period)
    inverse = np.argsort(perm)
    out, lse, dq, dk, dv = run_op(permuted(x, perm), tables, kv_heads, 0, **kw)
    return [out[:, inverse], lse[:, :, inverse], dq[:, inverse], dk[:, inverse], dv[:, inverse]]


def assert_bit_equal(got, want):
    for name, g, w in zip(("out", "lse", "dq", "dk", "dv"), got, want):
        assert g.dtype == w.dtype and g.shape == w.shape, name
        np.testing.assert_array_equal(g, w, err_msg=name)


def strided_tables(period, n, bs):
    return fused_tables_for_pattern(patterns.Strided(period), n, n, bs)


# (block size, L, T): T / L a multiple of the block size; one class of 1, 2 or 3 blocks.
SIZES = [(8, 5, 80), (16, 4, 128), (32, 3, 192), (64, 2, 256), (128, 2, 256)]
FEATURES = {
    "plain": {},
    "gqa_kpm": {"kv_heads": 2, "kpm": True},
    "segments_dropout": {"segments": True, "dropout": True},
    "mqa_kpm_segments_dlse": {"kv_heads": 1, "kpm": True, "segments": True, "dlse": True},
}


@pytest.mark.parametrize("feature", list(FEATURES))
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("bs, period, n", SIZES[:3], ids=[f"bs{s[0]}_L{s[1]}" for s in SIZES[:3]])
def test_equals_transposed_path(rng, bs, period, n, dtype, feature):
    """Forward out and lse and dq/dk/dv equal the transposed path bit for bit."""
    f = dict(FEATURES[feature])
    kv_heads, dropout = f.pop("kv_heads", H), f.pop("dropout", False)
    x = make_inputs(rng, n, dtype, kv_heads, **f)
    kw = {"dropout_rate": 0.3, "seed": 1234} if dropout else {}
    tables = strided_tables(period, n, bs)
    got = run_op(x, tables, kv_heads, period, **kw)
    assert_bit_equal(got, run_transposed(x, tables, kv_heads, period, **kw))


@pytest.mark.parametrize("dtype", [tf.float32, tf.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("bs, period, n", SIZES[3:], ids=[f"bs{s[0]}_L{s[1]}" for s in SIZES[3:]])
def test_large_blocks_equal_transposed_path(rng, bs, period, n, dtype):
    """Block sizes 64 and 128, with key padding, segment ids and dropout."""
    x = make_inputs(rng, n, dtype, 2, kpm=True, segments=True)
    tables = strided_tables(period, n, bs)
    kw = {"dropout_rate": 0.2, "seed": 7}
    assert_bit_equal(run_op(x, tables, 2, period, **kw), run_transposed(x, tables, 2, period, **kw))


@pytest.mark.parametrize("dtype", [tf.float32, tf.bfloat16], ids=["float32", "bfloat16"])
def test_random_per_head_layouts(rng, dtype):
    """Any tables (here per-head random layouts with partial blocks), not only Strided's, with every feature."""
    bs, period, n = 16, 4, 128
    layout = random_layout(rng, n // bs, n // bs, H, density=0.5, equal_counts=False)
    tables = fused_tables_for_layout(layout, bs, RandomCallback(int(rng.integers(1 << 30)), 0.7))
    x = make_inputs(rng, n, dtype, 2, kpm=True, segments=True, dlse=True)
    kw = {"dropout_rate": 0.25, "seed": 99}
    assert_bit_equal(run_op(x, tables, 2, period, **kw), run_transposed(x, tables, 2, period, **kw))


def computed_blocks(fn) -> np.ndarray:
    """The blocks the forward and the gradient computed during ``fn()`` (the kernels' counter)."""
    before = load_ops().bsattn_fused_computed_blocks().numpy()
    fn()
    return load_ops().bsattn_fused_computed_blocks().numpy() - before


def test_segments_skip_the_same_blocks(rng):
    """The blocks' segment ranges are those of the permuted positions: the kernels skip exactly the blocks of
    the transposed path (many blocks: short segments)."""
    bs, period, n = 8, 2, 64
    tables = strided_tables(period, n, bs)
    x = make_inputs(rng, n, tf.float32)
    x["ids"] = np.repeat(np.arange(n // 4), 4)[None].repeat(B, axis=0).astype(np.int32)  # 4-token segments
    ours = computed_blocks(lambda: run_op(x, tables, H, period))
    theirs = computed_blocks(lambda: run_transposed(x, tables, H, period))
    np.testing.assert_array_equal(ours, theirs)
    assert 0 < ours[0] < B * H * tables.row_entries.shape[0]  # some skipped, some computed


@pytest.mark.parametrize("dtype", [tf.float64, tf.float32], ids=["float64", "float32"])
def test_against_reference(rng, dtype):
    """Forward and gradients against the float64 reference, with GQA, padding, segment ids, dropout and dlse."""
    bs, period, n = 16, 3, 96
    tables = strided_tables(period, n, bs)
    x = make_inputs(rng, n, dtype, 2, kpm=True, segments=True, dlse=True)
    kw = {"dropout_rate": 0.2, "seed": 5}
    got = run_op(x, tables, 2, period, **kw)
    args = dict(key_padding_mask=x["kpm"], kv_heads=2, q_segment_ids=x["ids"], k_segment_ids=x["ids"],
                strided_period=period, **kw)  # fmt: skip
    q, k, v, dout = (f64(x[name]) for name in ("q", "k", "v", "dout"))
    out, lse = reference.fused_attention(q, k, v, tables, H, **args)
    dq, dk, dv, _ = reference.fused_attention_grad(q, k, v, tables, H, dout, dlse=f64(x["dlse"]), **args)
    finite = np.isfinite(lse)  # rows with no kept key: -inf in both
    np.testing.assert_array_equal(got[1][~finite], lse[~finite])
    assert_close_rel(got[1][finite], lse[finite], dtype=dtype, name="lse")
    for name, g, w in zip(("out", "dq", "dk", "dv"), [got[0], *got[2:]], [out, dq, dk, dv]):
        assert_close_rel(g, w, dtype=dtype, name=name)


def test_reference_equals_transposed_reference(rng):
    """The reference's strided_period is its strided_period=0 on permuted inputs, un-permuted (dropout too)."""
    bs, period, n = 8, 4, 64
    tables = strided_tables(period, n, bs)
    perm = patterns.strided_permutation(n, period)
    inverse = np.argsort(perm)
    x = {name: rng.standard_normal((B, n, H * D)) for name in ("q", "k", "v")}
    kpm = rng.random((B, n)) > 0.3
    out, lse = reference.fused_attention(x["q"], x["k"], x["v"], tables, H, key_padding_mask=kpm, dropout_rate=0.3,
                                         seed=3, strided_period=period)  # fmt: skip
    out_p, lse_p = reference.fused_attention(*(x[name][:, perm] for name in ("q", "k", "v")), tables, H,
                                             key_padding_mask=kpm[:, perm], dropout_rate=0.3, seed=3)  # fmt: skip
    np.testing.assert_allclose(out, out_p[:, inverse], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(lse, lse_p[:, :, inverse], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", list(DTYPES.values())[:3], ids=list(DTYPES)[:3])
def test_nan_at_padded_key_never_read(rng, dtype):
    """NaN / Inf in k and v of padded keys reach no output or gradient; equal to the transposed path and close
    to the reference."""
    bs, period, n = 16, 2, 64
    tables = strided_tables(period, n, bs)
    x = make_inputs(rng, n, dtype, kpm=True)
    padded = np.nonzero(~x["kpm"])
    for name, value in (("k", np.nan), ("v", np.inf)):
        a = f64(x[name]).copy()
        a[padded] = value
        x[name] = tf.constant(a, dtype)
    got = run_op(x, tables, H, period)
    for name, g in zip(("out", "lse", "dq", "dk", "dv"), got):
        values = f64(g)
        if name == "lse":  # -inf: a query whose keys are all padded
            values = values[values != -np.inf]
        assert np.isfinite(values).all(), name
    assert_bit_equal(got, run_transposed(x, tables, H, period))
    q, k, v, dout = (f64(x[name]) for name in ("q", "k", "v", "dout"))
    out, _ = reference.fused_attention(q, k, v, tables, H, key_padding_mask=x["kpm"], strided_period=period)
    dq, dk, dv, _ = reference.fused_attention_grad(q, k, v, tables, H, dout, key_padding_mask=x["kpm"],
                                                   strided_period=period)  # fmt: skip
    tol = {tf.float32: 1e-5, tf.float16: 1e-2, tf.bfloat16: 8e-2}[dtype]
    for name, g, w in zip(("out", "dq", "dk", "dv"), [got[0], *got[2:]], [out, dq, dk, dv]):
        assert np.abs(f64(g) - w).max() <= tol * np.abs(w).max(), name


# ---- blocksparse_attention_impl('strided') --------------------------------------------------------------------


def old_strided_impl(q, k, v, heads, period, bs, kv_heads):
    """blocksparse_attention_impl('strided')'s previous fused path: transposes around the op on Strided tables."""
    n = q.shape[1]
    qt, kt, vt = (strided_transpose(t, n, period, bs) for t in (q, k, v))
    tables = fused_tables_for_pattern(patterns.mode_pattern("strided", n, heads, period, blocksize=bs), n, n, bs)
    a = fused_attention(qt, kt, vt, tables, heads, scale=1.0 / np.sqrt(q.shape[-1] // heads), kv_heads=kv_heads)
    return _strided_untranspose(a, n, period)


@pytest.mark.parametrize("dtype", [tf.float32, tf.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("kv_heads", [H, 2])
def test_blocksparse_impl_equals_previous_result(rng, dtype, kv_heads):
    """The new path (one op, no transposes) gives the previous transposed result bit for bit, forward and
    gradients; its graph has one fused op, one gradient op and no Transpose."""
    bs, period, n = 16, 4, 128
    q, dout = uniform(rng, [B, n, H * D], dtype), uniform(rng, [B, n, H * D], dtype)
    k, v = uniform(rng, [B, n, kv_heads * D], dtype), uniform(rng, [B, n, kv_heads * D], dtype)

    def grads(fn):
        with tf.GradientTape() as tape:
            tape.watch([q, k, v])
            out = fn(q, k, v)
        return [out.numpy()] + [g.numpy() for g in tape.gradient(out, [q, k, v], output_gradients=dout)]

    new = grads(lambda q, k, v: blocksparse_attention_impl(q, k, v, H, "strided", period, bs, kv_heads=kv_heads))
    old = grads(lambda q, k, v: old_strided_impl(q, k, v, H, period, bs, kv_heads))
    for name, a, b in zip(("out", "dq", "dk", "dv"), new, old):
        np.testing.assert_array_equal(a, b, err_msg=name)

    @tf.function(autograph=False)  # plain Python control flow: no conversion (slow) needed
    def step(q, k, v):
        with tf.GradientTape() as tape:
            tape.watch([q, k, v])
            out = blocksparse_attention_impl(q, k, v, H, "strided", period, bs, kv_heads=kv_heads)
        return tape.gradient(out, [q, k, v], output_gradients=dout)

    op_types = [op.type for op in step.get_concrete_function(q, k, v).graph.get_operations()]
    assert op_types.count("BsattnFusedAttention") == 1 and op_types.count("BsattnFusedAttentionGrad") == 1
    assert "Transpose" not in op_types and "GatherV2" not in op_types


def test_enwik8_strided_heads_run_one_op():
    """The enwik8 example's strided heads (half the heads of each block, 'split') run one fused op per call and
    no transpose, forward and backward."""
    from examples.enwik8.config import Config
    from examples.enwik8.model import SparseTransformer

    cfg = Config(n_layer=1, n_state=32, n_head=2, n_timesteps=256, n_batch=1, local_attn_ctx=16, blocksize=16,
                 attn_mode="strided", strided_heads="split", model_dir="/nonexistent")  # fmt: skip
    model = SparseTransformer(cfg)

    @tf.function(autograph=False)  # plain Python control flow: no conversion (slow) needed
    def step(tokens):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(model(tokens))
        return tape.gradient(loss, model.trainable_variables)

    graph = step.get_concrete_function(tf.zeros([1, 256], tf.int32)).graph
    op_types = [op.type for op in graph.get_operations()]
    op_types += [op.type for f in graph._functions.values() if hasattr(f, "graph") for op in f.graph.get_operations()]
    assert op_types.count("BsattnFusedAttention") == 2  # the local and the strided heads
    assert op_types.count("BsattnFusedAttentionGrad") == 2 and "Transpose" not in op_types


def test_blocksparse_impl_unfused_and_xla_keep_transposes(rng):
    """The unfused engine and the XLA fallback still give the strided result (close to the fused op's)."""
    bs, period, n = 16, 2, 64
    q, k, v = (uniform(rng, [1, n, 2 * D]) for _ in range(3))
    fused = blocksparse_attention_impl(q, k, v, 2, "strided", period, bs).numpy()
    unfused = blocksparse_attention_impl(q, k, v, 2, "strided", period, bs, engine="unfused").numpy()
    xla = tf.function(lambda q, k, v: blocksparse_attention_impl(q, k, v, 2, "strided", period, bs),
                      jit_compile=True, autograph=False)(q, k, v).numpy()  # fmt: skip
    np.testing.assert_allclose(unfused, fused, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(xla, fused, rtol=1e-5, atol=1e-6)


def test_fused_attention_under_xla(rng):
    """fused_attention(strided_period=L) under jit_compile (the TensorFlow-ops fallback on permuted inputs) gives
    the op's out and lse, with key padding and dropout (the same hash on the permuted positions)."""
    bs, period, n = 16, 2, 64
    tables = strided_tables(period, n, bs)
    x = make_inputs(rng, n, tf.float32, 2, kpm=True)
    kw = dict(key_padding_mask=x["kpm"], return_lse=True, kv_heads=2, dropout_rate=0.3, seed=11,
              strided_period=period)  # fmt: skip
    eager = fused_attention(x["q"], x["k"], x["v"], tables, H, **kw)
    xla = tf.function(lambda q, k, v: fused_attention(q, k, v, tables, H, **kw), jit_compile=True,
                      autograph=False)(x["q"], x["k"], x["v"])  # fmt: skip
    for a, b in zip(xla, eager):
        finite = np.isfinite(b.numpy())
        np.testing.assert_array_equal(finite, np.isfinite(a.numpy()))
        np.testing.assert_allclose(a.numpy()[finite], b.numpy()[finite], rtol=1e-5, atol=1e-6)


# ---- bad input ------------------------------------------------------------------------------------------------


def test_python_errors():
    q = tf.ones([1, 64, 2 * D])
    tables = strided_tables(2, 64, 16)
    with pytest.raises(ValueError, match=r"strided_period must be >= 0, got -1"):
        fused_attention(q, q, q, tables, 2, strided_period=-1)
    with pytest.raises(TypeError, match=r"strided_period must be a non-negative int, got 2.0"):
        fused_attention(q, q, q, tables, 2, strided_period=2.0)
    with pytest.raises(TypeError, match=r"strided_period must be a non-negative int, got True"):
        fused_attention(q, q, q, tables, 2, strided_period=True)
    with pytest.raises(ValueError, match=r"strided_period=3: T=64 must be a multiple of it"):
        fused_attention(q, q, q, tables, 2, strided_period=3)
    with pytest.raises(ValueError, match=r"strided_period=8: T=64 .* T / strided_period a multiple of block_size=16"):
        fused_attention(q, q, q, tables, 2, strided_period=8)
    with pytest.raises(ValueError, match=r"strided_period must be 0 with a bias"):
        fused_attention(q, q, q, tables, 2, bias=tf.zeros([1, 1, 64, 64]), strided_period=2)
    with pytest.raises(ValueError, match=r"strided_period must be 0 with q_offset"):
        fused_attention(q[:, :16], q, q, tables, 2, q_offset=0, strided_period=2)
    causal = fused_tables_for_pattern(patterns.Causal(), 64, 128, 16)
    with pytest.raises(ValueError, match=r"strided_period needs self-attention tables \(n_q == n_k\)"):
        fused_attention(q, tf.ones([1, 128, 2 * D]), tf.ones([1, 128, 2 * D]), causal, 2, strided_period=2)
    with pytest.raises(ValueError, match=r"n_ctx=64 must be a multiple of local_attn_ctx=3"):
        blocksparse_attention_impl(q, q, q, 2, "strided", 3, 16)
    with pytest.raises(ValueError, match=r"n_ctx / local_attn_ctx = 16 must be a multiple of blocksize=32"):
        blocksparse_attention_impl(q, q, q, 2, "strided", 4, 32)


def raw_forward(**changes):
    """The raw forward op's inputs: one head pair, T = 32, Strided(2) tables of block size 8."""
    luts = fused_table_tensors(strided_tables(2, 32, 8))
    ones = tf.ones([1, 32, 2 * D])
    strided = dict(q=ones, k=ones, v=ones, row_ptr=luts.row_ptr, row_entries=luts.row_entries, masks=luts.masks,
                   key_padding_mask=tf.zeros([0, 0], tf.bool), bias=tf.zeros([0, 0, 0, 0]), heads=2, block_size=8,
                   scale=0.25, dropout_rate=0.0, has_key_padding_mask=False, has_bias=False, strided_period=2)
    return forward_inputs(**{**strided, **changes})


RAW_ERRORS = {
    "period_divides_T": ({"strided_period": 3}, r"strided_period = 3: T = 32 must be a multiple of it"),
    "class_in_blocks": ({"strided_period": 8}, r"strided_period = 8: T = 32 .* multiple of block_size = 8"),
    "self_attention": (
        {"k": tf.ones([1, 48, 2 * D]), "v": tf.ones([1, 48, 2 * D])},
        r"strided_period needs self-attention \(Tq == Tk\), got Tq = 32, Tk = 48",
    ),
    "bias": ({"bias": tf.zeros([1, 1, 32, 32]), "has_bias": True}, r"strided_period must be 0 with has_bias"),
    "decode": ({"q": tf.ones([1, 8, 2 * D]), "decode": True}, r"strided_period must be 0 with decode"),
    "negative": ({"strided_period": -1}, r"strided_period"),
}


@pytest.mark.parametrize("case", list(RAW_ERRORS))
def test_raw_op_errors(case):
    changes, match = RAW_ERRORS[case]
    with pytest.raises((tf.errors.InvalidArgumentError, ValueError), match=match):
        load_ops().bsattn_fused_attention(**raw_forward(**changes))


def test_raw_grad_op_checks_strided_period():
    """The gradient op has the attr and the same checks."""
    fwd = raw_forward()
    out, lse = load_ops().bsattn_fused_attention(**fwd)
    luts = fused_table_tensors(strided_tables(2, 32, 8))
    x = {name: value for name, value in fwd.items() if name != "q_offset"}
    x.update(out=out, lse=lse, dout=tf.ones_like(out), dlse=tf.zeros([0, 0, 0]), col_ptr=luts.col_ptr,
             col_entries=luts.col_entries)  # fmt: skip
    dq, _, _, _ = load_ops().bsattn_fused_attention_grad(**x)
    assert dq.shape == (1, 32, 2 * D)
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"strided_period = 3: T = 32 must be a multiple"):
        load_ops().bsattn_fused_attention_grad(**dict(x, strided_period=3))
