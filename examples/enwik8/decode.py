"""Incremental decoding of the Sparse Transformer with a key/value cache (``bsattn.blocksparse_decode_impl``).

``KVCache(model, batch)`` holds, per block and per head group of its attention, the keys and values of every
position of the window (``tf.Variable [batch, T, heads*d_head]`` in the compute dtype, written in place). ``decode(
model, tokens, position, cache)`` runs the new bytes ``tokens [B, Tq]`` at the positions ``[position, position +
Tq)``: each block writes their keys/values into the cache and attends the cached ones through its pattern (the
fused op's decode mode; under XLA its TF twin). ``position = 0`` with a full window (``Tq = T``) is the prefill:
the normal fused op over the window. The logits equal those of ``model(window)`` at the same rows.

``--block=colt5`` has no cache (its routing looks at whole windows).
"""

from __future__ import annotations

import tensorflow as tf

from bsattn import blocksparse_decode_impl
from examples.enwik8.model import Block, SparseTransformer, gelu


def supports_cache(model: SparseTransformer) -> bool:
    """Whether ``model`` can decode with a cache (every block but CoLT5's)."""
    return all(isinstance(block, Block) for block in model.blocks)


class KVCache(tf.Module):
    """The keys/values of one window: ``layers[i][g] = (k, v)``, ``tf.Variable [batch, T, width_g]`` for head group
    ``g`` of block ``i`` (zeros at first; rows past the written ones are never read)."""

    def __init__(self, model: SparseTransformer, batch: int):
        super().__init__(name="kv_cache")
        if not supports_cache(model):
            raise ValueError("the model has no key/value cache: --block=colt5 routes over whole windows")
        cfg = model.cfg
        self.layers = [
            [tuple(tf.Variable(tf.zeros([batch, cfg.n_timesteps, heads * cfg.d_head], model.compute_dtype),
                               trainable=False, name=f"{kind}_{i}_{g}") for kind in ("k", "v"))
             for g, (_, heads) in enumerate(block.modes)]
            for i, block in enumerate(model.blocks)
        ]  # fmt: skip


def _block_decode(block: Block, h: tf.Tensor, position, caches) -> tf.Tensor:
    """One block on the new rows ``h [B, Tq, d]``: writes their keys/values, attends the cache → ``[B, Tq, d]``."""
    cfg = block.cfg
    tq = h.shape[1]
    q, k, v = tf.split(block.qkv(block.norm_a(h)), 3, axis=-1)
    outputs, start = [], 0
    for (mode, heads), (k_cache, v_cache) in zip(block.modes, caches, strict=True):
        width = heads * cfg.d_head
        group = slice(start, start + width)
        k_cache[:, position : position + tq].assign(k[..., group])
        v_cache[:, position : position + tq].assign(v[..., group])
        mode = "all" if cfg.attention == "memory_efficient" else mode  # its model is the causal one
        kwargs = {"blocksize": cfg.blocksize}
        if mode != "all":
            kwargs["local_attn_ctx"] = cfg.local_attn_ctx
        if mode == "fixed":
            kwargs.update(num_verts=cfg.num_verts, vertsize=cfg.vertsize)
        outputs.append(blocksparse_decode_impl(q[..., group], k_cache.read_value(), v_cache.read_value(), position,
                                               heads, mode, **kwargs))  # fmt: skip
        start += width
    a = outputs[0] if len(outputs) == 1 else tf.concat(outputs, axis=-1)
    h = h + block.proj(a)
    return h + block.out(gelu(block.fc(block.norm_m(h))))


def decode(model: SparseTransformer, tokens: tf.Tensor, position, cache: KVCache) -> tf.Tensor:
    """Logits float32 ``[B, Tq, 256]`` of the bytes ``tokens [B, Tq]`` at positions ``[position, position + Tq)``
    (an int32 scalar tensor, or the int 0 for the prefill of a full window), given the cache of the earlier
    positions; the cache gains theirs. No dropout."""
    t = position + tf.range(tokens.shape[1])  # only these rows of model.positions(): O(Tq) per step
    if model.cfg.pos_embd == "factorized":
        pos = tf.gather(model.pos_row, t // model.pos_width) + tf.gather(model.pos_col, t % model.pos_width)
    else:
        pos = tf.gather(model.pos, t)
    h = tf.cast(tf.gather(model.embed, tokens) + pos, model.compute_dtype)
    for block, caches in zip(model.blocks, cache.layers, strict=True):
        h = _block_decode(block, h, position, caches)
    return tf.cast(model.head(model.norm_f(h)), tf.float32)
