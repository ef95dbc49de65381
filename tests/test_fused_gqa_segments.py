"""Grouped-query / multi-query attention (``kv_heads``) and packed sequences (``q_segment_ids``,
``k_segment_ids``) in the fused op, against the float64 reference (``bsattn.reference``).

Forward and gradients for kv_heads 1, 2 and 4 with heads 4, with per-head layouts, key padding, bias and
dropout; every dtype (float64 tight, float32 1e-5, float16/bfloat16 within 2x / 3x of dense TF's own error,
conftest.assert_close_rel); NaN at other segments' positions reaching nothing; rows with no key of their segment
giving 0 (lse -inf, zero gradients); clear errors; the skipped cross-segment blocks counted by the kernels' debug
counter; the XLA fallback (``bsattn.gather_attention``) giving the same results.
"""

import numpy as np
import pytest
import tensorflow as tf
from conftest import RandomCallback, assert_close_rel, f64, maybe_function, random_layout, uniform

from bsattn import patterns, reference
from bsattn._loader import load_ops
from bsattn.fused_attention import fused_attention
from bsattn.fused_tables import fused_tables_for_layout, fused_tables_for_pattern

pytestmark = pytest.mark.ops

B, H, D, BS = 2, 4, 8, 16
DTYPES = (tf.float64, tf.float32, tf.float16, tf.bfloat16)


def packed_ids(rng, n: int, segments: int, sorted_ids: bool = True) -> np.ndarray:
    """int32 ``[B, n]``: ``segments`` runs of random lengths per batch entry (ids 0..); unsorted: ids interleaved."""
    out = np.zeros((B, n), np.int32)
    for b in range(B):
        cuts = np.sort(rng.choice(np.arange(1, n), size=segments - 1, replace=False))
        out[b] = np.repeat(np.arange(segments), np.diff(np.concatenate([[0], cuts, [n]])))
        if not sorted_ids:
            out[b] = rng.permutation(out[b])
    return out


def make_case(rng, dtype, kv_heads, kind="causal", kpm=False, bias=None, segments=False, tk_blocks=None):
    """(tables, inputs): q [B, Tq, H*D], k/v [B, Tk, kv_heads*D], dout; optional padding, bias, segment ids."""
    if kind == "causal":
        tables = fused_tables_for_pattern(patterns.Causal(), 4 * BS, 4 * BS, BS)
    else:  # per-head layouts with different block counts and masked in-block entries, Tq != Tk
        n_kb = tk_blocks or 5
        layout = random_layout(rng, 4, n_kb, H, density=0.6, equal_counts=False)
        tables = fused_tables_for_layout(layout, BS, RandomCallback(int(rng.integers(1 << 30)), 0.8))
    tq, tk = tables.n_q, tables.n_k
    x = {
        "q": uniform(rng, [B, tq, H * D], dtype),
        "k": uniform(rng, [B, tk, kv_heads * D], dtype),
        "v": uniform(rng, [B, tk, kv_heads * D], dtype),
        "dout": uniform(rng, [B, tq, H * D], dtype),
        "kpm": None,
        "bias": None,
        "q_ids": None,
        "k_ids": None,
    }
    if kpm:
        x["kpm"] = rng.random((B, tk)) > 0.2
    if bias is not None:
        x["bias"] = tf.constant(0.5 * rng.standard_normal((bias[0], bias[1], tq, tk)), dtype)
    if segments:
        if tq == tk:
            x["q_ids"] = x["k_ids"] = packed_ids(rng, tq, 3)
        else:
            x["q_ids"], x["k_ids"] = packed_ids(rng, tq, 3), packed_ids(rng, tk, 3)
    return tables, x


