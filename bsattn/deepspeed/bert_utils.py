"""DeepSpeed's ``SparseAttentionUtils`` for Keras BERT-style models.

- ``pad_to_block_size`` / ``unpad_sequence_output``: pad the inputs to a multiple of the block size, and cut the
  output back.
- ``extend_position_embedding``: a longer position table, the old one tiled (DeepSpeed's recipe: 128 → 1k
  replicates the embeddings 8 times).
- ``update_tokenizer_model_max_length``.
- ``replace_model_self_attention_with_sparse_self_attention``: every ``keras.layers.MultiHeadAttention`` becomes a
  ``SparseMultiHeadAttention`` with the same weights.

DeepSpeed edits Hugging Face PyTorch modules in place. Keras does not let a built layer take new sublayers, so the
model-level functions here take a functional (or Sequential) Keras model and return a new one, made by
``keras.models.clone_model`` (nested functional models included): replaced layers are new, every other layer is
*shared* with the original (same weights, as DeepSpeed reuses the query/key/value modules). Subclassed models
can use ``SparseMultiHeadAttention.from_multi_head_attention`` on their layers directly.
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from bsattn.deepspeed.layers import SparseMultiHeadAttention
from bsattn.deepspeed.sparsity_config import SparsityConfig


def _check_block(block_size) -> int:
    if isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer)) or block_size < 1:
        raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
    return int(block_size)


def pad_to_block_size(
    block_size: int,
    input_ids: tf.Tensor | None,
    attention_mask: tf.Tensor | None,
    token_type_ids: tf.Tensor | None,
    position_ids: tf.Tensor | None,
    inputs_embeds: tf.Tensor | None,
    pad_token_id: int,
    model_embeddings=None,
):
    """Right-pad the sequence dimension to a multiple of ``block_size``.

    Args:
      input_ids, attention_mask, token_type_ids, position_ids: ``[B, T]`` or None; padded with ``pad_token_id``,
        0, 0 and ``pad_token_id`` (DeepSpeed's values). ``attention_mask`` and ``token_type_ids`` are required
        when padding is needed (the padding must be masked).
      inputs_embeds: ``[B, T, C]`` or None; padded with ``model_embeddings(pad ids)`` (the word embedding layer).
    Returns:
      ``(pad_len, input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds)``; ``pad_len`` is an int
      when ``T`` is static, else a scalar tensor.
    """
    block_size = _check_block(block_size)
    source = input_ids if input_ids is not None else inputs_embeds
    if source is None:
        raise ValueError("input_ids or inputs_embeds must be given")
    source = tf.convert_to_tensor(source)
    batch, seq_len = tf.shape(source)[0], source.shape[1]
    if seq_len is None:
        seq_len = tf.shape(source)[1]
    pad_len = (block_size - seq_len % block_size) % block_size
    if isinstance(pad_len, int) and pad_len == 0:
        return 0, input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds
    if attention_mask is None:
        raise ValueError("attention_mask is required when the inputs need padding (the padding must be masked)")
    if token_type_ids is None:
        raise ValueError("token_type_ids is required when the inputs need padding")

    def pad(x, value):
        x = tf.convert_to_tensor(x)
        return tf.pad(x, [[0, 0], [0, pad_len]], constant_values=tf.cast(value, x.dtype))

    if inputs_embeds is not None:
        if model_embeddings is None:
            raise ValueError("model_embeddings is required to pad inputs_embeds")
        pad_ids = tf.fill([batch, pad_len], tf.constant(pad_token_id, tf.int32))
        pad_embeds = tf.cast(model_embeddings(pad_ids), inputs_embeds.dtype)
        inputs_embeds = tf.concat([inputs_embeds, pad_embeds], axis=1)
    if input_ids is not None:
        input_ids = pad(input_ids, pad_token_id)
    if position_ids is not None:
        position_ids = pad(position_ids, pad_token_id)
    attention_mask = pad(attention_mask, 0)
    token_type_ids = pad(token_type_ids, 0)
    return pad_len, input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds


def unpad_sequence_output(pad_len, sequence_output: tf.Tensor) -> tf.Tensor:
    """``sequence_output [B, T + pad_len, ...]`` without its last ``pad_len`` positions."""
    if isinstance(pad_len, (int, np.integer)):
        return sequence_output[:, : sequence_output.shape[1] - pad_len] if pad_len > 0 else sequence_output
    return sequence_output[:, : tf.shape(sequence_output)[1] - pad_len]


def update_tokenizer_model_max_length(tokenizer, max_position: int):
    """Set ``tokenizer.model_max_length`` (and ``init_kwargs['model_max_length']`` if it has them); returns it."""
    tokenizer.model_max_length = max_position
    init_kwargs = getattr(tokenizer, "init_kwargs", None)
    if isinstance(init_kwargs, dict):
        init_kwargs["model_max_length"] = max_position
    return tokenizer


def _clone(model, replace, what: str):
    """``clone_model`` with ``replace(layer) -> new layer or None`` (None: share the layer)."""
    if not isinstance(model, keras.Model):
        raise TypeError(f"model must be a keras.Model, got {type(model).__name__}")
    replaced = []

    def clone_function(layer):
        new = replace(layer)
        if new is None:
            return layer
        replaced.append(layer.name)
        return new

    try:
        clone = keras.models.clone_model(model, clone_function=clone_function, recursive=True)
    except ValueError as error:
        if "Sequential" in str(error) or "Functional" in str(error):
            raise ValueError(
                f"model must be a functional or Sequential Keras model to {what}; for a subclassed model replace "
                "its layers yourself (SparseMultiHeadAttention.from_multi_head_attention)"
            ) from error
        raise
    return clone, replaced


def extend_position_embedding(
    model: keras.Model, max_position: int, layer_name: str = "position_embeddings", reserved_positions: int = 0
) -> keras.Model:
    """A copy of ``model`` whose ``keras.layers.Embedding`` named ``layer_name`` holds more positions.

    With ``n = rows - reserved_positions`` original positions, the new table keeps the first
    ``reserved_positions`` rows (RoBERTa: 2) and tiles the other ``n`` rows ``max(1, max_position // n)`` times
    (so it has fewer than ``max_position`` positions when ``n`` does not divide it, as in DeepSpeed).
    DeepSpeed left RoBERTa's two reserved rows uninitialised; they are copied here. Raises ``ValueError`` unless
    ``max_position`` exceeds ``n``. Sets ``model.max_position_embeddings`` on the copy.
    """
    if isinstance(max_position, bool) or not isinstance(max_position, int) or max_position < 1:
        raise ValueError(f"max_position must be a positive integer, got {max_position!r}")
    found = []

    def replace(layer):
        if layer.name != layer_name:
            return None
        if not isinstance(layer, keras.layers.Embedding):
            raise TypeError(f"layer {layer_name!r} is a {type(layer).__name__}, not a keras.layers.Embedding")
        if not layer.built:
            raise ValueError(f"layer {layer_name!r} is not built: call the model once first")
        table = layer.get_weights()[0]
        original = table.shape[0] - reserved_positions
        if not 0 <= reserved_positions < table.shape[0]:
            raise ValueError(f"reserved_positions={reserved_positions} must be in [0, {table.shape[0]})")
        if max_position <= original:
            raise ValueError(f"max_position={max_position} must be larger than the original {original} positions")
        multiples = max(1, max_position // original)
        new_table = np.concatenate([table[:reserved_positions], np.tile(table[reserved_positions:], (multiples, 1))])
        config = layer.get_config()
        config["input_dim"] = new_table.shape[0]
        new = type(layer).from_config(config)
        new.build((None,))
        new.set_weights([new_table])
        found.append(new_table.shape[0] - reserved_positions)
        return new

    clone, _ = _clone(model, replace, "extend its position embedding")
    if not found:
        raise ValueError(f"model has no layer named {layer_name!r}")
    clone.max_position_embeddings = int(found[0])
    return clone


def replace_self_attention_layer_with_sparse_self_attention_layer(
    layer: keras.layers.MultiHeadAttention, sparsity_config: SparsityConfig, max_position: int | None = None
) -> SparseMultiHeadAttention:
    """A ``SparseMultiHeadAttention`` with the config and (if built) a copy of the weights of ``layer``."""
    if not isinstance(layer, keras.layers.MultiHeadAttention):
        raise TypeError(f"layer must be a keras.layers.MultiHeadAttention, got {type(layer).__name__}")
    return SparseMultiHeadAttention.from_multi_head_attention(layer, sparsity_config, max_seq_length=max_position)


def replace_model_self_attention_with_sparse_self_attention(
    model: keras.Model, max_position: int, sparsity_config: SparsityConfig
) -> keras.Model:
    """A copy of ``model`` whose every ``keras.layers.MultiHeadAttention`` is sparse (same weights).

    The replacements take the same call (Keras's masks included: implicit ones from ``Embedding(mask_zero=True)``
    or ``Masking`` reach them as in the original), so with a ``DenseSparsityConfig`` the outputs are the
    original's up to rounding; ``max_position`` becomes their ``max_seq_length``.
    """
    if not isinstance(sparsity_config, SparsityConfig):
        raise TypeError(f"sparsity_config must be a SparsityConfig, got {type(sparsity_config).__name__}")

    def replace(layer):
        if isinstance(layer, keras.layers.MultiHeadAttention) and not isinstance(layer, SparseMultiHeadAttention):
            return replace_self_attention_layer_with_sparse_self_attention_layer(layer, sparsity_config, max_position)
        return None

    clone, replaced = _clone(model, replace, "replace its attention")
    if not replaced:
        raise ValueError("model has no keras.layers.MultiHeadAttention to replace")
    return clone
