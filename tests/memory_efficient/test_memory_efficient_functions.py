"""Tests of bsattn.memory_efficient's functions on both engines against the float64 NumPy reference
(me_reference): forward and gradients of q, k, v and attn_bias, masks, causal alignment, buckets, lengths,
dtypes, dropout, fully masked rows, XLA, the engine choice and the errors."""

import numpy as np
import pytest
import tensorflow as tf
from conftest import assert_close_rel, f64
from me_reference import attention as ref_attention
from me_reference import keep_mask, reduce_to

import bsattn
from bsattn.memory_efficient import functions
from bsattn.memory_efficient.fused_engine import fused_geometry
from bsattn.reference import dropout_keep_mask

pytestmark = pytest.mark.ops

B, H, D = 2, 2, 8

# name -> (n_q, n_k, mask kind, causal, bias shape or None)
CASES = {
    "plain": (37, 37, None, False, None),
    "key_mask": (37, 37, "key", False, None),
    "full_mask": (37, 37, "full", False, None),
    "head_key_mask": (37, 37, "head_keys", False, None),
    "causal": (37, 37, None, True, None),
    "causal_short_q": (21, 45, None, True, None),
    "causal_long_q": (45, 21, "key", True, None),  # the first 24 queries see no key
    "cross": (21, 45, "key", False, None),
    "bias": (37, 37, None, False, (B, H, 37, 37)),
    "bias_shared": (37, 37, "key", False, (H, 37, 37)),
    "bias_keys": (21, 45, None, True, (B, 1, 1, 45)),
    "all": (21, 45, "full", True, (1, 1, 21, 45)),
    "divisible": (32, 32, "key", True, (B, 1, 32, 32)),
}
FUNCTIONS = ["attention", "mea-fused", "mea-chunked", "flash-fused", "flash-chunked", "unstable-fused",
             "unstable-chunked"]  # fmt: skip
# every case on the main paths; flash and the cosine-sim variant (the same engines) on the telling ones
PAIRS = [(c, f) for c in CASES for f in FUNCTIONS[1:3]] + [
    (c, "attention") for c in ("full_mask", "causal_short_q", "causal_long_q", "bias_keys", "all")
] + [
    (c, f) for c in ("key_mask", "causal_long_q", "cross", "all") for f in FUNCTIONS[3:]
]


def make_mask(rng, kind, n_q, n_k):
    if kind is None:
        return None
    if kind == "key":
        m = rng.random((B, n_k)) < 0.8
        m[:, 0] = True
    elif kind == "head_keys":
        m = rng.random((1, H, 1, n_k)) < 0.8
    else:
        m = rng.random((B, 1, n_q, n_k)) < 0.8
    return m


def inputs(rng, n_q, n_k, dtype=tf.float32, bias_shape=None, scale=1.0):
    q = rng.standard_normal((B, H, n_q, D)) * scale
    k = rng.standard_normal((B, H, n_k, D)) * scale
    v = rng.standard_normal((B, H, n_k, D))
    bias = None if bias_shape is None else rng.standard_normal(bias_shape)
    return [tf.constant(x, dtype) for x in (q, k, v)], (None if bias is None else tf.constant(bias, dtype))


def call(name, q, k, v, mask, causal, bias, buckets=(16, 16), **kw):
    fn, _, engine = name.partition("-")
    if fn == "attention":
        return bsattn.attention(q, k, v, mask=mask, causal=causal, attn_bias=bias)
    if fn == "mea":
        return bsattn.memory_efficient_attention(q, k, v, mask, causal, bias, *buckets, engine=engine, **kw)
    if fn == "flash":
        return bsattn.flash_attention(q, k, v, mask, causal, *buckets, engine=engine)
    return bsattn.numerically_unstable_memory_efficient_attention(q, k, v, mask, causal, bias, *buckets,
                                                                  engine=engine, **kw)  # fmt: skip


def with_grads(fn, tensors, dout):
    with tf.GradientTape() as tape:
        tape.watch(tensors)
        out = fn()
    return out, tape.gradient(out, tensors, output_gradients=dout)


