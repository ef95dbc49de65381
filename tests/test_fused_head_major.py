"""The fused op's ``head_major`` layout: ``q, out [B, H, T, D]``, ``k, v [B, KVH, T, D]`` read and written in place.

Checked: bit-for-bit equality (out, lse, dq, dk, dv, dbias) with the default layout on the transposed tensors,
transposed back, for float32/float16/bfloat16/float64, block sizes 8..64, grouped-query K/V, key padding, a
per-batch bias, segment ids, dropout, dlse, strided_period and per-head random layouts; decoding steps against
the default layout's steps; the float64 reference; the XLA fallback; the memory-efficient functions running one
op and no Transpose; clear errors naming the argument, from the Python wrapper and from the raw op.
"""

import numpy as np
import pytest
import tensorflow as tf
from conftest import RandomCallback, assert_close_rel, f64, random_layout, uniform
from test_fused_attention import forward_inputs, grad_inputs

from bsattn import memory_efficient, patterns, reference
from bsattn._loader import load_ops
from bsattn.fused_attention import fused_attention
from bsattn.fused_tables import fused_tables_for_layout, fused_tables_for_pattern

pytestmark = pytest.mark.ops

B, H, D = 2, 4, 16
DTYPES = {"float32": tf.float32, "float16": tf.float16, "bfloat16": tf.bfloat16, "float64": tf.float64}


