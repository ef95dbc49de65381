"""The enwik8 example's ``--block=colt5``: the model runs, is causal where routing allows, and its flags are checked."""

from __future__ import annotations

import hashlib
import json
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
    settings = {"block": "colt5", "n_layer": 1, "n_state": 16, "n_head": 2, "n_timesteps": 48, "n_batch": 2,
                "blocksize": 16, "colt5_light_window": 16, "colt5_heavy_tokens_q": 16, "colt5_heavy_tokens_kv": 8,
                "colt5_heavy_ff_tokens": 4, "resid_pdrop": 0.0, "embed_pdrop": 0.0}  # fmt: skip
    return Config(**{**settings, **overrides})


def test_colt5_model_trains_and_is_causal():
    # Every query of a heavy window routed (colt5_heavy_tokens_q = the window) and every token through the heavy
    # feed-forward (its router picks per sequence): the model is causal; the keys/values are routed.
    model = SparseTransformer(tiny(colt5_heavy_ff_tokens=16))
    assert any("null_q_token" in v.name for v in model.trainable_variables)
    model.head.w.assign(tf.random.stateless_normal(model.head.w.shape, [1, 2]))
    x = np.random.default_rng(0).integers(0, 256, (2, 48))
    kv_token = model.blocks[0].attn.kv_router.routing_token.value
    with tf.GradientTape() as tape:
        logits = model(tf.constant(x, tf.int32))
        loss = tf.reduce_mean(token_losses(logits, tf.constant(x, tf.int32)))
    grads = dict(zip([v.ref() for v in model.trainable_variables], tape.gradient(loss, model.trainable_variables)))
    assert logits.shape == (2, 48, 256) and grads[kv_token.ref()] is not None
    x2 = x.copy()
    x2[:, 30:] = (x2[:, 30:] + 1) % 256
    b = model(tf.constant(x2, tf.int32)).numpy()
    np.testing.assert_allclose(logits.numpy()[:, :30], b[:, :30], rtol=1e-5, atol=1e-5)
    assert np.abs(logits.numpy()[:, 30:] - b[:, 30:]).max() > 0


def test_colt5_flags_are_checked_and_transformer_run_names_unchanged():
    with pytest.raises(SettingsError, match="colt5_routed_kv"):
        tiny(n_head=2, colt5_routed_kv=4).validate()
    with pytest.raises(SettingsError, match="colt5_heavy_tokens_q"):
        tiny(colt5_heavy_tokens_q=0).validate()
    cfg = Config()
    key = {name: getattr(cfg, name) for name in (*Config.RUN_IDENTITY, "n_steps")}  # the name before --block
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]
    assert cfg.run_name() == f"sparse-fixed-4x128-T512-{digest}"
    assert tiny().run_name().startswith("colt5-1x16-T48-")
    assert tiny().run_name() != tiny(colt5_heavy_tokens_kv=4).run_name()
    with pytest.raises(SettingsError, match="--block"):
        tiny().check_resumable({"block": "transformer"})
    tiny(block="transformer").check_resumable({})  # runs saved before the flag existed resume
