"""Shared helpers of the op tests: seeded inputs, random layouts and callbacks, the dense-TF baselines
and the error criterion.

Error criterion (FlashAttention's habit, see STYLE.md): every result is compared with a float64 NumPy
reference (``bsattn.reference``) computed from the exact values of the inputs in their dtype.

- float64: ``max|ours - ref| <= 1e-10 * max(1, max|ref|)``;
- float32: ``max|ours - ref| <= 1e-5 * max|ref|``;
- float16 / bfloat16: ``max|ours - ref| <= 2 * max|dense_tf - ref| + floor`` (3x for gradients), where
  ``dense_tf`` is the same computation done with TensorFlow's dense ops in that dtype (the helpers
  ``dense_*`` below) and ``floor`` is a quarter of an ulp of ``max|ref|``.
"""

from __future__ import annotations

import zlib

import numpy as np
import pytest
import tensorflow as tf

from bsattn.tables import BlockTables

REDUCED_DTYPES = (tf.float16, tf.bfloat16)
EPS = {tf.float16: 2.0**-10, tf.bfloat16: 2.0**-7, tf.float32: 2.0**-23, tf.float64: 2.0**-52}


# ---- randomness --------------------------------------------------------------------------------------------


@pytest.fixture
def rng(request) -> np.random.Generator:
    """A generator seeded from the test's id: reproducible, different per test and parameter set."""
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


def uniform(rng: np.random.Generator, shape, dtype=tf.float32) -> tf.Tensor:
    """Values in ``±[0.05, 1)`` (never 0, so a skipped write or a dropped term cannot go unnoticed)."""
    x = rng.uniform(0.05, 1.0, shape) * rng.choice([-1.0, 1.0], shape)
    return tf.constant(x, dtype=dtype)


def normal(rng: np.random.Generator, shape, dtype=tf.float32) -> tf.Tensor:
    return tf.constant(rng.standard_normal(shape), dtype=dtype)


def f64(x) -> np.ndarray:
    """The exact values of a tensor (any float dtype) as float64."""
    return tf.cast(x, tf.float64).numpy() if tf.is_tensor(x) else np.asarray(x, dtype=np.float64)


def random_layout(
    rng: np.random.Generator,
    n_q_blocks: int,
    n_k_blocks: int,
    heads: int,
    density: float = 0.5,
    equal_counts: bool = True,
    empty_rows: tuple[int, ...] = (),
) -> np.ndarray:
    """A random block layout → int32 ``[heads, nQb, nKb]`` with at least one block per head.

    With ``equal_counts`` every head has the same number of active blocks (what the ops require);
    the query-block rows ``empty_rows`` are left empty in every head.
    """
    allowed = np.ones((n_q_blocks, n_k_blocks), dtype=bool)
    allowed[list(empty_rows)] = False
    cells = np.flatnonzero(allowed)
    count = int(np.clip(round(density * cells.size), 1, cells.size))
    layout = np.zeros((heads, n_q_blocks * n_k_blocks), dtype=np.int32)
    for h in range(heads):
        n = count if equal_counts else int(rng.integers(1, cells.size + 1))
        layout[h, rng.choice(cells, size=n, replace=False)] = 1
    return layout.reshape(heads, n_q_blocks, n_k_blocks)


class RandomCallback:
    """A blocksparse-style ``mask_callback``: a random keep mask per (head, Qb, Kb), deterministic.

    ``masked_queries``: absolute query tokens whose whole row is masked in every block (and head).
    """

    def __init__(self, seed: int, keep: float = 0.7, masked_queries: tuple[int, ...] = ()):
        self.seed, self.keep, self.masked_queries = seed, keep, tuple(masked_queries)
        self.calls: list[tuple] = []

    def __call__(self, blk_shape, head_idx, qry_idx, key_idx, blk_idx):
        self.calls.append((tuple(blk_shape), head_idx, qry_idx, key_idx, blk_idx))
        gen = np.random.default_rng([self.seed, head_idx, qry_idx, key_idx])
        mask = gen.random(blk_shape) < self.keep
        for t in self.masked_queries:
            if t // blk_shape[0] == qry_idx:
                mask[t % blk_shape[0]] = False
        return mask


def causal_callback(blk_shape, head_idx, qry_idx, key_idx, blk_idx):
    """blocksparse's test callback: the strict upper triangle of diagonal blocks is masked."""
    mask = np.ones(blk_shape, dtype=bool)
    if qry_idx == key_idx:
        mask = np.tril(mask)
    return mask


