"""``BlocksparseTransformer``: blocksparse's attention object, on bsattn's ops.

Constructor, attributes and methods follow ``blocksparse.BlocksparseTransformer``; differences:
results keep the input precision (float32 stays float32; blocksparse stored QK^T and the
probabilities in bfloat16), block size 128 is allowed, a fully masked query row gives 0 instead of
NaN, and ``bench`` is accepted but ignored (use the scripts in ``benchmarks/``).
"""

from __future__ import annotations

import warnings
from typing import Callable

import numpy as np
import tensorflow as tf

from bsattn import _checks as checks
from bsattn import blocksparse_ops, reference
from bsattn.tables import BlockTables, build_tables, tables_for_callback

MaskCallback = Callable[[tuple, int, int, int, int], np.ndarray]


class BlocksparseTransformer:
    """Block-sparse attention over a block layout.

    Args:
      layout: ``[nQb, nKb]`` (shared by all heads; ``heads`` required) or ``[L, nQb, nKb]`` (one
        layout per head, or ``L == 1``); nonzero = active block. Every head needs the same number
        of active blocks.
      block_size: 8, 16, 32, 64 or 128.
      heads: number of attention heads.
      mask_callback: ``cb(blk_shape, head_idx, qry_idx, key_idx, blk_idx) -> bool [bs, bs]``, the
        in-block keep mask of each active block (row = query, column = key); called once per
        (layout head, block) with block coordinates ``(qry_idx, key_idx)`` and row-major block id.
      name: stored only.
    """

    def __init__(
        self,
        layout: np.ndarray,
        block_size: int = 64,
        heads: int | None = None,
        mask_callback: MaskCallback | None = None,
        name: str | None = None,
        *,
        _tables: BlockTables | None = None,
    ):
        layout = np.asarray(layout)
        if layout.dtype.kind not in "biuf":
            raise TypeError(f"layout must be a numeric array, got dtype {layout.dtype}")
        if heads is not None:
            heads = checks.positive_int("heads", heads)
        if mask_callback is not None and not callable(mask_callback):
            raise TypeError(f"mask_callback must be callable or None, got {type(mask_callback).__name__}")
        if layout.ndim == 2:
            if heads is None:
                raise ValueError("heads must be explicitly specified when using shared layouts per head")
            layout = layout[None]
        elif layout.ndim == 3:
            heads = layout.shape[0] if heads is None else heads
        else:
            raise ValueError(f"layout must be [q_blocks, k_blocks] or [heads, q_blocks, k_blocks], got shape {layout.shape}")
        if layout.shape[0] not in (1, heads):
            raise ValueError(f"layout has {layout.shape[0]} heads; expected 1 or heads = {heads}")
        layout = (layout != 0).astype(np.int32)
        if _tables is not None:
            self.tables = _tables
        elif mask_callback is None:
            self.tables = build_tables(layout, block_size)
        else:
            self.tables = tables_for_callback(layout, block_size, mask_callback)
        # Unmasked tables of the same layout, for softmax().
        self._plain_tables = build_tables(layout, block_size) if self.tables.has_mask else self.tables
        self.layout = layout
        self.mask_callback = mask_callback
        self.name = name
        self.heads = heads
        self.softmax_dtype = None

    # blocksparse's attributes, derived from the tables.
    blk_size = property(lambda self: self.tables.block_size)
    lut_heads = property(lambda self: self.tables.lut_heads)
    ctx_blks_q = property(lambda self: self.tables.ctx_blks_q)
    ctx_blks_k = property(lambda self: self.tables.ctx_blks_k)
    blk_shape = property(lambda self: (self.tables.block_size, self.tables.block_size))
    blocks = property(lambda self: self.tables.blocks)
    nn_max = property(lambda self: self.tables.nn_max)
    tn_max = property(lambda self: self.tables.tn_max)
    nt_lut = property(lambda self: self.tables.nt_lut)
    nn_lut = property(lambda self: self.tables.nn_lut)
    tn_lut = property(lambda self: self.tables.tn_lut)
    softmax_mask_np = property(lambda self: self.tables.softmax_mask_np if self.tables.has_mask else None)

    @property
    def softmax_mask(self) -> np.ndarray | None:
        """The packed mask in blocksparse's kernel layout ``[L, bs, blocks]`` (bs <= 64)."""
        if self.softmax_mask_np is None:
            return None
        return np.ascontiguousarray(self.softmax_mask_np.transpose(0, 2, 1))

    @property
    def nt_list(self) -> list[np.ndarray]:
        """Per layout head, the active ``(Qb, Kb)`` pairs in block-id order."""
        return [lut for lut in self.tables.nt_lut]

    @property
    def nn_list(self) -> list[list[np.ndarray]]:
        """Per layout head and query-block row, the ``(block id, Kb)`` pairs of that row."""
        return _split_rows(self.tables.nn_lut, self.tables.ctx_blks_q)

    @property
    def tn_list(self) -> list[list[np.ndarray]]:
        """Per layout head and key-block column, the ``(block id, Qb)`` pairs of that column."""
        return _split_rows(self.tables.tn_lut, self.tables.ctx_blks_k)

    def block_coord(self, block: int, head: int = 0) -> tuple[int, int]:
        """``(Qb, Kb)`` of a block id."""
        qb, kb = self.tables.nt_lut[head, block]
        return int(qb), int(kb)

    # Ops. ``name`` is used as the op's name scope; ``bench`` is accepted for compatibility.
    def nt_op(self, a, b, name=None, bench=0) -> tf.Tensor:
        """``[B, Tq, H*D] x [B, Tk, H*D] -> [B, H, blocks, bs, bs]``: blocks of ``a @ b^T``."""
        _warn_bench(bench)
        with tf.name_scope(name or "bst_nt"):
            return blocksparse_ops.nt(a, b, self.tables, self.heads)

    def nn_op(self, a, b, name=None, bench=0) -> tf.Tensor:
        """``[B, H, blocks, bs, bs] x [B, Tk, H*D] -> [B, Tq, H*D]``: ``a @ b``."""
        _warn_bench(bench)
        with tf.name_scope(name or "bst_nn"):
            return blocksparse_ops.nn(a, b, self.tables)

    def tn_op(self, a, b, name=None, bench=0) -> tf.Tensor:
        """``[B, H, blocks, bs, bs] x [B, Tq, H*D] -> [B, Tk, H*D]``: ``a^T @ b``."""
        _warn_bench(bench)
        with tf.name_scope(name or "bst_tn"):
            return blocksparse_ops.tn(a, b, self.tables)

    def query_key_op(self, q, k, name=None, bench=0) -> tf.Tensor:
        """``nt_op(q, k)``; records the softmax dtype (the dtype of ``q``)."""
        self.softmax_dtype = tf.convert_to_tensor(q).dtype
        return self.nt_op(q, k, name=name or "bst_query_key", bench=bench)

    def weight_value_op(self, w, v, name=None, bench=0) -> tf.Tensor:
        """``nn_op(w, v)``: ``[B, H, blocks, bs, bs] x [B, Tk, H*D] -> [B, Tq, H*D]``."""
        return self.nn_op(w, v, name=name or "bst_weight_value", bench=bench)

    def masked_softmax(self, x, scale=1.0, autoregress_at_key=None, dtype=None) -> tf.Tensor:
        """Softmax of ``scale * x`` over each query row, honouring the callback's masks.

        Without a ``mask_callback`` this is ``softmax``. ``autoregress_at_key`` (needs a callback)
        also drops key ``j`` of query ``i`` unless ``j < autoregress_at_key`` or ``j <= i``.
        The result has dtype ``dtype`` if given, else the dtype of ``x``.
        """
        if autoregress_at_key is not None and self.mask_callback is None and not self.tables.has_mask:
            raise ValueError("autoregress_at_key requires a mask_callback")
        with tf.name_scope("bst_masked_softmax"):
            y = blocksparse_ops.masked_softmax(x, self.tables, scale, autoregress_at_key)
            return y if dtype is None else tf.cast(y, dtype)

    def softmax(self, x, scale=1.0, dtype=None) -> tf.Tensor:
        """Softmax of ``scale * x`` over each query row, ignoring in-block masks."""
        with tf.name_scope("bst_softmax"):
            y = blocksparse_ops.masked_softmax(x, self._plain_tables, scale)
            return y if dtype is None else tf.cast(y, dtype)

    # blocksparse's NumPy test helpers, as float64 references.
    def nt_test(self, a, b) -> np.ndarray:
        return reference.nt(a, b, self.tables, self.heads)

    def nn_test(self, a, b) -> np.ndarray:
        return reference.nn(a, b, self.tables)

    def tn_test(self, a, b) -> np.ndarray:
        return reference.tn(a, b, self.tables)

    def masked_softmax_test(self, x, scale=1.0, autoregress_at_key=None) -> np.ndarray:
        return reference.masked_softmax(x, self.tables, scale, autoregress_at_key)

    def masked_softmax_grad_test(self, dy, y, scale=1.0) -> np.ndarray:
        return reference.masked_softmax_grad(dy, y, self.tables, scale)


def _split_rows(lut: np.ndarray, n_rows: int) -> list[list[np.ndarray]]:
    """Splits ``[L, n_rows + blocks, 2]`` header+payload tables into per-row payload lists."""
    return [[head[off : off + cnt] for off, cnt in head[:n_rows]] for head in lut]


def _warn_bench(bench: int) -> None:
    if bench:
        warnings.warn("bench is ignored by bsattn; time ops with the scripts in benchmarks/", stacklevel=3)
