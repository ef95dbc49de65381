"""Tests of the Keras layers of bsattn.memory_efficient: forward and x-gradients against float64 NumPy,
memory_efficient True vs False, the weights' structure and interchange, get_config / .keras round trips,
mixed precision, dropout, XLA and the errors."""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import assert_close_rel, f64
from me_reference import attention as ref_attention
from me_reference import keep_mask

from bsattn import CosineSimAttention, FlashAttention, MemoryEfficientAttention

pytestmark = pytest.mark.ops

B, N, M, DIM, HEADS, DH = 2, 21, 13, 12, 3, 4


def heads(x):
    b, n, _ = x.shape
    return x.reshape(b, n, HEADS, DH).transpose(0, 2, 1, 3)


def merge(x):
    b, h, n, d = x.shape
    return x.transpose(0, 2, 1, 3).reshape(b, n, h * d)


def ref_layer(layer, x, context=None, mask=None, bias=None, dy=None):
    """The layer in float64 NumPy → ``y`` and, given ``dy`` (not for the cosine-sim layer), ``dx``."""
    w = {v.path.split("/")[-2] if "kernel" in v.path else "scale": f64(v.value) for v in layer.weights}
    x = f64(x)
    c = x if context is None else f64(context)
    q, kv = x @ w["to_q"], c @ w["to_kv"]
    k, v = np.split(kv, 2, axis=-1)
    q, k, v = heads(q), heads(k), heads(v)
    scale = DH**-0.5
    if isinstance(layer, CosineSimAttention):
        q = q / np.maximum(np.linalg.norm(q, axis=-1, keepdims=True), 1e-12)
        k = k / np.maximum(np.linalg.norm(k, axis=-1, keepdims=True), 1e-12)
        q = q * np.exp(w["scale"])[None, :, None, None]
        scale = 1.0
    keep = keep_mask(B, HEADS, q.shape[2], k.shape[2], mask, layer.causal)
    b = None if bias is None else f64(bias)
    if dy is None:
        return merge(ref_attention(q, k, v, keep, b, scale)) @ w["to_out"]
    dout = heads(f64(dy) @ w["to_out"].T)
    out, dq, dk, dv, _ = ref_attention(q, k, v, keep, b, scale, dout=dout)
    dx = merge(dq) @ w["to_q"].T
    dc = np.concatenate([merge(dk), merge(dv)], -1) @ w["to_kv"].T
    return merge(out) @ w["to_out"], (dx + dc if context is None else dx), (None if context is None else dc)


def data(rng, dtype=tf.float32):
    x = tf.constant(rng.standard_normal((B, N, DIM)), dtype)
    context = tf.constant(rng.standard_normal((B, M, DIM)), dtype)
    keys = rng.random((B, M)) < 0.7
    keys[:, 0] = True
    return x, context, keys


def grads_of(layer, x, context, dy, **kw):
    with tf.GradientTape() as tape:
        tape.watch([x] + ([] if context is None else [context]))
        y = layer(x, context=context, **kw)
    return y, tape.gradient(y, [x] + ([] if context is None else [context]) + layer.trainable_weights,
                            output_gradients=dy)  # fmt: skip


LAYERS = {
    "mea-dense": lambda **kw: MemoryEfficientAttention(DIM, HEADS, DH, **kw),
    "mea": lambda **kw: MemoryEfficientAttention(
        DIM, HEADS, DH, memory_efficient=True, q_bucket_size=8, k_bucket_size=8, **kw
    ),
    "flash": lambda **kw: FlashAttention(DIM, HEADS, DH, q_bucket_size=8, k_bucket_size=8, **kw),
}


@pytest.mark.parametrize(("causal", "cross"), [(False, True), (True, False)])
@pytest.mark.parametrize("name", list(LAYERS))
def test_layers_match_reference(name, causal, cross, rng):
    x, context, keys = data(rng)
    layer = LAYERS[name](causal=causal)
    context = context if cross else None
    mask = keys if cross else None
    dy = tf.constant(rng.standard_normal((B, N, DIM)), tf.float32)
    y, grads = grads_of(layer, x, context, dy, mask=mask)
    ref_y, ref_dx, ref_dc = ref_layer(layer, x, context, mask, dy=dy)
    assert_close_rel(y, ref_y, name="y")
    assert_close_rel(grads[0], ref_dx, name="dx")
    if cross:
        assert_close_rel(grads[1], ref_dc, name="dcontext")


@pytest.mark.parametrize("cls", [MemoryEfficientAttention, CosineSimAttention])
def test_memory_efficient_true_equals_false(cls, rng):
    x, context, keys = data(rng)
    kw = {"seq_len": N} if cls is CosineSimAttention else {}
    layer = cls(DIM, heads=HEADS, dim_head=DH, causal=True, q_bucket_size=8, k_bucket_size=4, **kw)
    bias = tf.constant(rng.standard_normal((HEADS, N, M)), tf.float32)
    dy = tf.constant(rng.standard_normal((B, N, DIM)), tf.float32)
    results = []
    for me in (False, True):
        with tf.GradientTape() as tape:
            tape.watch([x, context, bias])
            y = layer(x, context=context, mask=keys, attn_bias=bias, memory_efficient=me)
        results.append([y] + tape.gradient(y, [x, context, bias] + layer.trainable_weights, output_gradients=dy))
    for a, b in zip(*results, strict=True):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=0, atol=1e-5 * float(np.abs(a.numpy()).max()))
    assert_close_rel(results[0][0], ref_layer(layer, x, context, keys, bias), name="y")

    @tf.function(jit_compile=True)  # the chunked engine under XLA
    def xla(x):
        return layer(x, context=context, mask=keys, attn_bias=bias, memory_efficient=True)

    np.testing.assert_allclose(xla(x).numpy(), results[0][0].numpy(), atol=1e-5)