def head_major(x: tf.Tensor, heads: int) -> tf.Tensor:
    """``[B, T, heads*D] -> [B, heads, T, D]``."""
    b, t, width = x.shape
    return tf.transpose(tf.reshape(x, [b, t, heads, width // heads]), [0, 2, 1, 3])


def token_major(x: np.ndarray) -> np.ndarray:
    """``[B, heads, T, D] -> [B, T, heads*D]``."""
    b, h, t, d = x.shape
    return np.transpose(x, [0, 2, 1, 3]).reshape(b, t, h * d)


def make_inputs(rng, n_q, n_k, dtype, kv_heads=H, kpm=False, bias=None, segments=False, dlse=False):
    """Default-layout inputs: q, dout [B, n_q, H*D], k, v [B, n_k, KVH*D]; optional padding, bias, ids, dlse."""
    x = {
        "q": uniform(rng, [B, n_q, H * D], dtype),
        "k": uniform(rng, [B, n_k, kv_heads * D], dtype),
        "v": uniform(rng, [B, n_k, kv_heads * D], dtype),
        "dout": uniform(rng, [B, n_q, H * D], dtype),
        "kpm": rng.random((B, n_k)) > 0.25 if kpm else None,
        "bias": None if bias is None else uniform(rng, [bias[0], bias[1], n_q, n_k], dtype),
        "q_ids": None,
        "k_ids": None,
        "dlse": uniform(rng, [B, H, n_q], tf.float64 if dtype == tf.float64 else tf.float32) if dlse else None,
    }
    if segments:
        x["q_ids"] = np.sort(rng.integers(0, 3, (B, n_q)), axis=1).astype(np.int32)
        x["k_ids"] = np.sort(rng.integers(0, 3, (B, n_k)), axis=1).astype(np.int32)
    return x


def run_op(x, tables, kv_heads, layout_head_major, **kw):
    """``[out, lse, dq, dk, dv, dbias]`` as NumPy arrays in the default layout (head-major results transposed)."""
    q, k, v, dout = x["q"], x["k"], x["v"], x["dout"]
    if layout_head_major:
        q, dout = head_major(q, H), head_major(dout, H)
        k, v = head_major(k, kv_heads), head_major(v, kv_heads)
    watched = [q, k, v] + ([x["bias"]] if x["bias"] is not None else [])
    with tf.GradientTape() as tape:
        tape.watch(watched)
        out, lse = fused_attention(q, k, v, tables, H, key_padding_mask=x["kpm"], bias=x["bias"], return_lse=True,
                                   kv_heads=kv_heads, q_segment_ids=x["q_ids"], k_segment_ids=x["k_ids"],
                                   head_major=layout_head_major, **kw)  # fmt: skip
    targets, grads = ([out], [dout]) if x["dlse"] is None else ([out, lse], [dout, x["dlse"]])
    got = [out, lse] + tape.gradient(targets, watched, output_gradients=grads)
    got = [t.numpy() for t in got] + ([None] if x["bias"] is None else [])
    if layout_head_major:
        got[0], got[2], got[3], got[4] = (token_major(got[i]) for i in (0, 2, 3, 4))
    return got


def assert_bit_equal(got, want):
    for name, g, w in zip(("out", "lse", "dq", "dk", "dv", "dbias"), got, want):
        if w is None:
            assert g is None, name
            continue
        assert g.dtype == w.dtype and g.shape == w.shape, name
        np.testing.assert_array_equal(g, w, err_msg=name)


FEATURES = {
    "plain": {},
    "gqa_kpm_batch_bias": {"kv_heads": 2, "kpm": True, "bias": (B, 1)},
    "segments_dropout_dlse": {"segments": True, "dropout": True, "dlse": True},
    "mqa_head_bias_kpm": {"kv_heads": 1, "kpm": True, "bias": (1, H)},
}


@pytest.mark.parametrize("feature", list(FEATURES))
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("bs", [8, 16, 64])
def test_equals_default_layout(rng, bs, dtype, feature):
    """out, lse, dq, dk, dv (and dbias) equal the default layout's bit for bit; Tq != Tk (causal tables)."""
    f = dict(FEATURES[feature])
    kv_heads, dropout = f.pop("kv_heads", H), f.pop("dropout", False)
    n_q, n_k = 2 * bs, 3 * bs
    x = make_inputs(rng, n_q, n_k, dtype, kv_heads, **f)
    kw = {"dropout_rate": 0.3, "seed": 1234} if dropout else {}
    tables = fused_tables_for_pattern(patterns.Causal(), n_q, n_k, bs)
    assert_bit_equal(run_op(x, tables, kv_heads, True, **kw), run_op(x, tables, kv_heads, False, **kw))


@pytest.mark.parametrize("dtype", [tf.float32, tf.bfloat16], ids=["float32", "bfloat16"])
def test_random_per_head_layouts_and_strided(rng, dtype):
    """Per-head random layouts with partial blocks, and strided_period, with every feature they allow."""
    bs, n = 16, 128
    layout = random_layout(rng, n // bs, n // bs, H, density=0.5, equal_counts=False)
    tables = fused_tables_for_layout(layout, bs, RandomCallback(int(rng.integers(1 << 30)), 0.7))
    x = make_inputs(rng, n, n, dtype, 2, kpm=True, segments=True, dlse=True)
    x["k_ids"] = x["q_ids"]  # self-attention ids (strided_period needs Tq == Tk)
    kw = {"dropout_rate": 0.25, "seed": 99}
    assert_bit_equal(run_op(x, tables, 2, True, **kw), run_op(x, tables, 2, False, **kw))
    assert_bit_equal(run_op(x, tables, 2, True, strided_period=4, **kw),
                     run_op(x, tables, 2, False, strided_period=4, **kw))  # fmt: skip


@pytest.mark.parametrize("dtype", [tf.float64, tf.float32], ids=["float64", "float32"])
def test_against_reference(rng, dtype):
    """Head-major forward and gradients against the float64 reference (GQA, padding, bias, dropout, dlse)."""
    bs, n = 16, 64
    tables = fused_tables_for_pattern(patterns.Causal(), n, n, bs)
    x = make_inputs(rng, n, n, dtype, 2, kpm=True, bias=(B, 1), dlse=True)
    kw = {"dropout_rate": 0.2, "seed": 5}
    got = run_op(x, tables, 2, True, **kw)
    args = dict(key_padding_mask=x["kpm"], kv_heads=2, bias=f64(x["bias"]), **kw)
    q, k, v, dout = (f64(x[name]) for name in ("q", "k", "v", "dout"))
    out, lse = reference.fused_attention(q, k, v, tables, H, **args)
    dq, dk, dv, dbias = reference.fused_attention_grad(q, k, v, tables, H, dout, dlse=f64(x["dlse"]), **args)
    finite = np.isfinite(lse)
    np.testing.assert_array_equal(got[1][~finite], lse[~finite])
    assert_close_rel(got[1][finite], lse[finite], dtype=dtype, name="lse")
    for name, g, w in zip(("out", "dq", "dk", "dv", "dbias"), [got[0], *got[2:]], [out, dq, dk, dv, dbias]):
        assert_close_rel(g, w, dtype=dtype, name=name)


@pytest.mark.parametrize("dtype", [tf.float32, tf.float16, tf.bfloat16], ids=["float32", "float16", "bfloat16"])
def test_decode_steps_equal_default_layout(rng, dtype):
    """Decoding with a head-major cache [B, KVH, T_max, D] and NaN in its unwritten rows: each step equals the
    default layout's step bit for bit."""
    bs, t_max, kv_heads = 16, 64, 2
    tables = fused_tables_for_pattern(patterns.Causal(), t_max, t_max, bs)
    x = make_inputs(rng, t_max, t_max, dtype, kv_heads, kpm=True)
    for p, n in ((0, 1), (37, 5), (63, 1)):
        k, v = (f64(x[name]).copy() for name in ("k", "v"))
        k[:, p + n :], v[:, p + n :] = np.nan, np.nan  # not yet written: never read
        k, v = tf.constant(k, dtype), tf.constant(v, dtype)
        q = x["q"][:, p : p + n]
        want = fused_attention(q, k, v, tables, H, key_padding_mask=x["kpm"], kv_heads=kv_heads, q_offset=p)
        got = fused_attention(head_major(q, H), head_major(k, kv_heads), head_major(v, kv_heads), tables, H,
                              key_padding_mask=x["kpm"], kv_heads=kv_heads, q_offset=p, head_major=True)  # fmt: skip
        np.testing.assert_array_equal(token_major(got.numpy()), want.numpy(), err_msg=f"p={p}")


def test_xla_fallback_equals_op(rng):
    """Under jit_compile the TensorFlow-ops fallback takes head-major tensors too (strided_period as well)."""
    bs, n = 16, 64
    tables = fused_tables_for_pattern(patterns.Causal(), n, n, bs)
    q, k, v = (head_major(uniform(rng, [1, n, H * D]), H) for _ in range(3))
    for period in (0, 2):
        op = fused_attention(q, k, v, tables, H, strided_period=period, head_major=True)
        xla = tf.function(lambda q, k, v: fused_attention(q, k, v, tables, H, strided_period=period, head_major=True),
                          jit_compile=True, autograph=False)(q, k, v)  # fmt: skip
        assert xla.shape == op.shape == (1, H, n, D)
        np.testing.assert_allclose(xla.numpy(), op.numpy(), rtol=1e-5, atol=1e-6)


def test_memory_efficient_functions_run_one_op_no_transpose(rng):
    """memory_efficient_attention / flash_attention on [b, h, n, d] run the op in place: one fused op, one
    gradient op, no Transpose; the result is the dense reference's."""
    q, k, v = (uniform(rng, [2, 3, 64, 8]) for _ in range(3))

    @tf.function(autograph=False)
    def step(q, k, v):
        with tf.GradientTape() as tape:
            tape.watch([q, k, v])
            out = memory_efficient.memory_efficient_attention(q, k, v, causal=True)
        return out, tape.gradient(out, [q, k, v])

    graph = step.get_concrete_function(q, k, v).graph
    op_types = [op.type for op in graph.get_operations()]
    assert op_types.count("BsattnFusedAttention") == 1 and op_types.count("BsattnFusedAttentionGrad") == 1
    assert "Transpose" not in op_types
    out, _ = step(q, k, v)
    want = memory_efficient.attention(*(tf.cast(t, tf.float64) for t in (q, k, v)), causal=True)
    np.testing.assert_allclose(out.numpy(), want.numpy(), rtol=1e-5, atol=1e-6)


# ---- errors ------------------------------------------------------------------------------------------------------


def test_wrapper_errors(rng):
    tables = fused_tables_for_pattern(patterns.Causal(), 32, 32, 16)
    q = tf.ones([1, H, 32, D])
    cases = [
        (dict(q=tf.ones([1, 32, H * D])), ValueError, r"q must be \[batch, heads, time, head_dim\] \(head_major\)"),
        (dict(q=tf.ones([1, H + 1, 32, D])), ValueError, r"q must have shape \[\?, 4, 32, \?\]"),
        (dict(k=tf.ones([1, 2, 32, D])), ValueError, r"k must have shape \[1, 4, 32, 16\]"),
        (dict(v=tf.ones([1, H, 32, D + 1])), ValueError, r"v must have shape \[1, 4, 32, 16\]"),
        (dict(head_major=1), TypeError, r"head_major must be a bool"),
    ]
    for change, error, message in cases:
        args = dict(q=q, k=q, v=q, head_major=True)
        args.update(change)
        with pytest.raises(error, match=message):
            fused_attention(args["q"], args["k"], args["v"], tables, H, head_major=args["head_major"])


RAW_ERRORS = {
    "rank": ({"q": tf.ones([1, 16, 8])}, r"q must be \[batch, heads, time, head_dim\] \(head_major\)"),
    "heads": ({"q": tf.ones([1, 3, 16, 4])}, r"q dimension 1 must be heads = 2 \(head_major\)"),
    "kv_heads": ({"k": tf.ones([1, 1, 16, 4]), "v": tf.ones([1, 1, 16, 4])}, r"k dimension 1 must be kv_heads = 2"),
    "head_dim": ({"k": tf.ones([1, 2, 16, 8]), "v": tf.ones([1, 2, 16, 8])},
                 r"q and k must have the same batch and head_dim"),  # fmt: skip
    "length": ({"q": tf.ones([1, 2, 12, 4])}, r"q length 12 is not a multiple of block_size 8"),
}


@pytest.mark.parametrize("case", list(RAW_ERRORS))
@pytest.mark.parametrize("grad", [False, True], ids=["forward", "gradient"])
def test_raw_op_errors(case, grad):
    """The raw ops (eager: the kernels' checks) name the argument for head-major inputs of a wrong shape."""
    base = {"q": tf.ones([1, 2, 16, 4]), "k": tf.ones([1, 2, 16, 4]), "v": tf.ones([1, 2, 16, 4])}
    change, message = RAW_ERRORS[case]
    x = {**base, **change, "head_major": True}
    if grad:  # q, k, v are checked before out and dout
        out, lse = load_ops().bsattn_fused_attention(**forward_inputs(**base, head_major=True))
        inputs = grad_inputs(**x, out=out, lse=lse, dout=tf.ones_like(out))
        fn = load_ops().bsattn_fused_attention_grad
    else:
        inputs, fn = forward_inputs(**x), load_ops().bsattn_fused_attention
    with pytest.raises((tf.errors.InvalidArgumentError, ValueError), match=message):
        fn(**inputs)
