"""The fused engine: the memory-efficient functions on bsattn's fused op, for any lengths.

The op takes ``[B, T, H*D]`` activations, or ``[B, H, T, D]`` ones in place (its ``head_major``: the functions'
layout, no transposes), whose lengths are multiples of its block size; here queries and keys are zero-padded at the end to the block size (``fused_geometry``), the padded keys are masked (the op's
key-padding mask) and the padded queries sliced off, so callers never see a block size. The pattern is
``Dense`` or ``BottomRightCausal`` (bottom-right aligned ``Causal``); a ``[b, 1, 1, j]`` keep mask becomes the
op's key-padding mask; any other keep mask and ``attn_bias`` become its ``bias [B|1, H|1, Tq, Tk]`` (-inf where
not kept), with the gradient the op reduces over the broadcast batch / heads.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow as tf

from bsattn.fused_attention import fused_attention
from bsattn.fused_tables import fused_tables_for_pattern
from bsattn.memory_efficient.inputs import is_key_mask
from bsattn.patterns import Causal, Dense

# The block size for long sequences (the CPU kernels' fastest, see the README's CPU benchmark).
_BLOCK = 64
_SMALL_BLOCKS = (8, 16, 32)


@dataclasses.dataclass(frozen=True)
class BottomRightCausal(Causal):
    """``Causal`` aligned at the end: query ``q`` attends key ``k`` iff ``k <= q + offset`` (``offset = j - i``
    of the unpadded lengths; 0 is ``Causal``)."""

    offset: int = 0

    def allowed(self, head, q, k, n_q, n_k):
        return k <= q + self.offset

    def _block_classes(self, head, qb, kb, block_size, n_q, n_k):
        i0, j0 = qb * block_size, kb * block_size  # the block's first query and key
        i1, j1 = i0 + block_size - 1, j0 + block_size - 1
        return j0 <= i1 + self.offset, j1 <= i0 + self.offset


def fused_geometry(n_q: int, n_k: int) -> tuple[int, int, int]:
    """``(block_size, Tq, Tk)``: the op's block size for these lengths and the padded lengths."""
    longest = max(n_q, n_k)
    bs = next((b for b in _SMALL_BLOCKS if b >= longest), _BLOCK)
    return bs, -(-n_q // bs) * bs, -(-n_k // bs) * bs


def fused_engine(
    q: tf.Tensor,
    k: tf.Tensor,
    v: tf.Tensor,
    heads: int,
    keep: tf.Tensor | None,
    bias: tf.Tensor | None,
    causal: bool,
    scale: float,
    dropout_rate: float = 0.0,
    seed: int | tf.Tensor | None = None,
    head_major: bool = False,
) -> tf.Tensor:
    """``q [B, i, H*D], k, v [B, j, H*D] → [B, i, H*D]`` on the fused op (see the module docstring); with
    ``head_major`` ``q [B, H, i, D], k, v [B, H, j, D] → [B, H, i, D]``.

    ``keep``: bool ``[b|1, h|1, i|1, j]`` (True = attend) and ``bias`` ``[b|1, h|1, i|1, j|1]`` in the dtype of
    ``q``, as ``check_masks`` returns them; ``causal``: bottom-right aligned.
    """
    time_axis = 2 if head_major else 1
    n_q, n_k = q.shape[time_axis], k.shape[time_axis]
    if q.dtype == tf.float64:  # the op's scale is a float32 attr: float64 gets the exact scale applied to q
        q, scale = q * tf.constant(scale, tf.float64), 1.0
    bs, tq, tk = fused_geometry(n_q, n_k)
    pattern = BottomRightCausal(n_k - n_q) if causal else Dense()
    tables = fused_tables_for_pattern(pattern, tq, tk, bs)
    batch = tf.shape(q)[0]

    def pad_time(x, length):
        if length == x.shape[time_axis]:
            return x
        paddings = [[0, 0]] * x.shape.rank
        paddings[time_axis] = [0, length - x.shape[time_axis]]
        return tf.pad(x, paddings)

    key_mask, full = None, keep
    if is_key_mask(keep):  # the op's own input
        key_mask, full = tf.broadcast_to(keep[:, 0, 0], [batch, n_k]), None
        # A masked key's k and v never matter; zeroed, a NaN there cannot leak through 0·NaN in P·V.
        key_rows = key_mask[:, None, :, None] if head_major else key_mask[..., None]
        k, v = (tf.where(key_rows, x, tf.zeros([], x.dtype)) for x in (k, v))
    elif tk != n_k:
        key_mask = tf.ones([batch, n_k], tf.bool)
    if key_mask is not None:
        key_mask = tf.pad(key_mask, [[0, 0], [0, tk - n_k]], constant_values=False)

    op_bias = None
    if full is not None or bias is not None:
        parts = [x for x in (full, bias) if x is not None]
        op_bias = tf.zeros([], q.dtype) if bias is None else bias
        if full is not None:  # where, not an added -inf: a NaN of the bias at a masked entry must not leak
            op_bias = tf.where(full, op_bias, tf.constant(-np.inf, q.dtype))
        per_batch = any(x.shape[0] != 1 for x in parts)
        per_head = any(x.shape[1] != 1 for x in parts)
        shape = [batch if per_batch else 1, heads if per_head else 1, n_q, n_k]
        op_bias = tf.pad(tf.broadcast_to(op_bias, shape), [[0, 0], [0, 0], [0, tq - n_q], [0, tk - n_k]])

    out = fused_attention(
        pad_time(q, tq), pad_time(k, tk), pad_time(v, tk), tables, heads, scale=scale,
        key_padding_mask=key_mask, bias=op_bias, dropout_rate=dropout_rate, seed=seed, head_major=head_major,
    )  # fmt: skip
    if tq == n_q:
        return out
    return out[:, :, :n_q] if head_major else out[:, :n_q]