def maybe_function(fn, mode: str):
    """``fn`` itself (``mode == 'eager'``) or ``tf.function(fn)`` (``'function'``)."""
    assert mode in ("eager", "function")
    return tf.function(fn) if mode == "function" else fn


# ---- the error criterion -----------------------------------------------------------------------------------


def assert_close_rel(ours, ref64, dense_tf=None, dtype=None, grad: bool = False, name: str = "") -> None:
    """``ours`` (tensor or array) against the float64 reference ``ref64``, by the criterion above.

    ``dtype`` defaults to the dtype of ``ours``; ``dense_tf`` (the dense TensorFlow result in that
    dtype) is required for float16 and bfloat16.
    """
    dtype = tf.as_dtype(dtype or (ours.dtype if tf.is_tensor(ours) else np.asarray(ours).dtype))
    ours, ref64 = f64(ours), np.asarray(ref64, dtype=np.float64)
    assert ours.shape == ref64.shape, f"{name}: shape {ours.shape} != reference {ref64.shape}"
    assert np.isfinite(ours).all(), f"{name}: non-finite values"
    err = float(np.max(np.abs(ours - ref64), initial=0.0))
    scale = float(np.max(np.abs(ref64), initial=0.0))
    if dtype == tf.float64:
        bound = 1e-10 * max(1.0, scale)
    elif dtype == tf.float32:
        bound = 1e-5 * scale
    elif dtype in REDUCED_DTYPES:
        assert dense_tf is not None, f"{name}: {dtype.name} needs the dense TF baseline"
        base = float(np.max(np.abs(f64(dense_tf) - ref64), initial=0.0))
        bound = (3.0 if grad else 2.0) * base + 0.25 * EPS[dtype] * scale
    else:
        raise TypeError(f"unexpected dtype {dtype}")
    assert err <= bound, f"{name} ({dtype.name}): max error {err:.3e} > bound {bound:.3e} (max|ref| {scale:.3e})"


# ---- dense TensorFlow baselines ----------------------------------------------------------------------------


