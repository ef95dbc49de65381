"""Tests of bsattn.deepspeed.bert_utils on a small Keras BERT-style encoder (keras.layers.MultiHeadAttention): padding,
position-embedding extension, and attention replacement (equal to the original with a Dense config; 8x longer
sequences with a sparse one)."""

import types

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import assert_close_rel, f64
from keras import ops

from bsattn.deepspeed.bert_utils import (
    extend_position_embedding,
    pad_to_block_size,
    replace_model_self_attention_with_sparse_self_attention,
    unpad_sequence_output,
    update_tokenizer_model_max_length,
)
from bsattn.deepspeed.layers import SparseMultiHeadAttention
from bsattn.deepspeed.sparsity_config import BigBirdSparsityConfig, DenseSparsityConfig

pytestmark = pytest.mark.ops

VOCAB, HIDDEN, HEADS, MAX_POS, BS = 40, 16, 2, 32, 16


@keras.saving.register_keras_serializable(package="tests")
class Positions(keras.layers.Layer):
    """``[B, T]`` ids → ``[1, T]`` positions 0..T-1."""

    def call(self, ids):
        return ops.arange(ops.shape(ids)[1])[None]


def bert_encoder(seed=0):
    """Embeddings (word + position + type, LayerNorm) and two post-norm blocks with MultiHeadAttention."""
    keras.utils.set_random_seed(seed)
    ids = keras.Input((None,), dtype="int32", name="input_ids")
    types_ = keras.Input((None,), dtype="int32", name="token_type_ids")
    mask = keras.Input((None,), dtype="bool", name="attention_mask")
    h = keras.layers.Embedding(VOCAB, HIDDEN, name="word_embeddings")(ids)
    h = h + keras.layers.Embedding(MAX_POS, HIDDEN, name="position_embeddings")(Positions()(ids))
    h = h + keras.layers.Embedding(2, HIDDEN, name="token_type_embeddings")(types_)
    h = keras.layers.LayerNormalization()(h)
    key_mask = keras.layers.Reshape((1, -1))(mask)
    for i in range(2):
        a = keras.layers.MultiHeadAttention(HEADS, HIDDEN // HEADS, name=f"attention_{i}")(h, h, attention_mask=key_mask)
        h = keras.layers.LayerNormalization()(h + a)
        f = keras.layers.Dense(HIDDEN, activation="gelu")(keras.layers.Dense(2 * HIDDEN, activation="gelu")(h))
        h = keras.layers.LayerNormalization()(h + f)
    return keras.Model([ids, types_, mask], h)


def inputs(rng, batch, t, real):
    ids = rng.integers(1, VOCAB, (batch, t)).astype(np.int32)
    mask = np.arange(t)[None] < np.asarray(real)[:, None]
    ids[~mask] = 0
    return ids, np.zeros((batch, t), np.int32), mask


def test_pad_and_unpad(rng):
    ids, types_, mask = inputs(rng, 2, 20, [20, 13])
    pos = np.tile(np.arange(20, dtype=np.int32), (2, 1))
    pad_len, p_ids, p_mask, p_types, p_pos, p_emb = pad_to_block_size(16, ids, mask, types_, pos, None, 0)
    assert pad_len == 12 and p_emb is None
    assert p_ids.shape == (2, 32) and (p_ids.numpy()[:, 20:] == 0).all()
    assert (p_mask.numpy()[:, :20] == mask).all() and not p_mask.numpy()[:, 20:].any()
    assert (p_types.numpy()[:, 20:] == 0).all() and (p_pos.numpy()[:, :20] == pos).all()
    seq = tf.reshape(tf.range(2 * 32 * 3), [2, 32, 3])
    np.testing.assert_array_equal(unpad_sequence_output(pad_len, seq).numpy(), seq.numpy()[:, :20])
    assert unpad_sequence_output(0, seq) is seq

    embed = keras.layers.Embedding(VOCAB, 4)
    emb = embed(ids)
    pad_len, _, _, _, _, p_emb = pad_to_block_size(8, None, mask, types_, None, emb, 3, embed)
    assert pad_len == 4
    np.testing.assert_array_equal(p_emb.numpy()[:, 20:], np.broadcast_to(embed(np.array([3])).numpy(), (2, 4, 4)))

    nothing = pad_to_block_size(4, ids, None, None, None, None, 0)  # 20 % 4 == 0: untouched
    assert nothing[0] == 0 and nothing[1] is ids
    with pytest.raises(ValueError, match="attention_mask is required"):
        pad_to_block_size(16, ids, None, types_, None, None, 0)
    with pytest.raises(ValueError, match="model_embeddings is required"):
        pad_to_block_size(16, None, mask, types_, None, emb, 0)
    with pytest.raises(ValueError, match="block_size must be a positive integer"):
        pad_to_block_size(0, ids, mask, types_, None, None, 0)


def test_update_tokenizer_model_max_length():
    tokenizer = types.SimpleNamespace(model_max_length=128, init_kwargs={"model_max_length": 128})
    assert update_tokenizer_model_max_length(tokenizer, 1024) is tokenizer
    assert tokenizer.model_max_length == 1024 and tokenizer.init_kwargs["model_max_length"] == 1024


def test_extend_position_embedding(rng):
    model = bert_encoder()
    model(inputs(rng, 1, 8, [8]))
    table = model.get_layer("position_embeddings").get_weights()[0]
    longer = extend_position_embedding(model, 8 * MAX_POS)
    new = longer.get_layer("position_embeddings").get_weights()[0]
    np.testing.assert_array_equal(new, np.tile(table, (8, 1)))
    assert longer.max_position_embeddings == 8 * MAX_POS
    assert longer.get_layer("attention_0") is model.get_layer("attention_0")  # other layers are shared
    # RoBERTa-style: 2 reserved rows kept, the other 30 tiled 100 // 30 = 3 times.
    reserved = extend_position_embedding(model, 100, reserved_positions=2)
    new = reserved.get_layer("position_embeddings").get_weights()[0]
    np.testing.assert_array_equal(new, np.concatenate([table[:2], np.tile(table[2:], (3, 1))]))
    with pytest.raises(ValueError, match="must be larger than the original 32 positions"):
        extend_position_embedding(model, 32)
    with pytest.raises(ValueError, match="no layer named 'pos'"):
        extend_position_embedding(model, 64, layer_name="pos")


def test_replace_with_dense_config_equals_original(rng):
    model = bert_encoder()
    x = inputs(rng, 2, MAX_POS, [MAX_POS, 21])
    expected = model(x)
    sparse = replace_model_self_attention_with_sparse_self_attention(model, MAX_POS, DenseSparsityConfig(HEADS, BS))
    assert isinstance(sparse.get_layer("attention_1"), SparseMultiHeadAttention)
    assert sparse.get_layer("word_embeddings") is model.get_layer("word_embeddings")
    assert_close_rel(sparse(x), f64(expected), name="dense config")
    with pytest.raises(TypeError, match="sparsity_config must be a SparsityConfig"):
        replace_model_self_attention_with_sparse_self_attention(model, MAX_POS, "dense")


def test_sparse_model_runs_eight_times_longer(rng):
    model = bert_encoder()
    model(inputs(rng, 1, MAX_POS, [MAX_POS]))
    long_len = 8 * MAX_POS
    longer = extend_position_embedding(model, long_len)
    config = BigBirdSparsityConfig(HEADS, block=BS, num_random_blocks=1)
    sparse = replace_model_self_attention_with_sparse_self_attention(longer, long_len, config)
    ids, types_, mask = inputs(rng, 2, long_len - 5, [long_len - 5, 100])
    pad_len, ids, mask, types_, _, _ = pad_to_block_size(BS, ids, mask, types_, None, None, 0)
    assert pad_len == 5
    out = unpad_sequence_output(pad_len, sparse([ids, types_, mask]))
    assert out.shape == (2, long_len - 5, HIDDEN) and np.isfinite(out.numpy()).all()
    # Padded keys are never attended: changing what they hold leaves the real tokens' outputs unchanged.
    ids2 = ids.numpy().copy()
    ids2[1, 100:] = 7
    out2 = unpad_sequence_output(pad_len, sparse([tf.constant(ids2), types_, mask]))
    np.testing.assert_allclose(out2.numpy()[1, :100], out.numpy()[1, :100], rtol=1e-5, atol=1e-6)
    h = tf.zeros([1, long_len + BS, HIDDEN])
    with pytest.raises(ValueError, match="more than max_seq_length=256"):
        sparse.get_layer("attention_0")(h, h)


def test_replace_keeps_implicit_masks(rng):
    # Keras's masks from Embedding(mask_zero=True) reach the sparse layers of the converted model (no explicit
    # attention_mask anywhere; the residual drops them before the second layer): outputs are the original's.
    ids = keras.Input((None,), dtype="int32")
    h = keras.layers.Embedding(VOCAB, HIDDEN, mask_zero=True)(ids)
    for i in range(2):
        h = keras.layers.LayerNormalization()(h + keras.layers.MultiHeadAttention(HEADS, 8, name=f"mha_{i}")(h, h))
    model = keras.Model(ids, h)
    x, _, _ = inputs(rng, 3, 21, [21, 13, 2])
    expected = model(x).numpy()
    sparse = replace_model_self_attention_with_sparse_self_attention(model, MAX_POS, DenseSparsityConfig(HEADS, BS))
    np.testing.assert_allclose(sparse(x).numpy(), expected, rtol=1e-5, atol=1e-5)
