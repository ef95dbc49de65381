"""``recomputable``: same values and gradients with recompute=True, and lower peak memory."""

import numpy as np
import pytest
import tensorflow as tf

from bsattn import blocksparse_attention_impl, recomputable

pytestmark = pytest.mark.ops

B, T, HEADS, WIDTH, LAYERS = 1, 512, 2, 64, 4


def _stack(x, recompute):
    """LAYERS residual blocks, each widening then attending, so a block keeps a lot of activations."""
    for _ in range(LAYERS):
        x = x + _block(x, recompute=recompute)
    return x


@recomputable("block")
def _block(x):
    h = tf.tile(x, [1, 1, 8])  # [B, T, 8*WIDTH]: large intermediates that recompute must not keep
    h = tf.tanh(h) * 0.5
    q = h[..., :WIDTH] + h[..., WIDTH : 2 * WIDTH]
    return blocksparse_attention_impl(q, q, x, HEADS, "local", local_attn_ctx=64, blocksize=32, recompute=False)


def _loss_and_grad(x, recompute):
    with tf.GradientTape() as tape:
        tape.watch(x)
        loss = tf.reduce_sum(_stack(x, recompute) ** 2)
    return loss, tape.gradient(loss, x)


def _inputs():
    return tf.constant(np.random.default_rng(0).uniform(-1, 1, (B, T, WIDTH)).astype(np.float32))


@pytest.mark.parametrize("use_function", [False, True])
def test_recompute_matches_plain(use_function):
    x = _inputs()
    run = tf.function(_loss_and_grad) if use_function else _loss_and_grad
    loss, grad = run(x, False)
    loss_r, grad_r = run(x, True)
    np.testing.assert_allclose(loss_r.numpy(), loss.numpy(), rtol=1e-6)
    scale = np.abs(grad.numpy()).max()
    np.testing.assert_allclose(grad_r.numpy(), grad.numpy(), rtol=0, atol=1e-5 * scale)


def test_recompute_lowers_peak_memory():
    x = _inputs()
    run = tf.function(_loss_and_grad)
    peaks = {}
    for recompute in (False, True):
        run(x, recompute)  # trace and warm up outside the measurement
        tf.config.experimental.reset_memory_stats("CPU:0")
        run(x, recompute)
        peaks[recompute] = tf.config.experimental.get_memory_info("CPU:0")["peak"]
    # Without recompute all LAYERS blocks keep their [B, T, 8*WIDTH] intermediates for the
    # backward pass; with it only one block's are alive at a time.
    assert peaks[True] < 0.6 * peaks[False], peaks


def test_decorator_forms_and_non_tensor_arguments():
    calls = []

    @recomputable
    def scaled(x, factor, *, offset=0.0):
        calls.append(factor)
        return x * factor + offset

    x = tf.constant([1.0, 2.0])
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = scaled(x, 3.0, offset=1.0, recompute=True)
    np.testing.assert_allclose(y.numpy(), [4.0, 7.0])
    np.testing.assert_allclose(tape.gradient(y, x).numpy(), [3.0, 3.0])
    assert len(calls) == 2  # forward, then once more for the gradient


_MIRRORED_SCRIPT = """
import numpy as np, tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
from bsattn import blocksparse_attention_impl
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
x = tf.constant(np.random.default_rng(0).uniform(-1, 1, (2, 128, 32)).astype(np.float32))
with strategy.scope():
    w = tf.Variable(np.random.default_rng(1).uniform(-1, 1, (32, 32)).astype(np.float32))

def step(xs, recompute):
    with tf.GradientTape() as tape:
        h = tf.matmul(xs, w)
        y = blocksparse_attention_impl(h, h, xs, 2, "all", blocksize=32, recompute=recompute)
        loss = tf.reduce_sum(y ** 2)
    return tape.gradient(loss, w)

@tf.function
def run(recompute):
    dist = strategy.experimental_distribute_values_from_function(lambda ctx: x[ctx.replica_id_in_sync_group][None])
    grads = strategy.run(step, args=(dist, recompute))
    return strategy.reduce(tf.distribute.ReduceOp.SUM, grads, axis=None)

plain, recomputed = run(False).numpy(), run(True).numpy()
single = sum(step(x[i][None], False).numpy() for i in range(2))
assert strategy.num_replicas_in_sync == 2
np.testing.assert_allclose(recomputed, plain, rtol=1e-5, atol=1e-5 * np.abs(plain).max())
np.testing.assert_allclose(plain, single, rtol=1e-5, atol=1e-5 * np.abs(plain).max())
print("MIRRORED_OK")
"""


def test_recompute_under_mirrored_strategy():
    """Two replicas on logical CPUs: recompute=True gives the plain gradients (own process:
    logical devices must be set before TensorFlow initialises)."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    result = subprocess.run([sys.executable, "-c", _MIRRORED_SCRIPT], capture_output=True, text=True, env=env, timeout=300)
    assert "MIRRORED_OK" in result.stdout, result.stderr[-3000:]