def test_weights_structure_and_interchange(rng):
    x, _, _ = data(rng)
    mea = MemoryEfficientAttention(DIM, HEADS, DH, causal=True)
    flash = FlashAttention(DIM, HEADS, DH, causal=True)
    mea(x), flash(x)
    assert [tuple(w.shape) for w in mea.get_weights()] == [(DIM, HEADS * DH), (DIM, 2 * HEADS * DH), (HEADS * DH, DIM)]
    assert [w.path.split("/")[-2] for w in mea.weights] == ["to_q", "to_kv", "to_out"]
    flash.set_weights(mea.get_weights())
    np.testing.assert_allclose(flash(x).numpy(), mea(x).numpy(), atol=1e-6)
    mea.set_weights(flash.get_weights())
    cos = CosineSimAttention(DIM, seq_len=N, heads=HEADS, dim_head=DH)
    cos(x)
    scale = next(w for w in cos.weights if w.path.endswith("scale"))
    assert tuple(scale.shape) == (HEADS,)
    np.testing.assert_allclose(scale.numpy(), -math.log(math.log2(N**2 - N)), rtol=1e-6)
    assert_close_rel(cos(x), ref_layer(cos, x), name="cosine y")


@pytest.mark.parametrize(
    "make",
    [
        lambda: MemoryEfficientAttention(DIM, HEADS, DH, dropout=0.1, causal=True, memory_efficient=True,
                                         q_bucket_size=8, k_bucket_size=16),
        lambda: FlashAttention(DIM, HEADS, DH, causal=True, q_bucket_size=8),
        lambda: CosineSimAttention(DIM, N, HEADS, DH, causal=True, memory_efficient=True, k_bucket_size=4),
    ],
)  # fmt: skip
def test_get_config_and_keras_round_trip(make, rng, tmp_path):
    layer = make()
    config = layer.get_config()
    assert type(layer).from_config(config).get_config() == config
    inputs = keras.Input((N, DIM))
    model = keras.Model(inputs, layer(inputs))
    x, _, _ = data(rng)
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    assert type(loaded.layers[-1]) is type(layer)
    np.testing.assert_array_equal(loaded(x).numpy(), model(x).numpy())


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
@pytest.mark.parametrize("cls", [MemoryEfficientAttention, FlashAttention])
def test_mixed_precision(cls, policy, rng):
    x, context, keys = data(rng)
    reference = cls(DIM, HEADS, DH, causal=True)
    reference(x)
    dense = MemoryEfficientAttention(DIM, HEADS, DH, causal=True, dtype=policy)
    ours = cls(DIM, HEADS, DH, causal=True, q_bucket_size=8, dtype=policy)
    dense(x), ours(x)
    dense.set_weights(reference.get_weights())
    ours.set_weights(reference.get_weights())
    dtype = tf.as_dtype(keras.mixed_precision.Policy(policy).compute_dtype)
    kw = {"memory_efficient": True} if cls is MemoryEfficientAttention else {}
    y = ours(x, context=context, mask=keys, **kw)
    assert y.dtype == dtype
    # the reference from the inputs as the layer sees them (cast to the compute dtype)
    ref = ref_layer(reference, tf.cast(tf.cast(x, dtype), tf.float32), tf.cast(tf.cast(context, dtype), tf.float32),
                    keys)  # fmt: skip
    assert_close_rel(y, ref, dense(x, context=context, mask=keys), dtype, name=policy)
    with tf.GradientTape() as tape:
        tape.watch(x)
        loss = tf.reduce_sum(tf.cast(ours(x, context=context, mask=keys, **kw), tf.float32))
    assert np.isfinite(tape.gradient(loss, x).numpy()).all()


def test_dropout_only_when_training_on_the_memory_efficient_path(rng):
    x, _, _ = data(rng)
    layer = MemoryEfficientAttention(DIM, HEADS, DH, dropout=0.5, memory_efficient=True)
    plain = layer(x, training=False)
    assert np.abs(layer(x, training=True).numpy() - plain.numpy()).max() > 1e-3
    np.testing.assert_allclose(layer(x, training=True, memory_efficient=False).numpy(),
                               layer(x, memory_efficient=False).numpy())  # fmt: skip  # the dense path: no dropout
    np.testing.assert_allclose(plain.numpy(), layer(x, memory_efficient=False).numpy(), atol=1e-6)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x, training=True)
    assert np.isfinite(tape.gradient(y, x).numpy()).all()


def test_layer_errors(rng):
    x, _, _ = data(rng)
    cases = [
        (lambda: MemoryEfficientAttention(0), "dim must be a positive integer"),
        (lambda: MemoryEfficientAttention(DIM, heads=2.5), "heads must be a positive integer"),
        (lambda: MemoryEfficientAttention(DIM, dropout=1.0), "dropout must be in"),
        (lambda: FlashAttention(DIM, q_bucket_size=0), "q_bucket_size must be a positive integer"),
        (lambda: CosineSimAttention(DIM, seq_len=1), "seq_len must be at least 2"),
        (lambda: MemoryEfficientAttention(DIM, HEADS, DH)(x[..., :5]), "x must be"),
        (lambda: MemoryEfficientAttention(DIM, HEADS, DH)(x, context=x[..., :5]), "context must be"),
        (lambda: MemoryEfficientAttention(DIM, HEADS, DH)(x, mask=np.ones((B, N + 1), bool)), "mask of rank 2"),
        (lambda: FlashAttention(DIM, HEADS, DH)(x, k_bucket_size=-2), "k_bucket_size must be a positive"),
    ]
    for fn, match in cases:
        with pytest.raises(ValueError, match=match):
            fn()
