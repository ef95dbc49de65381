"""Tests of bsattn.deepspeed.layers: DeepSpeed's masks and rpe, forward and gradients, against a float64 NumPy
reference written from DeepSpeed's documented semantics; the layers' errors, get_config, .keras and SavedModel
round trips, tf.function, mixed precision and MirroredStrategy."""

import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import assert_close_rel, f64

from bsattn.deepspeed.layers import (
    BertSparseSelfAttention,
    SparseMultiHeadAttention,
    SparseSelfAttention,
    deepspeed_sparse_attention,
)
from bsattn.deepspeed.sparsity_config import (
    BigBirdSparsityConfig,
    DenseSparsityConfig,
    FixedSparsityConfig,
    SparsityConfig,
)

pytestmark = pytest.mark.ops

B, H, T, D, BS = 2, 2, 64, 8, 16
REPO = Path(__file__).resolve().parents[2]


def deepspeed_reference(q, k, v, keep_tokens, scale, dout, rpe=None, kp=None, kp_mode="add", am=None, am_mode="mul"):
    """float64 ``[B, H, T, D]`` attention with DeepSpeed's masks → ``(out, dq, dk, dv, drpe)``.

    Scores ``scale·q·kᵀ + rpe + kp (add) + am (add)``; dropped: outside ``keep_tokens [H|1, T, T]``, ``kp == 0``
    (mul), ``am == 0`` (mul), and -inf scores; a row with nothing kept gives 0 (DeepSpeed: NaN).
    """
    s = scale * np.einsum("bhid,bhjd->bhij", q, k)
    keep = np.broadcast_to(keep_tokens[None], s.shape).copy()
    add = np.zeros(s.shape)
    if rpe is not None:
        add = add + rpe
    if kp is not None:
        if kp_mode == "mul":
            keep &= kp[:, None, None, :] != 0
        else:
            add = add + kp[:, None, None, :]
    if am is not None:
        if am_mode == "mul":
            keep &= am != 0
        else:
            add = add + am
    with np.errstate(invalid="ignore"):
        s = np.where(keep, s + add, -np.inf)
    m = s.max(axis=-1, keepdims=True)
    e = np.exp(s - np.where(np.isfinite(m), m, 0.0))
    total = e.sum(axis=-1, keepdims=True)
    p = np.divide(e, total, out=np.zeros_like(e), where=total > 0)
    out = p @ v
    dp = dout @ np.swapaxes(v, -1, -2)
    ds = p * (dp - (p * dp).sum(-1, keepdims=True))
    dq, dk, dv = scale * ds @ k, scale * np.swapaxes(ds, -1, -2) @ q, np.swapaxes(p, -1, -2) @ dout
    drpe = None
    if rpe is not None:  # summed over the dimensions rpe broadcasts along
        shape4 = (1,) * (4 - rpe.ndim) + rpe.shape
        axes = tuple(i for i in range(4) if shape4[i] == 1)
        drpe = ds.sum(axis=axes, keepdims=True).reshape(rpe.shape)
    return out, dq, dk, dv, drpe


CONFIGS = {
    "fixed_uni": FixedSparsityConfig(H, block=BS, num_local_blocks=2, attention="unidirectional"),
    "bigbird_per_head": BigBirdSparsityConfig(H, block=BS, different_layout_per_head=True, num_random_blocks=1),
}


def make_features(rng, feature):
    """kwargs of deepspeed_sparse_attention for one feature (NumPy values)."""
    kp_add = np.where(rng.random((B, T)) < 0.25, -10000.0, 0.0)
    kp_add[:, :16] = 0.0  # every row keeps a key without -10000 (see the precision note of bsattn.deepspeed.layers)
    kp_add[:, 5] = -0.7  # a finite, moderate additive value
    kp_add[0, 9] = -np.inf
    kp_add[1, :] = -np.inf  # batch 1: every key padded -> every row gives 0
    kp_add[1, 40] = 0.3
    am = rng.random((T, T)) > 0.2
    am[7] = False  # a query with nothing to attend
    rpe_heads = 0.5 * rng.standard_normal((H, T, T))
    return {
        "none": {},
        "kp_mul": {"key_padding_mask": (rng.random((B, 1, 1, T)) > 0.3).astype(np.float64),
                   "key_padding_mask_mode": "mul"},
        "kp_add": {"key_padding_mask": kp_add, "key_padding_mask_mode": "add"},
        "am_mul": {"attn_mask": am.astype(np.float64)[None, None], "attn_mask_mode": "mul"},
        "am_add": {"attn_mask": np.where(am, 0.25 * rng.standard_normal((T, T)), -np.inf), "attn_mask_mode": "add"},
        "rpe_heads": {"rpe": rpe_heads},
        "rpe_shared_4d": {"rpe": rpe_heads[None, :1]},
        "rpe_batch": {"rpe": 0.5 * rng.standard_normal((B, H, T, T))},
        "everything": {"rpe": 0.5 * rng.standard_normal((B, 1, T, T)), "key_padding_mask": kp_add,
                       "attn_mask": am.astype(np.float64)},
    }[feature]  # fmt: skip