def run_fused(x, tables, kv_heads, mode="eager", **kw):
    """(out, lse, [dq, dk, dv(, dbias)])."""

    def fn(q, k, v, bias, dout):
        with tf.GradientTape() as tape:
            watched = [q, k, v] + ([bias] if bias is not None else [])
            tape.watch(watched)
            out, lse = fused_attention(q, k, v, tables, H, key_padding_mask=x["kpm"], bias=bias, return_lse=True,
                                       kv_heads=kv_heads, q_segment_ids=x["q_ids"], k_segment_ids=x["k_ids"], **kw)
        return out, lse, tape.gradient(out, watched, output_gradients=dout)

    return maybe_function(fn, mode)(x["q"], x["k"], x["v"], x["bias"], x["dout"])


def run_reference(x, tables, kv_heads, **kw):
    args = dict(key_padding_mask=x["kpm"], bias=None if x["bias"] is None else f64(x["bias"]), kv_heads=kv_heads,
                q_segment_ids=x["q_ids"], k_segment_ids=x["k_ids"], **kw)
    q, k, v, dout = (f64(x[n]) for n in ("q", "k", "v", "dout"))
    out, lse = reference.fused_attention(q, k, v, tables, H, **args)
    dq, dk, dv, dbias = reference.fused_attention_grad(q, k, v, tables, H, dout, **args)
    return out, lse, [dq, dk, dv] + ([dbias] if dbias is not None else [])