def check_against_reference(name, case, rng, dtype=tf.float32, baseline=None, buckets=(16, 16)):
    n_q, n_k, kind, causal, bias_shape = case
    if name.startswith("flash"):
        bias_shape = None
    (q, k, v), bias = inputs(rng, n_q, n_k, dtype, bias_shape, scale=0.5 if "unstable" in name else 1.0)
    mask = make_mask(rng, kind, n_q, n_k)
    dout = tf.constant(rng.standard_normal((B, H, n_q, D)), dtype)
    tensors = [q, k, v] + ([bias] if bias is not None else [])
    out, grads = with_grads(lambda: call(name, q, k, v, mask, causal, bias, buckets), tensors, dout)
    scale = 1.0 if "unstable" in name else D**-0.5
    keep = keep_mask(B, H, n_q, n_k, mask, causal)
    eps = 1e-8 if name in ("mea-chunked", "unstable-chunked") else 0.0  # the fused op normalises exactly
    ref = ref_attention(f64(q), f64(k), f64(v), keep, None if bias is None else f64(bias), scale, dout=f64(dout),
                        eps=eps, stable="unstable" not in name)  # fmt: skip
    refs = list(ref[:4]) + ([reduce_to(ref[4], bias.shape)] if bias is not None else [])
    base = [None] * 5
    if baseline is not None:
        base_out, base_grads = with_grads(lambda: baseline(q, k, v, mask, causal, bias), tensors, dout)
        base = [base_out] + list(base_grads)
    for label, ours, r, b in zip(["out", "dq", "dk", "dv", "dbias"], [out] + list(grads), refs, base):
        assert_close_rel(ours, r, b, dtype, grad=label != "out", name=f"{name} {label}")
    return out, grads


@pytest.mark.parametrize(("case", "name"), PAIRS)
def test_float32_matches_reference(case, name, rng):
    check_against_reference(name, CASES[case], rng)


@pytest.mark.parametrize("buckets", [(1, 2), (3, 5), (64, 64), (5, 1)])
@pytest.mark.parametrize("name", ["mea-chunked", "unstable-chunked"])
def test_bucket_sizes(name, buckets, rng):
    check_against_reference(name, (5, 7, "key", True, (B, H, 5, 7)), rng, buckets=buckets)


def dense_in_dtype(q, k, v, mask, causal, bias):
    return bsattn.attention(q, k, v, mask=mask, causal=causal, attn_bias=bias)


@pytest.mark.parametrize("dtype", [tf.float16, tf.bfloat16, tf.float64])
@pytest.mark.parametrize("name", ["mea-fused", "mea-chunked", "flash-fused", "flash-chunked"])
def test_dtypes(name, dtype, rng):
    baseline = None if dtype == tf.float64 else dense_in_dtype
    check_against_reference(name, CASES["all"], rng, dtype, baseline)