def run_case(rng, config, feature, dtype, mode="eager"):
    q, k, v, dout = (rng.uniform(-1, 1, (B, H, T, D)) for _ in range(4))
    kwargs = make_features(rng, feature)
    tensors = [tf.constant(x, dtype) for x in (q, k, v)]
    rpe = tf.constant(kwargs["rpe"], dtype) if "rpe" in kwargs else None

    def fn(q_, k_, v_, rpe_):
        tf_kwargs = {key: val for key, val in kwargs.items() if key != "rpe"}
        tf_kwargs = {key: tf.constant(val, dtype) if isinstance(val, np.ndarray) else val for key, val in tf_kwargs.items()}
        return deepspeed_sparse_attention(q_, k_, v_, config, rpe=rpe_, **tf_kwargs)

    fn = tf.function(fn) if mode == "function" else fn
    with tf.GradientTape() as tape:
        tape.watch(tensors + ([rpe] if rpe is not None else []))
        out = fn(*tensors, rpe)
    grads = tape.gradient(out, tensors + ([rpe] if rpe is not None else []), output_gradients=tf.constant(dout, dtype))
    exact = [f64(x) for x in tensors]
    kp = kwargs.get("key_padding_mask")
    am = kwargs.get("attn_mask")
    ref = deepspeed_reference(
        *exact, config.token_mask(T), float(np.float32(D**-0.5)), f64(tf.constant(dout, dtype)),
        rpe=None if rpe is None else f64(rpe),
        kp=None if kp is None else np.asarray(kp).reshape(B, T), kp_mode=kwargs.get("key_padding_mask_mode", "add"),
        am=None if am is None else np.asarray(am).reshape(T, T), am_mode=kwargs.get("attn_mask_mode", "mul"),
    )  # fmt: skip
    return out, grads, ref


@pytest.mark.parametrize("dtype", [tf.float64, tf.float32], ids=["float64", "float32"])
@pytest.mark.parametrize(
    "feature", ["none", "kp_mul", "kp_add", "am_mul", "am_add", "rpe_heads", "rpe_shared_4d", "rpe_batch", "everything"]
)
@pytest.mark.parametrize("config_name", list(CONFIGS))
def test_masks_and_rpe_forward_and_gradients(rng, config_name, feature, dtype):
    out, grads, ref = run_case(rng, CONFIGS[config_name], feature, dtype)
    assert_close_rel(out, ref[0], name="out")
    for name, got, want in zip(["dq", "dk", "dv", "drpe"], grads, ref[1:], strict=False):
        if got is None and want is None:
            continue
        # dk/dv of fully padded keys are exactly 0 (no probability reaches them).
        assert_close_rel(got, want, name=name)


def test_everything_under_tf_function(rng):
    out, grads, ref = run_case(rng, CONFIGS["bigbird_per_head"], "everything", tf.float64, mode="function")
    assert_close_rel(out, ref[0], name="out")
    for name, got, want in zip(["dq", "dk", "dv", "drpe"], grads, ref[1:], strict=True):
        assert_close_rel(got, want, name=name)


