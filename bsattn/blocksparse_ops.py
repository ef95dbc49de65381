"""TensorFlow wrappers of the unfused block-sparse ops, with their gradients.

Layouts (blocksparse's):
  dense        ``[B, T, H*D]``, head ``h`` owns channels ``[h*D, (h+1)*D)``
  block-sparse ``[B, H, nnz, bs, bs]``, block ``b`` = ``tables.nt_lut[lh, b] = (Qb, Kb)``

Every op computes in float32 and returns the dtype of its inputs (float32, float16 or bfloat16). ``nn`` and
``tn`` also take float16/bfloat16 weights with float32 activations (blocksparse's mixed precision) and return
float32 then.
The tables (``bsattn.tables.BlockTables``) enter the ops as int32 tensors, built once per tables
object.
"""

from __future__ import annotations

import numbers
from typing import NamedTuple

import tensorflow as tf

from bsattn import _checks as checks
from bsattn._loader import load_ops
from bsattn._table_constants import host_scalar, int32_table, table_constants
from bsattn.tables import BlockTables


class TableTensors(NamedTuple):
    """The int32 tensors of one ``BlockTables``."""

    nt_lut: tf.Tensor  # [L, nnz, 2]
    nn_lut: tf.Tensor  # [L, nQb + nnz, 2]
    tn_lut: tf.Tensor  # [L, nKb + nnz, 2]
    mask: tf.Tensor  # [L, nnz, bs, ceil(bs/32)]


def table_tensors(tables: BlockTables) -> TableTensors:
    """The int32 tensors of ``tables`` (cached while eager); entries that are not int32 values raise."""
    if not isinstance(tables, BlockTables):
        raise TypeError(f"tables must be a BlockTables, got {type(tables).__name__}")
    names = ("nt_lut", "nn_lut", "tn_lut", "mask_words")
    return table_constants(tables, lambda: TableTensors(*(int32_table(getattr(tables, n), n) for n in names)))


def nt(a: tf.Tensor, b: tf.Tensor, tables: BlockTables, heads: int) -> tf.Tensor:
    """Block-sparse ``a @ b^T`` (SDD).

    Args:
      a: ``[B, nQb*bs, H*D]``.
      b: ``[B, nKb*bs, H*D]``, same dtype as ``a``.
    Returns:
      ``[B, H, nnz, bs, bs]``: ``c[n, h, blk] = a[n, Qb rows, head h] @ b[n, Kb rows, head h]^T``.
    """
    checks.instance("tables", tables, BlockTables)
    a = checks.float_tensor("a", a)
    b = checks.float_tensor("b", b, a.dtype)
    _check_same_dtype(a=a, b=b)
    checks.positive_int("heads", heads)
    _check_dense(a, "a", tables.ctx_blks_q, tables, heads)
    _check_dense(b, "b", tables.ctx_blks_k, tables, heads)
    return _nt(a, b, tables, heads)


def nn(w: tf.Tensor, b: tf.Tensor, tables: BlockTables) -> tf.Tensor:
    """Block-sparse ``w @ b`` (DSD).

    Args:
      w: ``[B, H, nnz, bs, bs]``: ``b``'s dtype, or float16/bfloat16 with a float32 ``b``.
      b: ``[B, nKb*bs, H*D]``.
    Returns:
      ``[B, nQb*bs, H*D]`` in ``b``'s dtype; a query-block row with no blocks is 0.
    """
    checks.instance("tables", tables, BlockTables)
    w = checks.float_tensor("w", w)
    b = checks.float_tensor("b", b, w.dtype)
    _check_weight_dtype(w, b)
    _check_blocks(w, "w", tables)
    _check_dense(b, "b", tables.ctx_blks_k, tables)
    return _nn(w, b, tables)