@pytest.mark.parametrize("buckets", [(8, 16), (8, 64)], ids=["several_key_chunks", "one_key_chunk"])
def test_fused_equals_chunked_with_dropout(rng, buckets):
    """One key chunk takes the chunked engine's single-pass backward (dk, dv with dq), several the two passes."""
    n_q, n_k, rate, seed = 21, 45, 0.3, 1234
    (q, k, v), bias = inputs(rng, n_q, n_k, tf.float32, (B, H, n_q, n_k))
    mask = make_mask(rng, "key", n_q, n_k)
    dout = tf.constant(rng.standard_normal((B, H, n_q, D)), tf.float32)
    _, tq, tk = fused_geometry(n_q, n_k)
    z = dropout_keep_mask(seed, rate, B, H, tq, tk)[:, :, :n_q, :n_k] / (1 - np.float32(rate))
    keep = keep_mask(B, H, n_q, n_k, mask, True)
    ref = ref_attention(f64(q), f64(k), f64(v), keep, f64(bias), D**-0.5, z=z, dout=f64(dout))
    results = {}
    for engine in ("fused", "chunked"):
        results[engine] = with_grads(
            lambda e=engine: bsattn.memory_efficient_attention(q, k, v, mask, True, bias, *buckets, dropout=rate,
                                                               training=True, engine=e, seed=seed),
            [q, k, v, bias], dout,
        )  # fmt: skip
        out, grads = results[engine]
        for label, ours, r in zip(["out", "dq", "dk", "dv"], [out] + grads[:3], ref):
            assert_close_rel(ours, r, name=f"{engine} {label}")
        assert_close_rel(grads[3], ref[4], name=f"{engine} dbias")
    np.testing.assert_allclose(results["fused"][0], results["chunked"][0], atol=2e-6)
    again = bsattn.memory_efficient_attention(q, k, v, mask, True, bias, dropout=rate, training=True, seed=seed)
    np.testing.assert_array_equal(again.numpy(), results["fused"][0].numpy())
    other = bsattn.memory_efficient_attention(q, k, v, mask, True, bias, dropout=rate, training=True, seed=seed + 1)
    assert np.abs(other.numpy() - again.numpy()).max() > 1e-3
    plain = bsattn.memory_efficient_attention(q, k, v, mask, True, bias, dropout=rate, training=False)
    assert_close_rel(plain, ref_attention(f64(q), f64(k), f64(v), keep, f64(bias), D**-0.5))


def test_eps_as_the_original_on_the_chunked_engine(rng):
    (q, k, v), _ = inputs(rng, 9, 13)
    dout = tf.constant(rng.standard_normal((B, H, 9, D)), tf.float32)
    keep = keep_mask(B, H, 9, 13)
    for stable, fn in ((True, bsattn.memory_efficient_attention),
                       (False, bsattn.numerically_unstable_memory_efficient_attention)):  # fmt: skip
        out, grads = with_grads(lambda f=fn: f(q, k, v, q_bucket_size=4, k_bucket_size=4, eps=0.5, engine="chunked"),
                                [q, k, v], dout)  # fmt: skip
        scale = D**-0.5 if stable else 1.0
        ref = ref_attention(f64(q), f64(k), f64(v), keep, None, scale, dout=f64(dout), eps=0.5, stable=stable)
        for label, ours, r in zip(["out", "dq", "dk", "dv"], [out] + grads, ref):
            assert_close_rel(ours, r, name=f"stable={stable} {label}")


@pytest.mark.parametrize("name", FUNCTIONS)
def test_fully_masked_rows_give_zero_and_finite_gradients(name, rng):
    n_q, n_k = 21, 13
    (q, k, v), _ = inputs(rng, n_q, n_k)
    full = np.ones((B, 1, n_q, n_k), dtype=bool)
    full[0, 0, 12] = False  # one query of batch 0 sees nothing
    keys = np.ones((B, n_k), dtype=bool)
    keys[1] = False  # batch 1 sees nothing
    keys[0, 4] = False
    vn = v.numpy()
    vn[1] = vn[0, :, 4] = np.nan  # masked keys: their NaNs must not leak
    v = tf.constant(vn)
    for mask, nan in ((full, False), (keys, True)):
        out, grads = with_grads(lambda m=mask, n=nan: call(name, q, k, v if n else tf.zeros_like(v) + 1, m, True, None),
                                [q, k], None)  # fmt: skip
        out = out.numpy()
        assert np.all(out[0, :, : n_q - n_k] == 0)  # causal, bottom-right: these queries precede every key
        assert np.all(out[1] == 0) if nan else np.all(out[0, :, 12] == 0)
        assert np.isfinite(out).all() and all(np.isfinite(g.numpy()).all() for g in grads)