def test_reduced_precision_bounded_by_dense_tf(rng):
    config = CONFIGS["fixed_uni"]
    q, k, v = (rng.uniform(-1, 1, (B, H, T, D)) for _ in range(3))
    rpe = 0.5 * rng.standard_normal((H, T, T))
    keep = config.token_mask(T)
    for dtype in (tf.float16, tf.bfloat16):
        xs = [tf.constant(x, dtype) for x in (q, k, v, rpe)]
        out = deepspeed_sparse_attention(*xs[:3], config, rpe=xs[3])
        assert out.dtype == dtype
        scale = float(np.float32(D**-0.5))
        s = tf.einsum("bhid,bhjd->bhij", xs[0], xs[1]) * tf.constant(scale, dtype) + xs[3]
        s = tf.where(tf.constant(keep[None]), s, tf.constant(dtype.min, dtype))
        dense = tf.einsum("bhij,bhjd->bhid", tf.nn.softmax(s), xs[2])
        ref = deepspeed_reference(*(f64(x) for x in xs[:3]), keep, scale, np.zeros((B, H, T, D)), rpe=f64(xs[3]))[0]
        assert_close_rel(out, ref, dense_tf=dense, name=dtype.name)


def test_transposed_key_is_accepted(rng):
    config = CONFIGS["fixed_uni"]
    q, k, v = (tf.constant(rng.uniform(-1, 1, (B, H, T, D)), tf.float64) for _ in range(3))
    a = deepspeed_sparse_attention(q, k, v, config)
    b = deepspeed_sparse_attention(q, tf.transpose(k, [0, 1, 3, 2]), v, config)
    np.testing.assert_array_equal(a.numpy(), b.numpy())