def tn(w: tf.Tensor, b: tf.Tensor, tables: BlockTables) -> tf.Tensor:
    """Block-sparse ``w^T @ b`` (DSD transposed).

    Args:
      w: ``[B, H, nnz, bs, bs]``: ``b``'s dtype, or float16/bfloat16 with a float32 ``b``.
      b: ``[B, nQb*bs, H*D]``.
    Returns:
      ``[B, nKb*bs, H*D]`` in ``b``'s dtype; a key-block column with no blocks is 0.
    """
    checks.instance("tables", tables, BlockTables)
    w = checks.float_tensor("w", w)
    b = checks.float_tensor("b", b, w.dtype)
    _check_weight_dtype(w, b)
    _check_blocks(w, "w", tables)
    _check_dense(b, "b", tables.ctx_blks_q, tables)
    return _tn(w, b, tables)


def masked_softmax(
    x: tf.Tensor,
    tables: BlockTables,
    scale: float | tf.Tensor = 1.0,
    autoregress_at_key: int | tf.Tensor | None = None,
) -> tf.Tensor:
    """Softmax of ``scale * x`` over every kept entry of each query row.

    A query row spans all blocks of its query-block row. Entries dropped by the tables' in-block
    masks are 0; a row with no kept entry is all 0. With ``autoregress_at_key = K``, key ``j`` of
    query ``i`` is kept only if ``j < K`` or ``j <= i`` (absolute token indices).

    Args:
      x: ``[B, H, nnz, bs, bs]``.
    Returns:
      same shape and dtype as ``x``.
    """
    checks.instance("tables", tables, BlockTables)
    x = checks.float_tensor("x", x)
    _check_blocks(x, "x", tables)
    try:
        scale = host_scalar(scale, tf.float32)  # read in host memory by the op
    except (TypeError, ValueError) as e:
        raise TypeError(f"scale must be a real number or a float32 scalar tensor, got {scale!r}") from e
    if autoregress_at_key is None:
        key, autoregressive = host_scalar(0, tf.int32), False
    else:
        key, autoregressive = host_scalar(_checked_key(autoregress_at_key, tables), tf.int32), True
    return _masked_softmax(x, scale, key, tables, autoregressive)


def _check_weight_dtype(w: tf.Tensor, b: tf.Tensor) -> None:
    """``w`` in ``b``'s dtype, or float16/bfloat16 weights with float32 activations."""
    if w.dtype != b.dtype and not (b.dtype == tf.float32 and w.dtype in (tf.float16, tf.bfloat16)):
        raise TypeError(
            f"w must have b's dtype, or be float16/bfloat16 with a float32 b; got w: {w.dtype.name}, b: {b.dtype.name}"
        )


def _check_same_dtype(**tensors: tf.Tensor) -> None:
    dtypes = {name: t.dtype for name, t in tensors.items()}
    if len(set(dtypes.values())) != 1:
        described = ", ".join(f"{name}: {dtype.name}" for name, dtype in dtypes.items())
        raise TypeError(f"inputs must share one dtype, got {described}")


def _check_dense(x: tf.Tensor, name: str, blocks: int, tables: BlockTables, heads: int | None = None) -> None:
    """Static check of a dense activation ``[B, blocks * bs, H*D]`` (the layout's length: never cut)."""
    if x.shape.rank is None:
        return
    if x.shape.rank != 3:
        raise ValueError(f"{name} must be [batch, time, heads*head_dim], got shape {x.shape}")
    length, width = x.shape[1], x.shape[2]
    if length is not None and length != blocks * tables.block_size:
        raise ValueError(
            f"{name} has length {length} but the layout covers {blocks * tables.block_size} tokens "
            f"({blocks} blocks of {tables.block_size})"
        )
    if heads is not None and width is not None and width % heads:
        raise ValueError(f"{name} width {width} is not divisible by heads {heads}")


def _check_blocks(w: tf.Tensor, name: str, tables: BlockTables) -> None:
    """Static check of block-sparse ``w [B, H, blocks, bs, bs]`` against the tables."""
    if w.shape.rank is None:
        return
    expected = [None, None, tables.blocks, tables.block_size, tables.block_size]
    if w.shape.rank != 5 or any(e is not None and d is not None and d != e for d, e in zip(w.shape, expected)):
        raise ValueError(
            f"{name} must be [batch, heads, {tables.blocks}, {tables.block_size}, {tables.block_size}] "
            f"(the tables' blocks), got shape {w.shape}"
        )