@pytest.mark.parametrize("where", ["q", "k", "v"])
@pytest.mark.parametrize("name", ["mea-chunked", "mea-fused", "unstable-chunked"])
def test_nan_reaches_only_what_attends_it(name, where, rng):
    """One NaN row of q, k or v (batch 0, head 1, position 20) under causal and a full mask that hides key 20
    from some rows inside its chunks: exactly the rows that attend it turn NaN (for k and v: the rows attending
    key 20; for q: row 20), in out and dq; dk and dv only at keys those rows attend (dv stays finite for a NaN
    v, whose scores are finite); every other entry equals the clean inputs' result."""
    n = 37
    (q, k, v), _ = inputs(rng, n, n, scale=0.5 if "unstable" in name else 1.0)
    mask = make_mask(rng, "full", n, n)
    keep = keep_mask(B, H, n, n, mask, True)[0, 1]  # [i, j] of the poisoned (batch, head)
    dout = tf.constant(rng.standard_normal((B, H, n, D)), tf.float32)
    clean = with_grads(lambda: call(name, q, k, v, mask, True, None), [q, k, v], dout)
    poisoned = {"q": q, "k": k, "v": v}
    a = poisoned[where].numpy()
    a[0, 1, 20] = np.nan
    poisoned[where] = tf.constant(a)
    bad = with_grads(lambda: call(name, *poisoned.values(), mask, True, None), list(poisoned.values()), dout)
    rows = np.zeros(n, bool)
    if where == "q":
        rows[20] = keep[20].any()
    else:
        rows = keep[:, 20].copy()
    keys = keep[rows].any(0)
    expect = {"out": rows, "dq": rows, "dk": keys, "dv": keys if where != "v" else np.zeros(n, bool)}
    for label, b, c in zip(["out", "dq", "dk", "dv"], [bad[0], *bad[1]], [clean[0], *clean[1]]):
        b, c = b.numpy(), c.numpy()
        nan_rows = np.isnan(b[0, 1]).all(-1)
        np.testing.assert_array_equal(nan_rows, expect[label], err_msg=f"{label}: NaN rows")
        b[0, 1, expect[label]] = c[0, 1, expect[label]] = 0
        np.testing.assert_allclose(b, c, rtol=1e-5, atol=1e-6, err_msg=f"{label}: the untouched entries")


def test_jit_compile_runs_the_chunked_engine(rng, monkeypatch):
    (q, k, v), bias = inputs(rng, 21, 45, tf.float32, (1, H, 21, 45))
    mask = make_mask(rng, "key", 21, 45)
    dout = tf.constant(rng.standard_normal((B, H, 21, D)), tf.float32)
    chosen = []
    real_choose = functions.choose_engine

    def spy(engine):
        chosen.append(real_choose(engine))
        return chosen[-1]

    monkeypatch.setattr(functions, "choose_engine", spy)

    @tf.function(jit_compile=True)
    def step(q, k, v, bias):
        with tf.GradientTape() as tape:
            tape.watch([q, k, v, bias])
            out = bsattn.memory_efficient_attention(q, k, v, mask, True, bias, 8, 16)
        return out, tape.gradient(out, [q, k, v, bias], output_gradients=dout)

    out, grads = step(q, k, v, bias)
    assert chosen == ["chunked"]
    ref = ref_attention(f64(q), f64(k), f64(v), keep_mask(B, H, 21, 45, mask, True), f64(bias), D**-0.5,
                        dout=f64(dout))  # fmt: skip
    for label, ours, r in zip(["out", "dq", "dk", "dv"], [out] + grads[:3], ref):
        assert_close_rel(ours, r, name=label)
    assert_close_rel(grads[3], reduce_to(ref[4], bias.shape), name="dbias")

    @tf.function(jit_compile=True)
    def fused(q, k, v):
        return bsattn.memory_efficient_attention(q, k, v, engine="fused")

    with pytest.raises(ValueError, match="engine='fused' cannot run under XLA"):
        fused(q, k, v)


def test_without_the_op_library_the_chunked_engine_runs(rng, monkeypatch):
    monkeypatch.setattr(functions, "ops_available", lambda: False)
    assert functions.choose_engine(None) == "chunked"
    assert functions.choose_engine("chunked") == "chunked"
    monkeypatch.undo()
    assert functions.choose_engine(None) == "fused"
    (q, k, v), _ = inputs(rng, 9, 9)
    monkeypatch.setattr(functions, "ops_available", lambda: False)
    out = bsattn.flash_attention(q, k, v, causal=True)
    assert_close_rel(out, ref_attention(f64(q), f64(k), f64(v), keep_mask(B, H, 9, 9, causal=True)))


