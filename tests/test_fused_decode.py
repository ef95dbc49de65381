"""KV-cache decoding with the fused op (``fused_attention(..., q_offset=p)``, attr ``decode``).

A step of ``Tq`` new queries at positions ``[p, p + Tq)`` against the cache must equal the same rows of the full op
(and of the float64 reference, ``bsattn.reference.fused_attention(..., q_offset=p)``) for the causal, local,
strided (transposed coordinates), fixed and a DeepSpeed pattern, block sizes 16/32/64, Tq = 1, a few rows, a
whole block and across a block boundary, p = 0 and mid-block, in every dtype (float64 1e-10, float32 1e-5,
float16/bfloat16 within 2x the full op's own error, conftest.assert_close_rel); with grouped K/V heads, bias
broadcasting, key padding, segment ids and dropout (the same decisions as the full op). The unwritten part of
the cache is NaN in every case and must reach no output (a bidirectional pattern sees the prefix written so
far). Also: clear errors for bad input, the gradient's error, no retracing with a tensor ``q_offset``, and the
kernel's debug counter showing that only the active blocks of the decoded rows are computed.
"""

import functools

import numpy as np
import pytest
import tensorflow as tf
from conftest import assert_close_rel, f64, uniform

from bsattn import patterns, reference
from bsattn._loader import load_ops
from bsattn.deepspeed.sparsity_config import BigBirdSparsityConfig, FixedSparsityConfig
from bsattn.fused_attention import fused_attention, fused_table_tensors
from bsattn.fused_tables import fused_tables_for_pattern

pytestmark = pytest.mark.ops

B, H, D = 2, 2, 16
N_BLOCKS = 6  # T_max = 6 blocks