ERRORS = {
    "mode": (lambda x, c: SparseSelfAttention(c, key_padding_mask_mode="sum"), ValueError,
             "key_padding_mask_mode must be 'add' or 'mul'"),
    "attn_mode": (lambda x, c: SparseSelfAttention(c, attn_mask_mode=None), ValueError, "attn_mask_mode"),
    "no_config": (lambda x, c: SparseSelfAttention(), ValueError, "sparsity_config is required"),
    "abstract": (lambda x, c: SparseSelfAttention(SparsityConfig(4)), NotImplementedError, "make_layout"),
    "not_config": (lambda x, c: SparseSelfAttention("fixed"), TypeError, "sparsity_config must be a SparsityConfig"),
    "max_len_divisible": (lambda x, c: SparseSelfAttention(c, max_seq_length=100), ValueError,
                          "Sequence Length, 100, needs to be dividable by Block size 16"),
    "too_long": (lambda x, c: SparseSelfAttention(c, max_seq_length=32)(x, x, x), ValueError,
                 "more than max_seq_length=32"),
    "heads": (lambda x, c: deepspeed_sparse_attention(x, x, x, FixedSparsityConfig(4, block=BS)), ValueError,
              "query has 2 heads but sparsity_config.num_heads is 4"),
    "cross": (lambda x, c: deepspeed_sparse_attention(x, x[:, :, :32], x[:, :, :32], c), NotImplementedError,
              "only self-attention"),
    "rank": (lambda x, c: deepspeed_sparse_attention(x[0], x[0], x[0], c), ValueError,
             r"query must be \[batch, heads, T, head_dim\]"),
    "length": (lambda x, c: deepspeed_sparse_attention(x[:, :, :40], x[:, :, :40], x[:, :, :40], c), ValueError,
               "Sequence Length, 40, needs to be dividable by Block size 16"),
    "rpe_shape": (lambda x, c: deepspeed_sparse_attention(x, x, x, c, rpe=tf.zeros([3, T, T])), ValueError,
                  "rpe must be"),
    "kp_shape": (lambda x, c: deepspeed_sparse_attention(x, x, x, c, key_padding_mask=tf.zeros([B, T, 2])),
                 ValueError, r"key_padding_mask must squeeze to \[batch, T\]"),
    "am_shape": (lambda x, c: deepspeed_sparse_attention(x, x, x, c, attn_mask=tf.zeros([B, T, T])), ValueError,
                 r"attn_mask must squeeze to \[T, T\]"),
    "bert_sizes": (lambda x, c: BertSparseSelfAttention({"hidden_size": 30, "num_attention_heads": 4}), ValueError,
                   "not a multiple of the number of attention heads"),
    "bert_heads": (lambda x, c: BertSparseSelfAttention({"hidden_size": 32, "num_attention_heads": 4}, c),
                   ValueError, "sparsity_config.num_heads=2 must equal config.num_attention_heads=4"),
    "mha_heads": (lambda x, c: SparseMultiHeadAttention(4, 8, sparsity_config=c), ValueError, "num_heads=4"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(ERRORS))
def test_errors(case):
    make, error, message = ERRORS[case]
    x = tf.zeros([B, H, T, D])
    with pytest.raises(error, match=message):
        make(x, CONFIGS["fixed_uni"])


# ---- the layers: equivalences, serialisation ---------------------------------------------------------------


def test_sparse_multi_head_attention_with_dense_config_equals_keras(rng):
    mha = keras.layers.MultiHeadAttention(num_heads=2, key_dim=8, name="mha")
    x = tf.constant(rng.uniform(-1, 1, (B, T, 12)), tf.float32)
    mask = tf.constant(rng.random((B, 1, T)) > 0.3)
    expected = mha(x, x, attention_mask=mask)
    sparse = SparseMultiHeadAttention.from_multi_head_attention(mha, DenseSparsityConfig(2, block=BS))
    assert_close_rel(sparse(x, x, attention_mask=mask), f64(expected), name="dense config")
    causal = SparseMultiHeadAttention.from_multi_head_attention(
        mha, FixedSparsityConfig(2, block=BS, num_local_blocks=4, attention="unidirectional")
    )  # one local window covering T: causal attention
    assert_close_rel(causal(x, x), f64(mha(x, x, use_causal_mask=True)), name="causal")


def test_bert_sparse_self_attention_matches_its_definition(rng):
    layer = BertSparseSelfAttention({"hidden_size": 16, "num_attention_heads": 2}, CONFIGS["fixed_uni"])
    x = tf.constant(rng.uniform(-1, 1, (B, T, 16)), tf.float32)
    bert_mask = np.where(rng.random((B, 1, 1, T)) > 0.3, 0.0, -10000.0).astype(np.float32)
    out = layer(x, attention_mask=bert_mask)

    def heads(y):
        return np.transpose(f64(y).reshape(B, T, 2, 8), [0, 2, 1, 3])

    q, k, v = (heads(dense(x)) for dense in (layer.query, layer.key, layer.value))
    keep = CONFIGS["fixed_uni"].token_mask(T)
    ref = deepspeed_reference(q, k, v, keep, float(np.float32(8**-0.5)), np.zeros_like(q), kp=bert_mask.reshape(B, T))
    assert_close_rel(out, np.transpose(ref[0], [0, 2, 1, 3]).reshape(B, T, 16), name="bert")


def small_model(config):
    x = keras.Input((T, 16))
    mask = keras.Input((T,))
    y = BertSparseSelfAttention({"hidden_size": 16, "num_attention_heads": 2}, config, key_padding_mask_mode="mul",
                                max_seq_length=128, name="bert_sparse")(x, attention_mask=mask)  # fmt: skip
    return keras.Model([x, mask], y)


def test_get_config_keras_file_and_saved_model_round_trips(rng, tmp_path):
    config = CONFIGS["bigbird_per_head"]
    layer = SparseSelfAttention(config, key_padding_mask_mode="mul", attn_mask_mode="add", max_seq_length=128)
    clone = SparseSelfAttention.from_config(layer.get_config())
    assert clone.sparsity_config == config and clone.get_config() == layer.get_config()
    mha = SparseMultiHeadAttention(2, 8, sparsity_config=config, max_seq_length=128)
    assert SparseMultiHeadAttention.from_config(mha.get_config()).get_config() == mha.get_config()

    model = small_model(config)
    x = rng.uniform(-1, 1, (B, T, 16)).astype(np.float32)
    mask = (rng.random((B, T)) > 0.2).astype(np.float32)
    expected = model([x, mask]).numpy()
    model.save(tmp_path / "m.keras")
    reloaded = keras.saving.load_model(tmp_path / "m.keras")
    np.testing.assert_array_equal(reloaded([x, mask]).numpy(), expected)
    assert reloaded.get_layer("bert_sparse").sparse_self_attention.sparsity_config == config

    model.export(str(tmp_path / "saved"), format="tf_saved_model", verbose=False)
    loaded = tf.saved_model.load(str(tmp_path / "saved"))
    np.testing.assert_allclose(loaded.serve([x, mask]).numpy(), expected, rtol=1e-6, atol=1e-6)


def test_mixed_precision(rng):
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        layer = BertSparseSelfAttention({"hidden_size": 16, "num_attention_heads": 2}, CONFIGS["fixed_uni"])
        x = tf.constant(rng.uniform(-1, 1, (B, T, 16)), tf.float32)
        with tf.GradientTape() as tape:
            out = layer(x)
            loss = tf.reduce_sum(tf.cast(out, tf.float32) ** 2)
        grads = tape.gradient(loss, layer.trainable_weights)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert out.dtype == tf.float16 and layer.query.kernel.dtype == "float32"
    assert all(g is not None and np.isfinite(g.numpy()).all() for g in grads)
    ref = BertSparseSelfAttention({"hidden_size": 16, "num_attention_heads": 2}, CONFIGS["fixed_uni"])
    ref.build(x.shape)
    ref.set_weights(layer.get_weights())
    np.testing.assert_allclose(out.numpy(), ref(x).numpy(), atol=2e-2)


MIRRORED = """
import numpy as np, tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
from bsattn.deepspeed.layers import BertSparseSelfAttention
from bsattn.deepspeed.sparsity_config import BigBirdSparsityConfig
config = BigBirdSparsityConfig(2, block=16, different_layout_per_head=True)
x = tf.constant(np.random.default_rng(0).uniform(-1, 1, (4, 64, 16)).astype(np.float32))
results = []
for strategy in (tf.distribute.get_strategy(), tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])):
    with strategy.scope():
        layer = BertSparseSelfAttention({"hidden_size": 16, "num_attention_heads": 2}, config)
        layer.build(x.shape)
        layer.set_weights([np.random.default_rng(i).uniform(-1, 1, w.shape) for i, w in enumerate(layer.weights)])

    @tf.function
    def step(xs):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(layer(xs) ** 2)
        return tape.gradient(loss, layer.trainable_weights)

    data = strategy.experimental_distribute_dataset(tf.data.Dataset.from_tensors(x))
    grads = strategy.run(step, args=(next(iter(data)),))
    grads = [strategy.reduce("SUM", g, axis=None) for g in grads]
    results.append((strategy.num_replicas_in_sync, [g.numpy() for g in grads]))
(n0, g0), (n1, g1) = results
assert n0 == 1 and n1 == 2, (n0, n1)
for a, b in zip(g0, g1):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
print("MIRRORED OK")
"""


def test_mirrored_strategy_matches_one_device():
    env = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "2"}
    result = subprocess.run([sys.executable, "-c", MIRRORED], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=300, check=False)  # fmt: skip
    assert "MIRRORED OK" in result.stdout, result.stderr[-3000:]