def test_tf_function_with_unknown_batch(rng):
    (q, k, v), _ = inputs(rng, 21, 13)
    mask = make_mask(rng, "key", 21, 13)
    spec = tf.TensorSpec([None, H, None, D], tf.float32)
    for engine in ("fused", "chunked"):
        fn = tf.function(lambda q, k, v, e=engine: bsattn.memory_efficient_attention(q, k, v, mask, engine=e),
                         input_signature=[tf.TensorSpec([None, H, 21, D]), spec, spec])  # fmt: skip
        with pytest.raises(ValueError, match="k needs a static length"):
            fn(q, k, v)
        fn = tf.function(lambda q, k, v, e=engine: bsattn.memory_efficient_attention(q, k, v, mask, engine=e, q_bucket_size=8),
                         input_signature=[tf.TensorSpec([None, H, 21, D]), tf.TensorSpec([None, H, 13, D]),
                                          tf.TensorSpec([None, H, 13, D])])  # fmt: skip
        ref = ref_attention(f64(q), f64(k), f64(v), keep_mask(B, H, 21, 13, mask))
        assert_close_rel(fn(q, k, v), ref, name=engine)


def test_errors_name_the_argument(rng):
    (q, k, v), _ = inputs(rng, 9, 9)
    mea = bsattn.memory_efficient_attention
    cases = [
        (lambda: mea(q[0], k, v), ValueError, "q must be .*rank 4"),
        (lambda: mea(q, k[..., :4], v), ValueError, "k must be"),
        (lambda: mea(q, k, v[:, :, :5]), ValueError, "v must be"),
        (lambda: mea(q, tf.cast(k, tf.float16), v), TypeError, "share one dtype"),
        (lambda: mea(tf.cast(q, tf.int32), k, v), TypeError, "q must be float"),
        (lambda: mea(q, k, v, mask=np.ones((B, 8), bool)), ValueError, "mask of rank 2"),
        (lambda: mea(q, k, v, mask=np.ones((B, H, 9, 8), bool)), ValueError, "mask of shape"),
        (lambda: mea(q, k, v, mask=np.ones((1, 1, 1, 1, 9), bool)), ValueError, "mask must have rank"),
        (lambda: mea(q, k, v, attn_bias=np.ones((3, 9, 9), np.float32)), ValueError, "attn_bias of shape"),
        (lambda: mea(q, k, v, attn_bias=np.ones((9, 9), np.int32)), TypeError, "attn_bias must be a float"),
        (lambda: mea(q, k, v, q_bucket_size=0), ValueError, "q_bucket_size must be a positive"),
        (lambda: mea(q, k, v, k_bucket_size=-1), ValueError, "k_bucket_size must be a positive"),
        (lambda: mea(q, k, v, k_bucket_size=2.5), ValueError, "k_bucket_size must be a positive"),
        (lambda: mea(q, k, v, dropout=1.0, training=True), ValueError, "dropout must be in"),
        (lambda: mea(q, k, v, eps=-1.0), ValueError, "eps must be"),
        (lambda: mea(q, k, v, engine="torch"), ValueError, "engine must be"),
        (lambda: bsattn.flash_attention(q, k, v, q_bucket_size=0), ValueError, "q_bucket_size"),
        (lambda: bsattn.attention(q, k, v, mask=np.ones((2, 3), bool)), ValueError, "mask of rank 2"),
        (lambda: bsattn.numerically_unstable_memory_efficient_attention(q, k, v, attn_bias=np.ones((B, H, 8, 9))),
         ValueError, "attn_bias of shape"),
    ]  # fmt: skip
    for fn, error, match in cases:
        with pytest.raises(error, match=match):
            fn()