def _heads_tf(x: tf.Tensor, heads: int) -> tf.Tensor:
    """``[B, T, H*D] -> [B, H, T, D]``."""
    b, t, c = x.shape
    return tf.transpose(tf.reshape(x, [b, t, heads, c // heads]), [0, 2, 1, 3])


def _unheads_tf(x: tf.Tensor) -> tf.Tensor:
    """``[B, H, T, D] -> [B, T, H*D]``."""
    b, h, t, d = x.shape
    return tf.reshape(tf.transpose(x, [0, 2, 1, 3]), [b, t, h * d])


def _block_indices(tables: BlockTables, heads: int) -> np.ndarray:
    """int32 ``[H, blocks, 3]``: ``(h, Qb, Kb)`` of every block of every head."""
    lut = np.broadcast_to(tables.nt_lut, (heads,) + tables.nt_lut.shape[1:])
    h = np.broadcast_to(np.arange(heads)[:, None, None], lut.shape[:2] + (1,))
    return np.concatenate([h, lut], axis=-1).astype(np.int32)


def gather_blocks_tf(dense: tf.Tensor, tables: BlockTables) -> tf.Tensor:
    """The active blocks of ``dense [B, H, Tq, Tk]`` → ``[B, H, blocks, bs, bs]`` (exact)."""
    b, h = dense.shape[:2]
    bs = tables.block_size
    grid = tf.reshape(dense, [b, h, tables.ctx_blks_q, bs, tables.ctx_blks_k, bs])
    grid = tf.transpose(grid, [1, 2, 4, 0, 3, 5])  # [H, nQb, nKb, B, bs, bs]
    return tf.transpose(tf.gather_nd(grid, _block_indices(tables, h)), [2, 0, 1, 3, 4])


def scatter_blocks_tf(w: tf.Tensor, tables: BlockTables) -> tf.Tensor:
    """``w [B, H, blocks, bs, bs]`` → ``[B, H, Tq, Tk]``, zeros outside the active blocks (exact)."""
    b, h = w.shape[:2]
    bs = tables.block_size
    shape = [h, tables.ctx_blks_q, tables.ctx_blks_k, b, bs, bs]
    grid = tf.scatter_nd(_block_indices(tables, h), tf.transpose(w, [1, 2, 0, 3, 4]), shape)
    grid = tf.transpose(grid, [3, 0, 1, 4, 2, 5])  # [B, H, nQb, bs, nKb, bs]
    return tf.reshape(grid, [b, h, tables.ctx_blks_q * bs, tables.ctx_blks_k * bs])


def dense_nt(a: tf.Tensor, b: tf.Tensor, tables: BlockTables, heads: int) -> tf.Tensor:
    """nt with TF's dense matmul, in the inputs' dtype."""
    return gather_blocks_tf(tf.matmul(_heads_tf(a, heads), _heads_tf(b, heads), transpose_b=True), tables)


def dense_nn(w: tf.Tensor, b: tf.Tensor, tables: BlockTables) -> tf.Tensor:
    """nn with TF's dense matmul, in the inputs' dtype."""
    return _unheads_tf(tf.matmul(scatter_blocks_tf(w, tables), _heads_tf(b, w.shape[1])))


def dense_tn(w: tf.Tensor, b: tf.Tensor, tables: BlockTables) -> tf.Tensor:
    """tn with TF's dense matmul, in the inputs' dtype."""
    return _unheads_tf(tf.matmul(scatter_blocks_tf(w, tables), _heads_tf(b, w.shape[1]), transpose_a=True))


def keep_mask(tables: BlockTables, heads: int, autoregress_at_key: int | None = None) -> np.ndarray:
    """The kept entries of the block-sparse tensor → bool ``[H, blocks, bs, bs]``, computed from the packed
    tables with plain loops (independent of ``reference``)."""
    bs = tables.block_size
    words = tables.mask_words.view(np.uint32)
    keep = np.zeros((tables.lut_heads, tables.blocks, bs, bs), dtype=bool)
    for j in range(bs):
        keep[..., j] = (words[..., j // 32] >> np.uint32(j % 32)) & np.uint32(1)
    keep = np.broadcast_to(keep, (heads,) + keep.shape[1:]).copy()
    if autoregress_at_key is not None:
        lut = np.broadcast_to(tables.nt_lut, (heads,) + tables.nt_lut.shape[1:])
        i = lut[..., 0, None, None] * bs + np.arange(bs)[:, None]
        j = lut[..., 1, None, None] * bs + np.arange(bs)[None, :]
        keep &= (j < autoregress_at_key) | (j <= i)
    return keep


def dense_masked_softmax(x: tf.Tensor, tables: BlockTables, scale: float, autoregress_at_key=None) -> tf.Tensor:
    """The masked softmax with TF's dense ``tf.nn.softmax`` in the dtype of ``x``: masked entries (and the
    entries outside the blocks) are set to the dtype's lowest value, and a fully masked row is 0."""
    heads = x.shape[1]
    keep = keep_mask(tables, heads, autoregress_at_key)
    keep_dense = scatter_blocks_tf(tf.constant(np.broadcast_to(keep, x.shape), tf.float32), tables) > 0.5
    s = scatter_blocks_tf(x, tables) * tf.constant(scale, x.dtype)
    s = tf.where(keep_dense, s, tf.constant(x.dtype.min, x.dtype))
    y = tf.where(keep_dense, tf.nn.softmax(s), tf.zeros_like(s))
    return gather_blocks_tf(y, tables)


def dense_grads(fn, inputs, upstream):
    """Gradients of ``fn(*inputs)`` for ``upstream``, by tf.GradientTape (in the inputs' dtype)."""
    with tf.GradientTape() as tape:
        tape.watch(inputs)
        out = fn(*inputs)
    return tape.gradient(out, inputs, output_gradients=upstream)


def dense_attention_tf(q: tf.Tensor, k: tf.Tensor, v: tf.Tensor, heads: int, scale: float, mask=None) -> tf.Tensor:
    """Dense attention with TF's ops in the inputs' dtype: ``q [B, Tq, H*D]``, ``k, v [B, Tk, H*D]``, bool
    ``mask`` broadcastable to ``[B, H, Tq, Tk]`` (None = attend all) → ``[B, Tq, H*D]``."""
    s = tf.matmul(_heads_tf(q, heads), _heads_tf(k, heads), transpose_b=True) * tf.constant(scale, q.dtype)
    if mask is not None:
        s = tf.where(tf.constant(np.asarray(mask, dtype=bool)), s, tf.constant(q.dtype.min, q.dtype))
    return _unheads_tf(tf.matmul(tf.nn.softmax(s), _heads_tf(v, heads)))