def dense_tf(x, tables, kv_heads, dtype):
    """The same attention in TF's dense ops in ``dtype`` (K/V heads repeated): the float16/bfloat16 baseline."""
    keep = np.broadcast_to(tables.token_mask()[None], (B, H, tables.n_q, tables.n_k))
    if x["kpm"] is not None:
        keep = keep & x["kpm"][:, None, None, :]
    if x["q_ids"] is not None:
        keep = keep & (x["q_ids"][:, None, :, None] == x["k_ids"][:, None, None, :])
    keep_t = tf.constant(keep)

    def heads_of(t, n):
        b, length, c = t.shape
        return tf.transpose(tf.reshape(t, [b, length, n, c // n]), [0, 2, 1, 3])

    def attention(q, k, v, bias):
        kh, vh = (tf.repeat(heads_of(t, kv_heads), H // kv_heads, axis=1) for t in (k, v))
        s = tf.matmul(heads_of(q, H), kh, transpose_b=True) * tf.constant(1 / np.sqrt(D), dtype)
        if bias is not None:
            s = s + bias
        s = tf.where(keep_t, s, tf.constant(dtype.min, dtype))
        p = tf.where(tf.reduce_any(keep_t, axis=-1, keepdims=True), tf.nn.softmax(s), tf.zeros_like(s))
        o = tf.matmul(p, vh)
        return tf.reshape(tf.transpose(o, [0, 2, 1, 3]), [B, -1, H * D])

    inputs = [x["q"], x["k"], x["v"]] + ([x["bias"]] if x["bias"] is not None else [])
    with tf.GradientTape() as tape:
        tape.watch(inputs)
        out = attention(*inputs[:3], x["bias"])
    return out, tape.gradient(out, inputs, output_gradients=x["dout"])


def check(got, want, dtype, dense=None):
    out, lse, grads = got
    ref_out, ref_lse, ref_grads = want
    dense_out, dense_grads = dense if dense is not None else (None, [None] * len(grads))
    assert_close_rel(out, ref_out, dense_out, dtype, name="out")
    empty = np.isneginf(ref_lse)
    np.testing.assert_array_equal(np.isneginf(f64(lse)), empty)
    assert_close_rel(f64(lse)[~empty], ref_lse[~empty], dtype=tf.float32, name="lse")
    for name, g, r, dg in zip(("dq", "dk", "dv", "dbias"), grads, ref_grads, dense_grads):
        assert g.dtype == dtype
        assert_close_rel(g, r, dg, dtype, grad=True, name=name)


FEATURES = {
    "causal": {},
    "per_head_layouts": {"kind": "random"},
    "padding_and_bias": {"kpm": True, "bias": (B, H)},
    "segments": {"segments": True},
    "segments_per_head_layouts_bias": {"kind": "random", "segments": True, "bias": (1, 1), "kpm": True},
    "segments_bias_per_batch": {"segments": True, "bias": (B, 1)},
    "segments_bias_per_head": {"kind": "random", "segments": True, "bias": (1, H)},
}


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
@pytest.mark.parametrize("kv_heads", [1, 2, 4])
@pytest.mark.parametrize("feature", list(FEATURES))
def test_forward_and_gradients(rng, dtype, kv_heads, feature):
    tables, x = make_case(rng, dtype, kv_heads, **FEATURES[feature])
    dense = dense_tf(x, tables, kv_heads, dtype) if dtype in (tf.float16, tf.bfloat16) else None
    check(run_fused(x, tables, kv_heads), run_reference(x, tables, kv_heads), dtype, dense)


@pytest.mark.parametrize("kv_heads", [1, 2])
def test_under_tf_function(rng, kv_heads):
    tables, x = make_case(rng, tf.float64, kv_heads, kind="random", segments=True, kpm=True)
    check(run_fused(x, tables, kv_heads, mode="function"), run_reference(x, tables, kv_heads), tf.float64)


def test_unsorted_segment_ids(rng):
    """Interleaved ids: block ranges overlap everywhere, the per-entry rule does all the masking."""
    tables, x = make_case(rng, tf.float64, 2)
    x["q_ids"] = x["k_ids"] = packed_ids(rng, tables.n_q, 3, sorted_ids=False)
    check(run_fused(x, tables, 2), run_reference(x, tables, 2), tf.float64)


def test_gqa_equals_repeated_heads(rng):
    """kv_heads = 2 equals the ungrouped op on K/V with each head repeated; dk/dv are the group sums."""
    tables, x = make_case(rng, tf.float32, 2, kind="random", kpm=True)
    out, _, (dq, dk, dv) = run_fused(x, tables, 2)
    rep = dict(x, k=_repeat_heads(x["k"], 2), v=_repeat_heads(x["v"], 2))
    out_r, _, (dq_r, dk_r, dv_r) = run_fused(rep, tables, None)
    np.testing.assert_allclose(out.numpy(), out_r.numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(dq.numpy(), dq_r.numpy(), rtol=1e-5, atol=1e-6)
    for g, g_r in ((dk, dk_r), (dv, dv_r)):
        summed = g_r.numpy().reshape(B, -1, 2, H // 2, D).sum(axis=3).reshape(g.shape)
        np.testing.assert_allclose(g.numpy(), summed, rtol=1e-5, atol=1e-6)


def _repeat_heads(t, kv_heads):
    """``[B, T, KVH*D]`` → ``[B, T, H*D]`` with K/V head ``h // (H // KVH)`` at head ``h``."""
    b, n, _ = t.shape
    return tf.reshape(tf.repeat(tf.reshape(t, [b, n, kv_heads, 1, D]), H // kv_heads, axis=3), [b, n, H * D])


def test_deterministic(rng):
    """dk/dv summed over the group in a fixed order: two runs give the same bits."""
    tables, x = make_case(rng, tf.float32, 1, kind="random", segments=True, bias=(1, 1))
    first, second = run_fused(x, tables, 1), run_fused(x, tables, 1)
    for a, b in zip(first[2], second[2]):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_dropout_matches_reference(rng):
    """Dropout with grouping and segments: the same hash of (seed, b, h, i, j) as the reference (query head h)."""
    tables, x = make_case(rng, tf.float64, 2, kind="random", segments=True)
    got = run_fused(x, tables, 2, dropout_rate=0.3, seed=7)
    check(got, run_reference(x, tables, 2, dropout_rate=0.3, seed=7), tf.float64)
    again = run_fused(x, tables, 2, dropout_rate=0.3, seed=7)
    np.testing.assert_array_equal(got[0].numpy(), again[0].numpy())


@pytest.mark.parametrize("dtype", [tf.float32, tf.float64], ids=lambda d: d.name)
@pytest.mark.parametrize("poison", ["q", "k", "v", "dout"])
def test_nan_in_other_segment_reaches_nothing(rng, dtype, poison):
    """NaN at every position of segment 1 of batch entry 0: every result of the other segments (and of batch entry
    1) equals the reference computed without the NaN."""
    tables, x = make_case(rng, dtype, 2, segments=True)
    want = run_reference(x, tables, 2)
    poisoned = x["q_ids"][0] == 1 if poison in ("q", "dout") else x["k_ids"][0] == 1
    arr = f64(x[poison])
    arr[0, poisoned] = np.nan
    x = dict(x, **{poison: tf.constant(arr, dtype)})
    out, lse, grads = run_fused(x, tables, 2)
    q_clean = np.ones((B, tables.n_q), bool)
    k_clean = np.ones((B, tables.n_k), bool)
    q_clean[0, x["q_ids"][0] == 1] = False
    k_clean[0, x["k_ids"][0] == 1] = False
    assert_close_rel(f64(out)[q_clean], want[0][q_clean], dtype=dtype, name="out")
    assert_close_rel(f64(grads[0])[q_clean], want[2][0][q_clean], dtype=dtype, name="dq")
    for name, g, r in zip(("dk", "dv"), grads[1:], want[2][1:]):
        assert_close_rel(f64(g)[k_clean], r[k_clean], dtype=dtype, name=name)


@pytest.mark.parametrize("kv_heads", [1, 4])
def test_rows_without_key_of_their_segment(rng, kv_heads):
    """Queries whose segment id no key has: output 0, lse -inf, zero finite gradients, even with NaN q and dout."""
    tables, x = make_case(rng, tf.float32, kv_heads, segments=True)
    q_ids = x["q_ids"].copy()
    q_ids[0, 5:9] = 99
    x["q_ids"] = q_ids
    q, dout = f64(x["q"]), f64(x["dout"])
    want = run_reference(x, tables, kv_heads)
    q[0, 5:9], dout[0, 5:9] = np.nan, np.inf
    x = dict(x, q=tf.constant(q, tf.float32), dout=tf.constant(dout, tf.float32))
    out, lse, grads = run_fused(x, tables, kv_heads)
    assert (out.numpy()[0, 5:9] == 0).all() and np.isneginf(lse.numpy()[0, :, 5:9]).all()
    assert (grads[0].numpy()[0, 5:9] == 0).all()
    check((out, lse, grads), want, tf.float32)


def test_cross_segment_blocks_are_not_computed(rng):
    """The kernels' block counter: with segment ids, exactly the (b, h, Qb, Kb) blocks whose id ranges overlap
    are computed, forward and gradient; without them, every active block of every (b, h)."""
    tables, x = make_case(rng, tf.float32, 2, kind="random", tk_blocks=4)
    ids = np.repeat(np.arange(4, dtype=np.int32), BS)[None].repeat(B, 0)  # one segment per block
    ids[1] = np.repeat([0, 0, 1, 1], BS)
    x["q_ids"] = x["k_ids"] = ids
    active = tables.layout.astype(bool)  # [L, nQb, nKb]
    ranges = ids.reshape(B, -1, BS)
    lo, hi = ranges.min(-1), ranges.max(-1)
    meet = (lo[:, :, None] <= hi[:, None, :]) & (lo[:, None, :] <= hi[:, :, None])  # [B, nQb, nKb]
    per_head = np.broadcast_to(active, (H,) + active.shape[1:])
    want_segments = int((per_head[None] & meet[:, None]).sum())
    want_all = B * int(per_head.sum())
    assert 0 < want_segments < want_all

    def counted(x):
        before = load_ops().bsattn_fused_computed_blocks().numpy()
        run_fused(x, tables, 2)
        return load_ops().bsattn_fused_computed_blocks().numpy() - before

    np.testing.assert_array_equal(counted(x), [want_segments, want_segments])
    np.testing.assert_array_equal(counted(dict(x, q_ids=None, k_ids=None)), [want_all, want_all])


# ---- errors -------------------------------------------------------------------------------------------------

PY_ERRORS = {
    "kv_heads_not_dividing": ({"kv_heads": 3}, ValueError, r"kv_heads=3 must divide heads=4"),
    "kv_heads_zero": ({"kv_heads": 0}, ValueError, r"kv_heads must be a positive integer"),
    "k_width": ({"kv_heads": 1}, ValueError, r"k must have shape \[2, 64, 8\] \(width kv_heads \* head_dim = 1 \* 8\)"),
    "only_q_ids": ({"q_segment_ids": np.zeros((B, 64), np.int32)}, ValueError,
                   r"q_segment_ids was given without k_segment_ids"),
    "only_k_ids": ({"k_segment_ids": np.zeros((B, 64), np.int32)}, ValueError,
                   r"k_segment_ids was given without q_segment_ids"),
    "ids_shape": ({"q_segment_ids": np.zeros((B, 32), np.int32), "k_segment_ids": np.zeros((B, 64), np.int32)},
                  ValueError, r"q_segment_ids must have shape \[2, 64\]"),
    "ids_dtype": ({"q_segment_ids": np.zeros((B, 64), np.float32), "k_segment_ids": np.zeros((B, 64), np.int32)},
                  TypeError, r"q_segment_ids must be an integer"),
}


@pytest.mark.parametrize("case", list(PY_ERRORS))
def test_python_errors(rng, case):
    kwargs, error, match = PY_ERRORS[case]
    tables, x = make_case(rng, tf.float32, 2)
    with pytest.raises(error, match=match):
        fused_attention(x["q"], x["k"], x["v"], tables, H, **{"kv_heads": 2, **kwargs})


def test_int64_ids_must_fit_int32(rng):
    """int64 ids that fit are used as they are; one beyond int32 (it would wrap onto another segment's id) is an
    error naming the argument, eagerly and under tf.function."""
    tables, x = make_case(rng, tf.float64, 2)
    x["q_ids"] = x["k_ids"] = packed_ids(rng, tables.n_q, 3, sorted_ids=False)
    wide = {"q_ids": tf.constant(x["q_ids"], tf.int64), "k_ids": tf.constant(x["k_ids"], tf.int64)}
    check(run_fused(dict(x, **wide), tables, 2), run_reference(x, tables, 2), tf.float64)
    wrapped = x["k_ids"].astype(np.int64)
    wrapped[0, 5] += 2**32  # == its int32 value after a cast
    for fn in (fused_attention, tf.function(fused_attention)):
        with pytest.raises(tf.errors.InvalidArgumentError, match=r"k_segment_ids must fit in int32"):
            fn(x["q"], x["k"], x["v"], tables, H, kv_heads=2, q_segment_ids=wide["q_ids"],
               k_segment_ids=tf.constant(wrapped))


def _raw_inputs(tables, **changes):
    from bsattn.fused_attention import fused_table_tensors

    t = fused_table_tensors(tables)
    x = {
        "q": tf.ones([1, 64, H * D]), "k": tf.ones([1, 64, 2 * D]), "v": tf.ones([1, 64, 2 * D]),
        "row_ptr": t.row_ptr, "row_entries": t.row_entries, "masks": t.masks,
        "key_padding_mask": tf.zeros([0, 0], tf.bool), "bias": tf.zeros([0, 0, 0, 0]),
        "q_segment_ids": tf.zeros([1, 64], tf.int32), "k_segment_ids": tf.zeros([1, 64], tf.int32),
        "seed": tf.constant(0, tf.int64), "q_offset": tf.constant(0, tf.int32), "heads": H, "kv_heads": 2, "block_size": BS, "scale": 0.5,
        "has_segment_ids": True,
    }  # fmt: skip
    x.update(changes)
    return x


RAW_ERRORS = {
    "kv_heads_not_dividing": ({"kv_heads": 3}, r"kv_heads must divide heads \(4\), got 3"),
    "k_width": ({"kv_heads": 1}, r"k's width kv_heads \* head_dim = 1"),
    "q_ids_shape": ({"q_segment_ids": tf.zeros([1, 32], tf.int32)}, r"q_segment_ids must have shape \[1,64\]"),
    "k_ids_missing": ({"k_segment_ids": tf.zeros([0, 0], tf.int32)}, r"k_segment_ids must have shape \[1,64\]"),
}


@pytest.mark.parametrize("case", list(RAW_ERRORS))
def test_raw_op_errors(case):
    changes, match = RAW_ERRORS[case]
    tables = fused_tables_for_pattern(patterns.Causal(), 64, 64, BS)
    with pytest.raises((tf.errors.InvalidArgumentError, ValueError), match=match):
        load_ops().bsattn_fused_attention(**_raw_inputs(tables, **changes))


def test_shape_function_names_segment_ids():
    """In a graph, the shape function names the argument."""
    tables = fused_tables_for_pattern(patterns.Causal(), 64, 64, BS)
    x = _raw_inputs(tables, q_segment_ids=tf.zeros([1, 64, 1], tf.int32))
    with pytest.raises(ValueError, match=r"q_segment_ids must have rank 2"):
        tf.function(lambda: load_ops().bsattn_fused_attention(**x)).get_concrete_function()


# ---- the XLA fallback ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("kv_heads", [1, 2])
def test_xla_fallback_matches(rng, kv_heads):
    """Under jit_compile the same attention runs in TF ops (gather_attention): the same results."""
    tables, x = make_case(rng, tf.float32, kv_heads, kind="random", segments=True, kpm=True, bias=(1, H))
    want = run_reference(x, tables, kv_heads, dropout_rate=0.2, seed=3)

    @tf.function(jit_compile=True)
    def fn(q, k, v, bias, dout):
        with tf.GradientTape() as tape:
            tape.watch([q, k, v, bias])
            out = fused_attention(q, k, v, tables, H, key_padding_mask=x["kpm"], bias=bias, kv_heads=kv_heads,
                                  q_segment_ids=x["q_ids"], k_segment_ids=x["k_ids"], dropout_rate=0.2, seed=3)
        return out, tape.gradient(out, [q, k, v, bias], output_gradients=dout)

    out, grads = fn(x["q"], x["k"], x["v"], x["bias"], x["dout"])
    assert_close_rel(out, want[0], name="out")
    for name, g, r in zip(("dq", "dk", "dv", "dbias"), grads, want[2]):
        assert_close_rel(g, r, name=name)


# ---- blocksparse_attention_impl -------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["all", "strided"])
def test_blocksparse_attention_impl_takes_kv_heads(rng, mode):
    """Grouped K/V through sparse_attention's function: both engines equal the ungrouped call on repeated heads."""
    from bsattn import blocksparse_attention_impl

    q = uniform(rng, [B, 64, H * D], tf.float64)
    k, v = uniform(rng, [B, 64, 2 * D], tf.float64), uniform(rng, [B, 64, 2 * D], tf.float64)
    kw = dict(heads=H, attn_mode=mode, local_attn_ctx=4 if mode == "strided" else None, blocksize=16)
    want = blocksparse_attention_impl(q, _repeat_heads(k, 2), _repeat_heads(v, 2), **kw)
    for engine in ("fused", "unfused"):
        got = blocksparse_attention_impl(q, k, v, kv_heads=2, engine=engine, **kw)
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-10, atol=1e-12, err_msg=engine)
    with pytest.raises(ValueError, match=r"kv_heads=3 must divide heads=4"):
        blocksparse_attention_impl(q, k, v, kv_heads=3, **kw)
    with pytest.raises(ValueError, match=r"k width 16 must be kv_heads \* head_dim = 1 \* 8"):
        blocksparse_attention_impl(q, k, v, kv_heads=1, **kw)