@pytest.mark.parametrize("heads,kv_heads", [(2, 1), (4, 2)], ids=["mqa", "gqa"])
def test_grouped_key_value_heads_equal_repeated_ones(rng, heads, kv_heads):
    """key/value with fewer heads (the op's kv_heads, no copy) equal the same attention on K/V repeated per group,
    with a per-batch rpe and an additive key padding mask, forward and gradients (float64; the repeated path is
    checked against the float64 reference above)."""
    config = FixedSparsityConfig(heads, block=BS, num_local_blocks=2, attention="unidirectional")
    q, dout = (tf.constant(rng.uniform(-1, 1, (B, heads, T, D))) for _ in range(2))
    k, v = (tf.constant(rng.uniform(-1, 1, (B, kv_heads, T, D))) for _ in range(2))
    rpe = tf.constant(0.5 * rng.standard_normal((B, heads, T, T)))
    kp = tf.constant(np.where(rng.random((B, T)) < 0.25, -10000.0, 0.0))
    results = []
    for repeat in (False, True):
        with tf.GradientTape() as tape:
            tape.watch([q, k, v, rpe])
            kk, vv = (tf.repeat(x, heads // kv_heads, axis=1) if repeat else x for x in (k, v))
            out = deepspeed_sparse_attention(q, kk, vv, config, rpe=rpe, key_padding_mask=kp)
        results.append([out, *tape.gradient(out, [q, k, v, rpe], output_gradients=dout)])
    for ours, ref in zip(*results):
        np.testing.assert_allclose(ours.numpy(), ref.numpy(), rtol=1e-10, atol=1e-12)
    with pytest.raises(NotImplementedError, match="fewer heads"):
        deepspeed_sparse_attention(q, k[:, :, :, :4], v, config)