def _static_heads(w: tf.Tensor, tables: BlockTables) -> int:
    """The head count of blocks ``w`` as a Python int (the nt op of the gradient needs it)."""
    if w.shape[1] is not None:
        return int(w.shape[1])
    if tables.lut_heads > 1:
        return tables.lut_heads  # per-head tables fix the head count
    raise ValueError(
        "the gradient of nn/tn needs a static head dimension: w has shape "
        f"{w.shape}; give w a known dimension 1 (e.g. tf.ensure_shape)"
    )


def _checked_key(key: int | tf.Tensor, tables: BlockTables) -> tf.Tensor:
    """``autoregress_at_key`` as an int32 scalar in ``[0, nKb*bs)``, checked now or at run time."""
    key_len = tables.ctx_blks_k * tables.block_size
    if not tf.is_tensor(key) and (isinstance(key, bool) or not isinstance(key, numbers.Integral)):
        raise TypeError(f"autoregress_at_key must be an integer, an int scalar tensor or None, got {key!r}")
    if isinstance(key, numbers.Integral):
        key = int(key)
        if not 0 <= key < key_len:
            raise ValueError(f"autoregress_at_key must be in [0, {key_len}), got {key}")
        return tf.constant(key, tf.int32)
    key = tf.cast(key, tf.int32)
    tf.debugging.assert_less(key, key_len, message="autoregress_at_key out of range")
    return key


def _nt(a: tf.Tensor, b: tf.Tensor, tables: BlockTables, heads: int) -> tf.Tensor:
    luts = table_tensors(tables)

    @tf.custom_gradient
    def forward(a, b):
        c = load_ops().bsattn_nt(
            a, b, luts.nt_lut, heads=heads, block_size=tables.block_size,
            q_blocks=tables.ctx_blks_q, k_blocks=tables.ctx_blks_k,
        )  # fmt: skip

        def grad(dc):
            return _nn(dc, b, tables), _tn(dc, a, tables)

        return c, grad

    return forward(a, b)


def _nn(w: tf.Tensor, b: tf.Tensor, tables: BlockTables) -> tf.Tensor:
    luts = table_tensors(tables)

    @tf.custom_gradient
    def forward(w, b):
        c = load_ops().bsattn_nn(w, b, luts.nn_lut, k_blocks=tables.ctx_blks_k)

        def grad(dc):  # dw in w's dtype (computed in b's: dc and b share it)
            return tf.cast(_nt(dc, b, tables, _static_heads(w, tables)), w.dtype), _tn(w, dc, tables)

        return c, grad

    return forward(w, b)


def _tn(w: tf.Tensor, b: tf.Tensor, tables: BlockTables) -> tf.Tensor:
    luts = table_tensors(tables)

    @tf.custom_gradient
    def forward(w, b):
        c = load_ops().bsattn_tn(w, b, luts.tn_lut, q_blocks=tables.ctx_blks_q)

        def grad(dc):
            return tf.cast(_nt(b, dc, tables, _static_heads(w, tables)), w.dtype), _nn(w, dc, tables)

        return c, grad

    return forward(w, b)


def _masked_softmax(x, scale, key, tables: BlockTables, autoregressive: bool) -> tf.Tensor:
    luts = table_tensors(tables)

    @tf.custom_gradient
    def forward(x):
        y = load_ops().bsattn_masked_softmax(
            x, scale, luts.nn_lut, luts.mask, key, autoregressive=autoregressive
        )

        def grad(dy):
            return _masked_softmax_grad(dy, y, scale, tables)

        return y, grad

    return forward(x)


def _masked_softmax_grad(dy, y, scale, tables: BlockTables) -> tf.Tensor:
    """Gradient of the masked softmax (first order only)."""
    return load_ops().bsattn_masked_softmax_grad(dy, y, scale, table_tensors(tables).nn_lut)
