"""The enwik8 example's ``--attention=memory_efficient``: the dense causal model on the O(T)-memory path."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from examples.enwik8.config import Config, SettingsError
from examples.enwik8.model import SparseTransformer, token_losses

pytestmark = pytest.mark.ops


def tiny(**overrides) -> Config:
    settings = {"n_layer": 2, "n_state": 32, "n_head": 2, "n_timesteps": 64, "n_batch": 2, "blocksize": 16,
                "attn_mode": "all", "resid_pdrop": 0.1}  # fmt: skip
    return Config(**{**settings, **overrides})


def loss_and_grads(cfg: Config, x: tf.Tensor):
    model = SparseTransformer(cfg)
    model.head.w.assign(tf.random.stateless_normal(model.head.w.shape, [1, 2]))  # gradients reach every layer
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(token_losses(model(x, tf.constant([3, 4], tf.int64)), x))
    return loss, tape.gradient(loss, model.trainable_variables)


def test_memory_efficient_is_the_dense_model():
    x = tf.constant(np.random.default_rng(0).integers(0, 256, (2, 64)), tf.int32)
    loss, grads = loss_and_grads(tiny(attention="memory_efficient"), x)
    dense_loss, dense_grads = loss_and_grads(tiny(attention="dense"), x)
    np.testing.assert_allclose(loss, dense_loss, rtol=1e-6)
    for ours, base in zip(grads, dense_grads, strict=True):
        np.testing.assert_allclose(tf.convert_to_tensor(ours), tf.convert_to_tensor(base), rtol=1e-4, atol=1e-6)


def test_memory_efficient_needs_the_causal_mode():
    with pytest.raises(SettingsError, match="needs --attn_mode=all"):
        tiny(attention="memory_efficient", attn_mode="fixed", local_attn_ctx=32).validate()
