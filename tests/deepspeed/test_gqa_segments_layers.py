"""The layers with grouped-query attention (K/V heads shared inside the fused op) and packed sequences.

- ``SparseGroupedQueryAttention`` against ``keras.layers.GroupQueryAttention`` with copied weights: masks (implicit,
  explicit, ``attention_mask``, causal, sliding window), multi-query, gate, ``T != S``, gradients, ``.keras`` round
  trip; the op receives the ``num_key_value_heads`` K/V heads as they are (no repeat).
- Packed sequences (``segment_ids``) through ``SparseMultiHeadAttention``, ``SparseGroupedQueryAttention`` and
  ``SparseSelfAttention`` equal running each sequence alone.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

import bsattn.deepspeed.layers as layers_module
from bsattn.deepspeed.layers import SparseGroupedQueryAttention, SparseMultiHeadAttention, SparseSelfAttention
from bsattn.deepspeed.sparsity_config import DenseSparsityConfig, FixedSparsityConfig


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


def gqa_pair(rng, t, s, heads=4, kv_heads=2, head_dim=4, dim=8, **kwargs):
    """A built Keras GroupQueryAttention and a SparseGroupedQueryAttention with its weights, inputs [2, t|s, dim]."""
    q = rng.normal(size=(2, t, dim)).astype("float32")
    v = rng.normal(size=(2, s, dim)).astype("float32")
    sparse_kwargs = {k: kwargs.pop(k) for k in ("sparsity_config",) if k in kwargs}
    ref = keras.layers.GroupQueryAttention(head_dim, heads, kv_heads, **kwargs)
    ref(q, v)
    sparse = SparseGroupedQueryAttention(head_dim, heads, kv_heads, **kwargs, **sparse_kwargs)
    sparse(q, v)
    sparse.set_weights(ref.get_weights())
    return ref, sparse, q, v


@pytest.mark.parametrize("kv_heads", [1, 2])
@pytest.mark.parametrize("t, s", [(13, 13), (9, 21)])
def test_gqa_matches_keras(rng, kv_heads, t, s):
    ref, sparse, q, v = gqa_pair(rng, t, s, kv_heads=kv_heads)
    full = rng.random((2, t, s)) > 0.3
    key_mask = np.arange(s)[None] < np.array([[s], [s - 3]])
    for kwargs in ({}, {"use_causal_mask": True}, {"attention_mask": full}, {"attention_mask": key_mask[:, None]},
                   {"attention_mask": full, "use_causal_mask": True}):  # fmt: skip
        np.testing.assert_allclose(sparse(q, v, **kwargs), ref(q, v, **kwargs), atol=2e-6, err_msg=str(kwargs))
    masking = keras.layers.Masking(0.0)
    mv = np.where(key_mask[..., None], v, 0.0)
    for causal in (False, True):
        np.testing.assert_allclose(sparse(q, masking(mv), use_causal_mask=causal),
                                   ref(q, masking(mv), use_causal_mask=causal), atol=2e-6)  # fmt: skip


def test_gqa_gate_sliding_window_and_padded_queries(rng):
    ref, sparse, q, v = gqa_pair(rng, 11, 11, use_gate=True, sliding_window=3)
    query_mask = np.arange(11)[None] < np.array([[11], [8]])
    mq = np.where(query_mask[..., None], q, 0.0)
    masking = keras.layers.Masking(0.0)
    for causal in (False, True):
        np.testing.assert_allclose(sparse(q, v, use_causal_mask=causal), ref(q, v, use_causal_mask=causal), atol=2e-6)
        np.testing.assert_allclose(sparse(masking(mq), masking(mq), use_causal_mask=causal),
                                   ref(masking(mq), masking(mq), use_causal_mask=causal), atol=2e-6)  # fmt: skip


def test_gqa_passes_kv_heads_to_the_op(rng, monkeypatch):
    """No copy: the op gets k and v with num_key_value_heads heads and kv_heads set."""
    seen = []
    real = layers_module.fused_attention

    def spy(q, k, v, tables, heads, **kwargs):
        seen.append((q.shape[-1], k.shape[-1], heads, kwargs.get("kv_heads")))
        return real(q, k, v, tables, heads, **kwargs)

    monkeypatch.setattr(layers_module, "fused_attention", spy)
    _, sparse, q, v = gqa_pair(rng, 16, 16, heads=4, kv_heads=1, head_dim=4)
    sparse(q, v)
    assert seen[-1] == (16, 4, 4, 1)


def test_gqa_gradients_match_keras(rng):
    ref, sparse, q, v = gqa_pair(rng, 10, 12)
    full = rng.random((2, 10, 12)) > 0.2
    upstream = tf.constant(rng.normal(size=(2, 10, 8)).astype("float32"))
    grads = []
    for layer in (ref, sparse):
        qt, vt = tf.constant(q), tf.constant(v)
        with tf.GradientTape() as tape:
            tape.watch([qt, vt])
            out = layer(qt, vt, attention_mask=full, use_causal_mask=True)
            loss = tf.reduce_sum(out * upstream)
        grads.append(tape.gradient(loss, [qt, vt] + layer.trainable_weights))
    for a, b in zip(*grads):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-5)


def test_gqa_sparse_config_and_keras_round_trip(rng, tmp_path):
    config = FixedSparsityConfig(4, block=8, different_layout_per_head=True, num_local_blocks=2,
                                 num_different_global_patterns=2)  # fmt: skip
    _, sparse, q, v = gqa_pair(rng, 16, 16, sparsity_config=config)
    # The pattern as a mask on Keras's dense path (return_attention_scores) gives the fused path's output.
    got, scores = sparse(q, v, return_attention_scores=True, use_causal_mask=True)
    np.testing.assert_allclose(sparse(q, v, use_causal_mask=True), got, atol=2e-6)
    inputs = keras.Input((16, 8))
    model = keras.Model(inputs, sparse(inputs, inputs, use_causal_mask=True))
    model.save(tmp_path / "gqa.keras")
    loaded = keras.saving.load_model(tmp_path / "gqa.keras")
    np.testing.assert_array_equal(loaded(q), model(q))
    assert loaded.layers[-1].sparsity_config == config


# ---- packed sequences -----------------------------------------------------------------------------------------

LENGTHS = (5, 11, 8)  # three sequences packed into T = 24


def packed(rng, dim=8):
    """(x [1, 24, dim], segment_ids [1, 24], the pieces [1, n, dim])."""
    pieces = [rng.normal(size=(1, n, dim)).astype("float32") for n in LENGTHS]
    ids = np.concatenate([np.full(n, i, np.int32) for i, n in enumerate(LENGTHS)])[None]
    return np.concatenate(pieces, axis=1), ids, pieces


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kind", ["mha", "gqa"])
def test_packed_sequences_equal_each_sequence_alone(rng, kind, causal):
    x, ids, pieces = packed(rng)
    if kind == "mha":
        layer = SparseMultiHeadAttention(2, 4, sparsity_config=DenseSparsityConfig(2, block=8))
    else:
        layer = SparseGroupedQueryAttention(4, 4, 2, sparsity_config=DenseSparsityConfig(4, block=8))
    out = np.asarray(layer(x, x, segment_ids=ids, use_causal_mask=causal))
    alone = np.concatenate([np.asarray(layer(p, p, use_causal_mask=causal)) for p in pieces], axis=1)
    np.testing.assert_allclose(out, alone, atol=2e-6)
    # The pair form, and the dense scores path, agree.
    np.testing.assert_allclose(layer(x, x, segment_ids=(ids, ids), use_causal_mask=causal), out, atol=2e-6)
    got, _ = layer(x, x, segment_ids=ids, use_causal_mask=causal, return_attention_scores=True)
    np.testing.assert_allclose(got, out, atol=2e-6)


def test_packed_sequences_in_sparse_self_attention(rng):
    """SparseSelfAttention ([B, H, T, D]) with segment_ids: each block-aligned sequence as if alone."""
    layer = SparseSelfAttention(DenseSparsityConfig(2, block=8), max_seq_length=32)
    q, k, v = (rng.normal(size=(1, 2, 32, 4)).astype("float32") for _ in range(3))
    ids = np.repeat([0, 0, 1, 2], 8)[None].astype(np.int32)
    out = np.asarray(layer(q, k, v, segment_ids=ids))
    for lo, hi in ((0, 16), (16, 24), (24, 32)):
        alone = layer(q[:, :, lo:hi], k[:, :, lo:hi], v[:, :, lo:hi])
        np.testing.assert_allclose(out[:, :, lo:hi], alone, atol=2e-6)


def test_segment_ids_errors(rng):
    x, ids, _ = packed(rng)
    layer = SparseMultiHeadAttention(2, 4)
    with pytest.raises(ValueError, match=r"segment_ids must be integer \[batch, length\] tensors"):
        layer(x, x, segment_ids=ids.astype(np.float32))
    with pytest.raises(ValueError, match=r"segment_ids must be one \[batch, T\] tensor or a pair"):
        layer(x, x, segment_ids=(ids, ids, ids))
