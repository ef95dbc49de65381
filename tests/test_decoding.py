"""KV-cache decoding (bsattn.decoding, SparseMultiHeadAttention's cache, the enwik8 sampler).

The oracle of a decoding step is the full forward: the rows ``[p, p + Tq)`` of the fused op over the whole
sequence in float64, with the keys ``>= p + Tq`` dropped by its key padding mask (for a causal pattern they are
masked anyway; a bidirectional one sees the prefix written so far). The unwritten cache rows hold NaN, so a read of
them would show. float32 is held to 1e-5 relative, float16/bfloat16 to twice the error of dense TF attention in
that dtype (conftest.assert_close_rel). Both paths: the op's decode mode, and its TF twin under XLA.
"""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
from conftest import assert_close_rel, dense_attention_tf, f64, uniform

from bsattn import (
    BigBirdSparsityConfig,
    BSLongformerSparsityConfig,
    FixedSparsityConfig,
    SparseMultiHeadAttention,
    blocksparse_attention_impl,
    blocksparse_decode_impl,
    decode_attention,
    decode_tables,
    patterns,
)
from bsattn.fused_attention import fused_attention
from bsattn.fused_tables import fused_tables_for_pattern

pytestmark = pytest.mark.ops

B, H, D, T, BS = 2, 2, 8, 128, 16
STEPS = [(0, 1), (37, 1), (17, 5), (40, 24), (127, 1)]  # (p, Tq): inside a block, across blocks, the last row
XLA_STEPS = [(14, 5)]  # across two blocks; XLA compiles once per Tq (about 1.5 s each)


def steps(path: str) -> list[tuple[int, int]]:
    return STEPS if path == "op" else XLA_STEPS
MODES = [
    ("all", {}),
    ("local", dict(local_attn_ctx=32)),
    ("fixed", dict(local_attn_ctx=32)),
    ("fixed", dict(local_attn_ctx=32, num_verts=2, vertsize=1)),
    ("strided", dict(local_attn_ctx=4)),
]
MODE_IDS = ["all", "local", "fixed", "fixed_verts2", "strided"]


def poisoned(x: tf.Tensor, n: int) -> tf.Tensor:
    """``x [B, T, C]`` with the rows ``>= n`` (the unwritten cache) set to NaN."""
    return tf.concat([x[:, :n], tf.fill([x.shape[0], x.shape[1] - n, x.shape[2]], tf.constant(np.nan, x.dtype))], 1)


def on_path(fn, path: str):
    """``fn`` eagerly (the op), or ``tf.function(fn, jit_compile=True)`` (the TF path; one compile per shape)."""
    return fn if path == "op" else tf.function(fn, jit_compile=True, autograph=False)