def make_pattern(name: str, bs: int, heads: int = H):
    t_max = N_BLOCKS * bs
    return {
        "causal": lambda: patterns.Causal(),
        "local": lambda: patterns.Local(2 * bs),
        "strided": lambda: patterns.Strided(t_max // (2 * bs)),  # residue classes of 2 blocks (transposed)
        "fixed": lambda: patterns.Fixed(2 * bs, num_verts=2, vertsize=1, num_heads=heads, block_size=bs),
        "deepspeed": lambda: FixedSparsityConfig(heads, block=bs, different_layout_per_head=True, num_local_blocks=2,
                                                 attention="unidirectional", num_different_global_patterns=2),
        "bigbird": lambda: BigBirdSparsityConfig(heads, block=bs, num_random_blocks=1, num_sliding_window_blocks=3,
                                                 num_global_blocks=1),
    }[name]()


@functools.lru_cache(maxsize=None)
def tables_for(name: str, bs: int, heads: int = H, n_k_blocks: int = N_BLOCKS):
    return fused_tables_for_pattern(make_pattern(name, bs, heads), N_BLOCKS * bs, n_k_blocks * bs, bs)


def poisoned(x: tf.Tensor, written: int) -> tf.Tensor:
    """``x [B, Tk, C]`` with NaN at the positions ``>= written`` (the cache not yet written)."""
    keep = tf.range(x.shape[1]) < written
    return tf.where(keep[None, :, None], x, tf.constant(np.nan, x.dtype))


def make_inputs(rng, tables, dtype, heads=H, kv_heads=None):
    kvh = kv_heads or heads
    return (uniform(rng, [B, tables.n_q, heads * D], dtype), uniform(rng, [B, tables.n_k, kvh * D], dtype),
            uniform(rng, [B, tables.n_k, kvh * D], dtype))  # fmt: skip


def check_step(q, k, v, tables, p, n, dtype, heads=H, full_args=None, step_args=None, ref_args=None):
    """Decode rows [p, p + n) with the cache poisoned past p + n; compare with the full op's rows and the reference."""
    full_args, step_args, ref_args = full_args or {}, step_args or {}, ref_args or {}
    out_full, lse_full = fused_attention(q, k, v, tables, heads, return_lse=True, **full_args)
    kp, vp = poisoned(k, p + n), poisoned(v, p + n)
    out, lse = fused_attention(q[:, p : p + n], kp, vp, tables, heads, return_lse=True, q_offset=p,
                               **{**full_args, **step_args})  # fmt: skip
    ref_out, ref_lse = reference.fused_attention(f64(q[:, p : p + n]), f64(kp), f64(vp), tables, heads, q_offset=p,
                                                 **ref_args)  # fmt: skip
    assert out.dtype == dtype and out.shape == (B, n, q.shape[2]) and lse.shape == (B, heads, n)
    # float16/bfloat16: as accurate as the full op (its error is the baseline of assert_close_rel)
    assert_close_rel(out, ref_out, out_full[:, p : p + n], dtype, name="out")
    empty = np.isneginf(ref_lse)
    np.testing.assert_array_equal(np.isneginf(f64(lse)), empty)
    assert_close_rel(f64(lse)[~empty], ref_lse[~empty], dtype=tf.float32, name="lse")
    return out, out_full[:, p : p + n], lse, lse_full[:, :, p : p + n]


def steps(bs: int):
    """(p, Tq): p = 0 with one row, one row mid-block, a few rows, a whole block, rows across a block boundary,
    the last row."""
    return [(0, 1), (2 * bs + bs // 2, 1), (bs + 3, 3), (2 * bs, bs), (3 * bs + bs // 2, bs), (N_BLOCKS * bs - 1, 1)]


# ---- a step equals the same rows of the full op -------------------------------------------------------------

PATTERN_CASES = [("causal", 16), ("local", 32), ("strided", 16), ("fixed", 16), ("deepspeed", 16), ("causal", 64),
                 ("local", 64)]  # fmt: skip


@pytest.mark.parametrize("name,bs", PATTERN_CASES, ids=[f"{n}_bs{b}" for n, b in PATTERN_CASES])
def test_step_equals_full_rows(rng, name, bs):
    tables = tables_for(name, bs)
    q, k, v = make_inputs(rng, tables, tf.float32)
    for p, n in steps(bs):
        out, full, lse, lse_full = check_step(q, k, v, tables, p, n, tf.float32)
        np.testing.assert_allclose(f64(out), f64(full), rtol=0, atol=2e-6)
        finite = np.isfinite(f64(lse_full))
        np.testing.assert_allclose(f64(lse)[finite], f64(lse_full)[finite], rtol=0, atol=2e-6)


@pytest.mark.parametrize("dtype", [tf.float64, tf.float16, tf.bfloat16], ids=["float64", "float16", "bfloat16"])
def test_dtypes(rng, dtype):
    tables = tables_for("fixed", 16)
    q, k, v = make_inputs(rng, tables, dtype)
    for p, n in ((0, 1), (37, 1), (40, 5), (56, 16)):
        check_step(q, k, v, tables, p, n, dtype)


def test_bidirectional_pattern_sees_the_written_prefix(rng):
    """BigBird (bidirectional, global and random blocks): a step attends what its rows keep among keys < p + Tq."""
    tables = tables_for("bigbird", 16)
    q, k, v = make_inputs(rng, tables, tf.float32)
    for p, n in ((0, 1), (21, 1), (30, 7), (80, 16)):
        kp, vp = poisoned(k, p + n), poisoned(v, p + n)
        out, lse = fused_attention(q[:, p : p + n], kp, vp, tables, H, return_lse=True, q_offset=p)
        ref_out, ref_lse = reference.fused_attention(f64(q[:, p : p + n]), f64(kp), f64(vp), tables, H, q_offset=p)
        assert_close_rel(out, ref_out, name="out")
        assert_close_rel(lse, ref_lse, dtype=tf.float32, name="lse")


# ---- features -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kv_heads", [1, 2])
def test_grouped_kv_heads(rng, kv_heads):
    heads = 4
    tables = tables_for("deepspeed", 16, heads)
    q, k, v = make_inputs(rng, tables, tf.float32, heads, kv_heads)
    for p, n in ((0, 1), (45, 1), (30, 9)):
        check_step(q, k, v, tables, p, n, tf.float32, heads, {"kv_heads": kv_heads}, ref_args={"kv_heads": kv_heads})


@pytest.mark.parametrize("lead", [(1, H), (B, 1), (1, 1), (H,)], ids=["1xH", "Bx1", "1x1", "rank3_H"])
def test_bias_broadcasting(rng, lead):
    tables = tables_for("local", 16)
    q, k, v = make_inputs(rng, tables, tf.float32)
    bias = 0.5 * rng.standard_normal((*lead, tables.n_q, tables.n_k))
    bias[..., 5, :] = -np.inf  # a -inf bias masks (the row's output is 0 where nothing else is kept)
    for p, n in ((5, 1), (40, 3), (16, 16)):
        rows = bias[..., p : p + n, :]
        check_step(q, k, v, tables, p, n, tf.float32, full_args={"bias": bias},
                   step_args={"bias": tf.constant(rows, tf.float32)}, ref_args={"bias": rows})  # fmt: skip


def test_key_padding(rng):
    tables = tables_for("causal", 16)
    q, k, v = make_inputs(rng, tables, tf.float32)
    kpm = rng.random((B, tables.n_k)) > 0.3
    kpm[1, :20] = False  # the first rows of batch entry 1 have no key: output 0, lse -inf
    k = tf.where(tf.constant(kpm)[:, :, None], k, np.nan)  # padded keys are never read
    for p, n in ((3, 1), (19, 2), (40, 9), (64, 16)):
        check_step(q, k, v, tables, p, n, tf.float32, full_args={"key_padding_mask": kpm},
                   ref_args={"key_padding_mask": kpm})  # fmt: skip


def test_segment_ids(rng):
    tables = tables_for("local", 16)
    q, k, v = make_inputs(rng, tables, tf.float32)
    ids = np.repeat(np.arange(4, dtype=np.int32), [20, 30, 14, 32])[None].repeat(B, 0)
    ids[1] = np.repeat([0, 1], [50, 46])
    for p, n in ((0, 1), (20, 1), (45, 10), (64, 16)):
        qi = ids[:, p : p + n]
        check_step(q, k, v, tables, p, n, tf.float32, full_args={"q_segment_ids": ids, "k_segment_ids": ids},
                   step_args={"q_segment_ids": qi}, ref_args={"q_segment_ids": qi, "k_segment_ids": ids})  # fmt: skip


def test_dropout_equals_the_full_op(rng):
    tables = tables_for("fixed", 16)
    q, k, v = make_inputs(rng, tables, tf.float32)
    args = {"dropout_rate": 0.3, "seed": 1234}
    for p, n in ((0, 1), (37, 1), (40, 20)):
        out, full, _, _ = check_step(q, k, v, tables, p, n, tf.float32, full_args=args, ref_args=args)
        np.testing.assert_allclose(f64(out), f64(full), rtol=0, atol=2e-6)


def test_empty_step_and_tensor_offset_without_retracing(rng):
    tables = tables_for("local", 16)
    q, k, v = make_inputs(rng, tables, tf.float32)
    out, lse = fused_attention(q[:, :0], k, v, tables, H, return_lse=True, q_offset=7)
    assert out.shape == (B, 0, H * D) and lse.shape == (B, H, 0)
    traces = []

    @tf.function
    def step(q_new, p):
        traces.append(1)
        return fused_attention(q_new, k, v, tables, H, q_offset=p)

    full = fused_attention(q, k, v, tables, H)
    for p in (3, 17, 60):
        np.testing.assert_allclose(f64(step(q[:, p : p + 1], tf.constant(p))), f64(full[:, p : p + 1]), atol=2e-6)
    assert len(traces) == 1


# ---- cost: only the active blocks of the decoded rows -------------------------------------------------------


def computed_blocks(fn) -> int:
    before = load_ops().bsattn_fused_computed_blocks().numpy()
    fn()
    return int((load_ops().bsattn_fused_computed_blocks().numpy() - before)[0])


def expected_blocks(tables, p, n, heads=H):
    """B * heads * the active blocks of the rows covering [p, p + n) whose keys start before p + n."""
    total = 0
    for qb in range(p // tables.block_size, (p + n - 1) // tables.block_size + 1):
        for lh in range(heads):
            ptr = tables.row_ptr[lh if tables.lut_heads > 1 else 0]
            kb = tables.row_entries[ptr[qb] : ptr[qb + 1], 0]
            total += int((kb * tables.block_size < p + n).sum())
    return B * total


@pytest.mark.parametrize("name", ["local", "causal", "strided"])
def test_only_active_blocks_of_the_rows_are_computed(rng, name):
    bs, n_blocks = 16, 64  # T_max = 1024
    pattern = patterns.Strided(8) if name == "strided" else make_pattern(name, bs)
    tables = fused_tables_for_pattern(pattern, n_blocks * bs, n_blocks * bs, bs)
    k = uniform(rng, [B, tables.n_k, H * D])
    q = uniform(rng, [B, 3, H * D])
    counts = {}
    for p, n in ((5, 1), (500, 1), (1000, 1), (1021, 3), (504, 3)):
        counts[p, n] = computed_blocks(lambda: fused_attention(q[:, :n], k, k, tables, H, q_offset=p))
        assert counts[p, n] == expected_blocks(tables, p, n)
    if name == "local":  # L = 2 blocks: at most 3 blocks per (b, h) and row, whatever p
        assert counts[500, 1] == counts[1000, 1] == B * H * 3
    if name == "causal":
        assert counts[1000, 1] == B * H * (1000 // bs + 1)


# ---- errors -------------------------------------------------------------------------------------------------


def test_python_errors(rng):
    tables = tables_for("causal", 16)
    q, k, v = make_inputs(rng, tables, tf.float32)
    with pytest.raises(ValueError, match=r"q_offset must be in \[0, 2\*\*31\), got -1"):
        fused_attention(q[:, :1], k, v, tables, H, q_offset=-1)
    with pytest.raises(ValueError, match=r"q_offset \+ Tq = 90 \+ 8 must be <= the tables' query length T_max = 96"):
        fused_attention(q[:, :8], k, v, tables, H, q_offset=90)
    with pytest.raises(TypeError, match=r"q_offset must be an int or an integer scalar tensor"):
        fused_attention(q[:, :1], k, v, tables, H, q_offset=1.5)
    with pytest.raises(ValueError, match=r"bias must have shape \[1 or 2, 1 or 2, 1, 96\]"):
        fused_attention(q[:, :1], k, v, tables, H, q_offset=3, bias=tf.zeros([1, 1, 96, 96]))
    with pytest.raises(ValueError, match=r"q_segment_ids must have shape \[2, 1\]"):
        fused_attention(q[:, :1], k, v, tables, H, q_offset=3, q_segment_ids=tf.zeros([B, 96], tf.int32),
                        k_segment_ids=tf.zeros([B, 96], tf.int32))  # fmt: skip
    short = fused_tables_for_pattern(patterns.Causal(), 96, 64, 16)  # T_max 96, cache Tk 64
    with pytest.raises(ValueError, match=r"q_offset \+ Tq = 64 \+ 1 must be <= the cache length \(tables.n_k\) = 64"):
        fused_attention(q[:, :1], k[:, :64], v[:, :64], short, H, q_offset=64)


def test_op_errors_with_a_tensor_offset(rng):
    """A tensor q_offset is checked by the op (OP_REQUIRES, naming the argument)."""
    tables = tables_for("causal", 16)
    q, k, v = make_inputs(rng, tables, tf.float32)
    short = fused_tables_for_pattern(patterns.Causal(), 96, 64, 16)
    cases = (
        (tables, k, -1, 1, r"q_offset must be >= 0, got -1"),
        (tables, k, 90, 8, r"q_offset \+ Tq = 90 \+ 8 must be <= the tables' query length T_max = 96"),
        (short, k[:, :64], 60, 5, r"q_offset \+ Tq = 60 \+ 5 must be <= the cache length Tk = 64"),
    )
    for tabs, kk, p, n, match in cases:
        with pytest.raises(tf.errors.InvalidArgumentError, match=match):
            fused_attention(q[:, :n], kk, kk, tabs, H, q_offset=tf.constant(p))


def test_raw_op_offset_without_decode(rng):
    tables = tables_for("causal", 16)
    t = fused_table_tensors(tables)
    q = uniform(rng, [1, tables.n_q, H * D])
    x = {"q": q, "k": q, "v": q, "row_ptr": t.row_ptr, "row_entries": t.row_entries, "masks": t.masks,
         "key_padding_mask": tf.zeros([0, 0], tf.bool), "bias": tf.zeros([0, 0, 0, 0]),
         "q_segment_ids": tf.zeros([0, 0], tf.int32), "k_segment_ids": tf.zeros([0, 0], tf.int32),
         "seed": tf.constant(0, tf.int64), "heads": H, "block_size": 16, "scale": 0.25}  # fmt: skip
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"q_offset must be 0 unless decode=true, got 3"):
        load_ops().bsattn_fused_attention(**x, q_offset=tf.constant(3))
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"q_offset must be a scalar, got shape \[1\]"):
        load_ops().bsattn_fused_attention(**x, q_offset=tf.constant([0]), decode=True)
    with pytest.raises(ValueError, match=r"q_offset must be a scalar"):
        tf.function(lambda: load_ops().bsattn_fused_attention(**x, q_offset=tf.constant([0]))).get_concrete_function()


def test_gradient_of_a_step_is_an_error(rng):
    tables = tables_for("causal", 16)
    q, k, v = make_inputs(rng, tables, tf.float32)
    with tf.GradientTape() as tape:
        tape.watch(q)
        out = fused_attention(q[:, 5:6], k, v, tables, H, q_offset=5)
    with pytest.raises(NotImplementedError, match=r"decoding \(q_offset\) is forward-only"):
        tape.gradient(out, q)


def test_xla_is_an_error(rng):
    tables = tables_for("causal", 16)
    q, k, v = make_inputs(rng, tables, tf.float32)
    step = tf.function(lambda q_new: fused_attention(q_new, k, v, tables, H, q_offset=5), jit_compile=True)
    with pytest.raises(NotImplementedError, match=r"does not compile under XLA"):
        step(q[:, 5:6])
