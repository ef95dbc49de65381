"""The XLA fallback of the fused op (bsattn.gather_attention): every feature of the op against the float64
reference, forward and backward, in eager mode (the fallback forced) and compiled by XLA (``jit_compile=True``,
where fused_attention picks it by itself); the same dropout mask as the op; the layers and
blocksparse_attention_impl under XLA, and ``model.fit(jit_compile=True)``."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import f64
import test_fused_attention
from test_fused_attention import FEATURES, H, check, dense_tf, feature_case, run_reference

import bsattn.fused_attention as fused_module
from bsattn import blocksparse_attention_impl
from bsattn.deepspeed.layers import SparseMultiHeadAttention
from bsattn.deepspeed.sparsity_config import BigBirdSparsityConfig
from bsattn.fused_attention import fused_attention
from bsattn.gather_attention import in_xla_context

pytestmark = pytest.mark.ops


def run(x, tables, mode, **kwargs):
    """(out, lse, grads) of fused_attention: 'forced' = the fallback in eager mode, 'xla' = jit_compile=True."""

    def fn(q, k, v, bias, dout, dlse):
        with tf.GradientTape() as tape:
            watched = [q, k, v] + ([bias] if bias is not None else [])
            tape.watch(watched)
            out, lse = fused_attention(
                q, k, v, tables, H, key_padding_mask=x["kpm"], bias=bias, return_lse=True, **kwargs
            )
        targets, upstream = ([out, lse], [dout, dlse]) if dlse is not None else ([out], [dout])
        return out, lse, tape.gradient(targets, watched, output_gradients=upstream)

    fn = tf.function(fn, jit_compile=True, autograph=False) if mode == "xla" else fn
    return fn(x["q"], x["k"], x["v"], x["bias"], x["dout"], x["dlse"])


@pytest.fixture
def forced(monkeypatch):
    monkeypatch.setattr(fused_module, "in_xla_context", lambda: True)


@pytest.mark.parametrize("feature", list(FEATURES))
def test_every_feature_float64(rng, forced, feature):
    tables, x, op_args = feature_case(rng, tf.float64, **FEATURES[feature])
    check(run(x, tables, "forced", **op_args), run_reference(x, tables, H, **op_args), tf.float64)


@pytest.mark.parametrize("dtype", [tf.float32, tf.float16, tf.bfloat16], ids=["float32", "float16", "bfloat16"])
def test_everything_reduced_precision(rng, forced, dtype):
    spec = dict(FEATURES["everything"], dlse=dtype == tf.float32)  # the dense baseline has no lse
    tables, x, op_args = feature_case(rng, dtype, **spec)
    dense = None
    if dtype != tf.float32:
        dense = dense_tf(x, tables, H, dtype, op_args["scale"], op_args["dropout_rate"], op_args["seed"])
    check(run(x, tables, "forced", **op_args), run_reference(x, tables, H, **op_args), dtype, dense)


def test_everything_under_xla(rng):
    tables, x, op_args = feature_case(rng, tf.float32, **FEATURES["everything"])
    check(run(x, tables, "xla", **op_args), run_reference(x, tables, H, **op_args), tf.float32)


def test_same_dropout_mask_as_the_op(rng):
    tables, x, op_args = feature_case(rng, tf.float32, **FEATURES["dropout"])
    ones = tf.ones_like(x["v"])  # out = the kept, rescaled probabilities summed: zero exactly where all dropped
    op = fused_attention(x["q"], x["k"], x["v"], tables, H, **op_args)
    xla = tf.function(lambda q, k, v: fused_attention(q, k, v, tables, H, **op_args), jit_compile=True,
                      autograph=False)  # fmt: skip
    np.testing.assert_allclose(xla(x["q"], x["k"], x["v"]), op, rtol=1e-5, atol=1e-6)
    other_seed = dict(op_args, seed=op_args["seed"] + 1)
    assert not np.allclose(fused_attention(x["q"], x["k"], ones, tables, H, **other_seed),
                           fused_attention(x["q"], x["k"], ones, tables, H, **op_args))  # fmt: skip


def test_xla_context_detection():
    assert not in_xla_context()
    seen = []
    tf.function(lambda: seen.append(in_xla_context()) or tf.zeros([]), jit_compile=True)()
    tf.function(lambda: seen.append(in_xla_context()) or tf.zeros([]))()
    assert seen == [True, False]


def test_blocksparse_attention_impl_under_xla(rng):
    q, k, v = (tf.constant(rng.standard_normal((2, 64, 32)), tf.float32) for _ in range(3))
    eager = blocksparse_attention_impl(q, k, v, 2, "strided", 4, blocksize=16, engine="unfused")
    xla = tf.function(lambda a, b, c: blocksparse_attention_impl(a, b, c, 2, "strided", 4, blocksize=16,
                                                                 engine="unfused"), jit_compile=True, autograph=False)  # fmt: skip
    np.testing.assert_allclose(xla(q, k, v), eager, rtol=1e-5, atol=1e-5)


def test_keras_fit_with_jit_compile(rng):
    config = BigBirdSparsityConfig(2, block=8, num_random_blocks=1, num_sliding_window_blocks=3)
    inputs = keras.Input((21, 8))
    layer = SparseMultiHeadAttention(2, 4, dropout=0.1, sparsity_config=config)
    model = keras.Model(inputs, layer(inputs, inputs, use_causal_mask=True))
    x = rng.normal(size=(16, 21, 8)).astype("float32")
    y = np.cumsum(x, axis=1) / 4
    model.compile(optimizer=keras.optimizers.Adam(0.02), loss="mse", jit_compile=True)
    history = model.fit(x, y, epochs=6, batch_size=8, verbose=0)
    assert history.history["loss"][-1] < history.history["loss"][0]
    assert np.isfinite(f64(model(x))).all()


NAN_CASES = {
    "padded v": (test_fused_attention.test_nan_at_padded_key_never_read, {"where": "v"}),
    "padded k": (test_fused_attention.test_nan_at_padded_key_never_read, {"where": "k"}),
    "padded bias": (test_fused_attention.test_nan_at_padded_key_never_read, {"where": "bias"}),
    "-inf bias column": (test_fused_attention.test_nan_under_minus_inf_bias_never_read, {}),
    "v in a partial block": (test_fused_attention.test_nan_value_inside_a_partial_block, {}),
    "k in a partial block": (test_fused_attention.test_nan_key_inside_a_partial_block, {}),
    "lse of a NaN row": (test_fused_attention.test_lse_of_a_nan_row_is_nan, {}),
}


@pytest.mark.parametrize("dtype", [tf.float32, tf.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("case", list(NAN_CASES))
def test_nan_rules_of_the_op(rng, forced, case, dtype):
    """The op's NaN rules hold in the fallback: NaN/Inf at a masked position (padded key, a key masked inside
    its block, under a -inf bias) reaches no output or gradient; an attended NaN propagates; a NaN row's lse is
    NaN. (The op's own tests, run with the fallback forced.)"""
    test, kwargs = NAN_CASES[case]
    test(rng, dtype=dtype, **kwargs)