@pytest.mark.parametrize("path", ["op", "xla"])
@pytest.mark.parametrize("dtype", [tf.float32, tf.float16, tf.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("mode,kwargs", MODES, ids=MODE_IDS)
def test_mode_decode_equals_full_rows(rng, mode, kwargs, dtype, path):
    if path == "xla" and dtype != tf.float32 and (mode != "fixed" or kwargs.get("num_verts")):
        pytest.skip("the XLA path in float16/bfloat16 is covered by 'fixed' (compiles are slow)")
    q, k, v = (uniform(rng, [B, T, H * D], dtype) for _ in range(3))
    ref = f64(blocksparse_attention_impl(*(tf.cast(x, tf.float64) for x in (q, k, v)), H, mode, blocksize=BS,
                                         **kwargs))  # fmt: skip
    dense = None
    if dtype != tf.float32:
        allowed = (patterns.dense_attn_mask(T, mode, kwargs.get("local_attn_ctx")) > 0 if mode != "fixed" else
                   patterns.mode_pattern(mode, T, H, blocksize=BS, **kwargs).token_mask(T, T))  # fmt: skip
        dense = f64(dense_attention_tf(q, k, v, H, D**-0.5, np.reshape(allowed, (1, -1, T, T))))
    step = on_path(lambda q, k, v, p: blocksparse_decode_impl(q, k, v, p, H, mode, blocksize=BS, **kwargs), path)
    for p, tq in steps(path):
        out = step(q[:, p : p + tq], poisoned(k, p + tq), poisoned(v, p + tq), tf.constant(p))
        rows = slice(p, p + tq)
        assert_close_rel(out, ref[:, rows], None if dense is None else dense[:, rows], name=f"{mode} p={p} Tq={tq}")


@pytest.mark.parametrize("path", ["op", "xla"])
@pytest.mark.parametrize(
    "config",
    [
        FixedSparsityConfig(num_heads=H, block=BS, num_local_blocks=2, attention="unidirectional"),
        FixedSparsityConfig(num_heads=H, block=BS, num_local_blocks=2, num_global_blocks=1,
                            num_different_global_patterns=2, different_layout_per_head=True,
                            attention="bidirectional"),  # fmt: skip
        BigBirdSparsityConfig(num_heads=H, block=BS, num_random_blocks=1),
        BSLongformerSparsityConfig(num_heads=H, block=BS),
    ],
    ids=["fixed_uni", "fixed_bi_per_head", "bigbird", "longformer"],
)
def test_pattern_decode_equals_full_rows_with_the_prefix(rng, config, path, request):
    """DeepSpeed configs (per-head layouts, bidirectional ones seeing the prefix), grouped-query K/V."""
    if path == "xla" and not any(n in request.node.name for n in ("fixed_bi_per_head", "bigbird")):
        pytest.skip("the XLA path is covered by the per-head and the BigBird configs (compiles are slow)")
    kv_heads = 1
    q = uniform(rng, [B, T, H * D])
    k, v = (uniform(rng, [B, T, kv_heads * D]) for _ in range(2))
    tables = decode_tables(config, T, BS)
    assert decode_tables(config, T, BS) is tables  # built once per (pattern, T_max)
    step = on_path(lambda q, k, v, p: decode_attention(q, k, v, p, tables, H, kv_heads=kv_heads), path)
    for p, tq in steps(path):
        prefix = tf.broadcast_to(tf.range(T) < p + tq, [B, T])
        ref = f64(fused_attention(*(tf.cast(x, tf.float64) for x in (q, k, v)), tables, H, kv_heads=kv_heads,
                                  key_padding_mask=prefix))[:, p : p + tq]  # fmt: skip
        out = step(q[:, p : p + tq], poisoned(k, p + tq), poisoned(v, p + tq), tf.constant(p))
        assert_close_rel(out, ref, name=f"p={p} Tq={tq}")


@pytest.mark.parametrize("path", ["op", "xla"])
def test_key_padding_and_bias(rng, path):
    tables = decode_tables(patterns.Causal(), T, BS)
    q, k, v = (uniform(rng, [B, T, H * D]) for _ in range(3))
    keep = tf.constant(rng.random((B, T)) < 0.8)
    p, tq = 33, 6
    bias = tf.constant(rng.uniform(-1, 1, (1, H, tq, T)), tf.float32)
    full_bias = tf.pad(bias, [[0, 0], [0, 0], [p, T - p - tq], [0, 0]])
    ref = f64(fused_attention(*(tf.cast(x, tf.float64) for x in (q, k, v)), tables, H, key_padding_mask=keep,
                              bias=tf.cast(full_bias, tf.float64)))[:, p : p + tq]  # fmt: skip
    step = on_path(lambda q, k, v, p: decode_attention(q, k, v, p, tables, H, key_padding_mask=keep, bias=bias), path)
    out = step(q[:, p : p + tq], poisoned(k, p + tq), poisoned(v, p + tq), tf.constant(p))
    assert_close_rel(out, ref)


def test_prefill_is_the_normal_op(rng):
    q, k, v = (uniform(rng, [B, T, H * D]) for _ in range(3))
    for mode, kwargs in MODES:
        full = blocksparse_attention_impl(q, k, v, H, mode, blocksize=BS, **kwargs)
        np.testing.assert_array_equal(blocksparse_decode_impl(q, k, v, 0, H, mode, blocksize=BS, **kwargs), full)


def test_decode_errors_name_the_argument(rng):
    tables = decode_tables(patterns.Causal(), T, BS)
    q, k = uniform(rng, [B, 1, H * D]), uniform(rng, [B, T, H * D])
    with pytest.raises(ValueError, match=r"position=128 is out of range"):
        decode_attention(q, k, k, T, tables, H)
    with pytest.raises(tf.errors.InvalidArgumentError, match="position is out of range"):
        decode_attention(q, k, k, tf.constant(T), tables, H)
    with pytest.raises(tf.errors.InvalidArgumentError, match="position is out of range"):
        blocksparse_decode_impl(q, k, k, tf.constant(-1), H, "strided", 4, blocksize=BS)
    with pytest.raises(ValueError, match=r"k_cache must have shape \[2, T_max=128, 16\]"):
        decode_attention(q, k[:, :64], k, 0, tables, H)
    with pytest.raises(ValueError, match="tables must be a cache's"):
        decode_attention(q, k, k, 0, fused_tables_for_pattern(patterns.Causal(), T // 2, T, BS), H)
    with pytest.raises(TypeError, match="position must be an int scalar tensor or an int"):
        decode_attention(q, k, k, 1.5, tables, H)
    with pytest.raises(ValueError, match="t_max=100 must be a multiple of block_size=16"):
        decode_tables(patterns.Causal(), 100, BS)


# ---- SparseMultiHeadAttention's cache (keras-hub's convention) ---------------------------------------------------

N, KEY_DIM, C = 2, 8, 16


def _layer(causal_config: bool = True):
    config = (FixedSparsityConfig(num_heads=N, block=BS, num_local_blocks=2, attention="unidirectional")
              if causal_config else BigBirdSparsityConfig(num_heads=N, block=BS, num_random_blocks=1))  # fmt: skip
    layer = SparseMultiHeadAttention(N, KEY_DIM, sparsity_config=config)
    return layer, not causal_config  # use_causal_mask for the bidirectional config


@pytest.mark.parametrize("jit", [False, True], ids=["function", "xla"])
@pytest.mark.parametrize("causal_config", [True, False], ids=["fixed_uni", "bigbird_causal"])
def test_layer_cache_equals_no_cache(rng, causal_config, jit):
    layer, causal = _layer(causal_config)
    x = tf.constant(rng.standard_normal((B, T, C)), tf.float32)
    full = layer(x, x, use_causal_mask=causal).numpy()
    step = tf.function(lambda xi, cache, i: layer(xi, xi, cache=cache, cache_update_index=i,
                                                  use_causal_mask=causal), jit_compile=jit)  # fmt: skip
    cache = tf.fill([B, 2, T, N, KEY_DIM], np.nan)  # never read before written
    out, cache = layer(x[:, :20], x[:, :20], cache=cache, cache_update_index=0, use_causal_mask=causal)
    outs = [out]
    for p in range(20, 40):
        out, cache = step(x[:, p : p + 1], cache, tf.constant(p))
        outs.append(out)
    assert step.experimental_get_tracing_count() == 1  # a fixed-shape cache: no retracing per step
    np.testing.assert_allclose(tf.concat(outs, 1), full[:, :40], rtol=1e-5, atol=1e-5)
    k_dense = layer._key_dense(x[:, :40])
    np.testing.assert_allclose(cache[:, 0, :40], k_dense, rtol=1e-6, atol=1e-6)  # the cache holds the keys


def test_layer_cache_with_attention_mask(rng):
    layer, _ = _layer(True)
    x = tf.constant(rng.standard_normal((B, T, C)), tf.float32)
    keys = tf.constant(rng.random((B, T)) < 0.7) | (tf.range(T) == 0)  # key 0 kept: no row without keys
    full = layer(x, x, attention_mask=tf.broadcast_to(keys[:, None, :], [B, T, T])).numpy()
    cache = tf.zeros([B, 2, T, N, KEY_DIM])
    _, cache = layer(x[:, :30], x[:, :30], cache=cache, cache_update_index=0)
    mask = tf.broadcast_to(keys[:, None, :], [B, 1, T])
    out, _ = layer(x[:, 30:31], x[:, 30:31], cache=cache, cache_update_index=30, attention_mask=mask)
    np.testing.assert_allclose(out, full[:, 30:31], rtol=1e-5, atol=1e-5)


def test_layer_cache_errors(rng):
    layer, _ = _layer(True)
    x = tf.constant(rng.standard_normal((B, 1, C)), tf.float32)
    layer(tf.zeros([B, T, C]), tf.zeros([B, T, C]))  # build
    with pytest.raises(ValueError, match=r"cache must have shape \[batch, 2, T_max, num_heads=2, key_dim=8\]"):
        layer(x, x, cache=tf.zeros([B, T, N, KEY_DIM]), cache_update_index=0)
    with pytest.raises(ValueError, match="cache: T_max=100 must be a multiple of sparsity_config.block=16"):
        layer(x, x, cache=tf.zeros([B, 2, 100, N, KEY_DIM]), cache_update_index=0)
    with pytest.raises(ValueError, match="cache_update_index=128 is out of range"):
        layer(x, x, cache=tf.zeros([B, 2, T, N, KEY_DIM]), cache_update_index=T)
    with pytest.raises(tf.errors.InvalidArgumentError, match="cache_update_index is out of range"):
        layer(x, x, cache=tf.zeros([B, 2, T, N, KEY_DIM]), cache_update_index=tf.constant(-1))
    with pytest.raises(ValueError, match="cache_update_index is required with cache"):
        layer(x, x, cache=tf.zeros([B, 2, T, N, KEY_DIM]))
    with pytest.raises(ValueError, match="cache_update_index was given without cache"):
        layer(x, x, cache_update_index=0)
