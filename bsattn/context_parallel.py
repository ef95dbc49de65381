"""Context parallelism: one sequence split over the replicas of a ``tf.distribute`` strategy.

The ``T`` tokens of a sequence are cut into ``N`` contiguous shards of ``T / N`` (``N`` = the strategy's replicas in
sync); replica ``r`` holds the queries, keys and values of shard ``r``. Attention over a block layout needs, for
the query-block rows of shard ``r``, only the key blocks those rows make active. Each replica therefore:

1. packs the key/value blocks of its shard that the rows of *any other* shard need (its send set, fixed by the
   layout: ``ContextParallelPlan.send_blocks``) into one ``[B, n_send * bs, 2 * KVH * D]`` buffer;
2. all-gathers the buffers (``ReplicaContext.all_gather`` along the time axis: send sets of different sizes
   need no padding; a shard that nobody needs sends one placeholder token, since TensorFlow's collective fails
   on an empty contribution);
3. runs the fused op once per source shard whose blocks its rows touch, with the tables of
   ``(its rows) x (that shard's blocks)`` (``ContextParallelPlan.pair_tables``, block indices into the packed
   buffer for a remote shard), each giving ``(out_s, lse_s)``;
4. merges the partial results exactly: ``out = Σ_s exp(lse_s - lse) out_s`` with ``lse = log Σ_s exp(lse_s)``.

The backward pass runs through the same graph: the fused op's gradient takes ``dlse``, and the all-gather's
gradient (TensorFlow's: an all-reduce of the gathered buffer's gradient, each replica keeping its slice) returns
the gradient of each sent block to its owner, where the gather's gradient scatters it into ``dK``/``dV``. That
all-reduce is a collective too, so every replica's output depends on the gathered buffer (through an empty slice
where its rows read no remote block), and every replica's tape joins it.

Why an all-gather and not a ring of point-to-point permutes: ``tf.distribute``'s cross-replica primitives are
all-reduce, all-gather and broadcast (no send/receive between two replicas), and the same code then runs on
``MirroredStrategy`` and ``MultiWorkerMirroredStrategy``. A replica receives every other shard's send set, which
is what its rows need for the usual patterns' last shard (causal: all earlier shards; fixed: all earlier summary
columns) and more than that for the first shards; ``ContextParallelPlan.exchange_bytes`` counts both, and the
payload is at most (and for sparse layouts far below) an all-gather of all of K/V, plus the placeholders.

Supported: any ``FusedTables`` of ``n_q = n_k = T`` (every bsattn pattern, DeepSpeed layouts through
``fused_tables_for_layout``), grouped-query ``kv_heads``, any scale, float dtypes. Not under context
parallelism: key padding masks, biases, segment ids and attention dropout (their per-shard slicing is not
implemented; passing them is not possible through this API).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np
import tensorflow as tf

from bsattn import _checks as checks
from bsattn import patterns
from bsattn.fused_attention import fused_attention
from bsattn.fused_tables import FusedTables


@dataclasses.dataclass(frozen=True)
class NaturalStrided(patterns.Pattern):
    """sparse_attention's 'strided' in the original token order: ``i`` attends ``j`` iff ``j <= i`` and
    ``(i - j) % local_attn_ctx == 0``. ``patterns.Strided`` is the same mask in the strided-transposed order, which
    is a global permutation of the tokens; a sequence split into contiguous shards keeps the original order."""

    local_attn_ctx: int

    def __post_init__(self):
        object.__setattr__(self, "local_attn_ctx", checks.positive_int("local_attn_ctx", self.local_attn_ctx))

    def allowed(self, head, q, k, n_q, n_k):
        d = q - k
        return (d >= 0) & (d % self.local_attn_ctx == 0)

    def _block_classes(self, head, qb, kb, block_size, n_q, n_k):
        d_min, d_max = (qb - kb) * block_size - (block_size - 1), (qb - kb) * block_size + (block_size - 1)
        active = (d_max >= 0) & (d_max // self.local_attn_ctx * self.local_attn_ctx >= np.maximum(d_min, 0))
        return active, active & (d_min >= 0) & (self.local_attn_ctx == 1)


@dataclasses.dataclass(frozen=True, eq=False)
class ContextParallelPlan:
    """Which key blocks move between the ``n_shards`` shards of ``tables`` (``n_q = n_k = T``), and the tables of
    every (query shard, key shard) pair. Built by ``context_parallel_plan`` (cached); NumPy only."""

    tables: FusedTables
    n_shards: int
    # Per source shard s: the shard-local key blocks (increasing) that rows of other shards need → int [n_send_s].
    send_blocks: tuple[np.ndarray, ...]
    # needs[r][s]: the shard-local key blocks of shard s that rows of shard r need (s == r: its own) → int [n].
    needs: tuple[tuple[np.ndarray, ...], ...]

    @property
    def shard_blocks(self) -> int:
        """Blocks per shard (query and key)."""
        return self.tables.n_q_blocks // self.n_shards

    @property
    def shard_len(self) -> int:
        return self.shard_blocks * self.tables.block_size

    def send_tokens(self, shard: int) -> int:
        """Tokens shard ``shard`` contributes to the all-gather: its send set, or 1 placeholder token (its first) when
        that is empty (TensorFlow's collective all-gather fails on an empty contribution)."""
        return max(1, int(self.send_blocks[shard].size) * self.tables.block_size)

    def pair_tables(self, shard: int, source: int) -> FusedTables | None:
        """The tables of shard ``shard``'s query rows against shard ``source``'s keys (its own ``T / N`` keys when
        ``source == shard``, else the ``send_blocks[source]`` blocks in packed order), or None when those rows
        touch no block of ``source``."""
        return _pair_tables(self, shard, source)

    def exchange_bytes(self, batch: int, kv_width: int, itemsize: int) -> dict[str, int]:
        """Bytes of K and V (``kv_width = KVH * D`` channels each) moved by one forward call, all replicas summed:

        - ``sent``: what the replicas contribute to the all-gather (Σ_s send set of s);
        - ``received``: what they receive (Σ_r Σ_{s≠r} send set of s) — the forward's traffic;
        - ``required``: what their rows need from other shards (Σ_r Σ_{s≠r} needs[r][s]), the lower bound of
          any exchange (a ring of point-to-point permutes would move exactly this);
        - ``all_kv``: what an all-gather of all of K/V would receive (N · (N - 1) · T / N tokens).
        """
        per_token = batch * 2 * kv_width * itemsize
        bs, n = self.tables.block_size, self.n_shards
        if not any(s.size for s in self.send_blocks):
            sent = received = 0
        else:
            sent = sum(self.send_tokens(s) for s in range(n))
            received = sum(self.send_tokens(s) for r in range(n) for s in range(n) if s != r)
        required = sum(self.needs[r][s].size for r in range(n) for s in range(n) if s != r) * bs
        return {
            "sent": sent * per_token,
            "received": received * per_token,
            "required": required * per_token,
            "all_kv": (n - 1) * self.tables.n_k * per_token,
        }


@functools.lru_cache(maxsize=64)
def context_parallel_plan(tables: FusedTables, n_shards: int) -> ContextParallelPlan:
    """The plan of ``tables`` over ``n_shards`` contiguous shards (cached per tables object)."""
    checks.instance("tables", tables, FusedTables)
    n_shards = checks.positive_int("n_shards", n_shards)
    if tables.n_q_blocks != tables.n_k_blocks:
        raise ValueError(
            f"context parallelism is self-attention: the tables have {tables.n_q} queries and {tables.n_k} keys"
        )
    if tables.n_q_blocks % n_shards:
        raise ValueError(
            f"the sequence length T={tables.n_q} must be a multiple of n_shards * block_size = {n_shards} * "
            f"{tables.block_size} (each shard holds whole blocks)"
        )
    nb = tables.n_q_blocks // n_shards
    touched = tables.layout.any(axis=0)  # [nQb, nKb]: any layout head
    by_pair = touched.reshape(n_shards, nb, n_shards, nb).any(axis=1)  # [r, s, kb]: rows of r touch block kb of s
    needs = tuple(tuple(np.flatnonzero(by_pair[r, s]) for s in range(n_shards)) for r in range(n_shards))
    others = [np.delete(by_pair[:, s], s, axis=0).any(axis=0) for s in range(n_shards)]
    send = tuple(np.flatnonzero(o) for o in others)
    return ContextParallelPlan(tables=tables, n_shards=n_shards, send_blocks=send, needs=needs)


@functools.lru_cache(maxsize=256)
def _pair_tables(plan: ContextParallelPlan, shard: int, source: int) -> FusedTables | None:
    tables, nb = plan.tables, plan.shard_blocks
    if plan.needs[shard][source].size == 0:
        return None
    columns = np.arange(nb) if source == shard else plan.send_blocks[source]  # key blocks, in the buffer's order
    column_of = np.full(nb, -1, np.int64)
    column_of[columns] = np.arange(columns.size)
    q0, k0 = shard * nb, source * nb
    rows, used = [], []
    for h in range(tables.lut_heads):
        qb, kb, mask_id = tables.block_coords(h)
        keep = (qb >= q0) & (qb < q0 + nb) & (kb >= k0) & (kb < k0 + nb)
        qb, kb, mask_id = qb[keep] - q0, column_of[kb[keep] - k0], mask_id[keep]
        rows.append((qb, kb, mask_id))
        used.append(mask_id[mask_id >= 0])
    used_ids = np.unique(np.concatenate(used)) if used else np.zeros(0, np.int64)
    new_id = np.full(max(1, len(tables.masks)), -1, np.int64)  # (one entry at least: indexed by -1 ids clipped to 0)
    new_id[used_ids] = np.arange(used_ids.size)
    row_ptr, row_entries, col_ptr, col_entries = [], [], [], []
    offset = 0
    for qb, kb, mask_id in rows:  # row-major already: the columns keep their order
        mask_id = np.where(mask_id >= 0, new_id[np.maximum(mask_id, 0)], -1)
        row_ptr.append(offset + np.concatenate([[0], np.cumsum(np.bincount(qb, minlength=nb))]))
        row_entries.append(np.stack([kb, mask_id], axis=1))
        by_col = np.lexsort((qb, kb))
        col_ptr.append(offset + np.concatenate([[0], np.cumsum(np.bincount(kb, minlength=columns.size))]))
        col_entries.append(np.stack([qb[by_col], mask_id[by_col]], axis=1))
        offset += qb.size

    def table(parts: list[np.ndarray], width: int | None = None) -> np.ndarray:
        array = np.concatenate(parts).reshape(-1, width) if width else np.stack(parts)
        array = np.ascontiguousarray(array, dtype=np.int32)
        array.flags.writeable = False
        return array

    masks = np.ascontiguousarray(tables.masks[used_ids])
    masks.flags.writeable = False
    return FusedTables(
        block_size=tables.block_size,
        lut_heads=tables.lut_heads,
        n_q_blocks=nb,
        n_k_blocks=int(columns.size),
        row_ptr=table(row_ptr),
        row_entries=table(row_entries, 2),
        col_ptr=table(col_ptr),
        col_entries=table(col_entries, 2),
        masks=masks,
    )


def replica_shard(strategy: tf.distribute.Strategy | None = None) -> tuple[int, int]:
    """``(shard, n_shards)`` of the calling replica: its replica id (a Python int) and the replicas in sync.

    Outside ``strategy.run`` (or with the default strategy) this is ``(0, 1)``. ValueError when the replica
    context belongs to another strategy than ``strategy``, or when its replica id is not a constant.
    """
    ctx = tf.distribute.get_replica_context()
    if ctx is None:
        raise ValueError(
            "context parallelism runs in a replica context: call it inside strategy.run(...), not in a "
            "cross-replica context (e.g. directly under strategy.scope())"
        )
    if strategy is not None and ctx.num_replicas_in_sync > 1 and ctx.strategy is not strategy:
        raise ValueError(
            f"context_parallel={type(strategy).__name__} but the calling replica belongs to "
            f"{type(ctx.strategy).__name__}: pass the strategy whose strategy.run calls this"
        )
    n = ctx.num_replicas_in_sync
    if n == 1:
        return 0, 1
    shard = tf.get_static_value(ctx.replica_id_in_sync_group)
    if shard is None:
        raise ValueError("context parallelism needs the replica id as a constant; this strategy gives a tensor")
    return int(shard), n


def exchange_kv(k: tf.Tensor, v: tf.Tensor, plan: ContextParallelPlan, shard: int) -> tf.Tensor | None:
    """All-gathers every shard's send set: ``k, v [B, T/N, KVW]`` of this shard → ``[B, Σ_s send_tokens(s), 2 KVW]``
    (shard ``s``'s blocks at token offset ``Σ_{s' < s} send_tokens(s')``, K in the first ``KVW`` channels), or
    None when no shard sends anything (a block-diagonal layout)."""
    if not any(s.size for s in plan.send_blocks):
        return None
    bs, width = plan.tables.block_size, k.shape[-1]
    blocks = plan.send_blocks[shard]
    kv = tf.concat([k, v], axis=-1)  # [B, T/N, 2 KVW]
    kv = tf.reshape(kv, [-1, plan.shard_blocks, bs, 2 * width])
    if blocks.size:
        packed = tf.reshape(tf.gather(kv, tf.constant(blocks, tf.int32), axis=1), [-1, blocks.size * bs, 2 * width])
    else:  # a placeholder, never read; taken from k/v so that the gradient path (and the backward's collective) exists
        packed = kv[:, 0, :1]
    return tf.distribute.get_replica_context().all_gather(packed, axis=1)


def context_parallel_attention(
    q: tf.Tensor,
    k: tf.Tensor,
    v: tf.Tensor,
    tables: FusedTables,
    heads: int,
    strategy: tf.distribute.Strategy | None = None,
    scale: float | None = None,
    kv_heads: int | None = None,
) -> tf.Tensor:
    """The fused op's attention over a sequence split across the replicas: ``[B, T/N, H*D], [B, T/N, KVH*D] x2 ->
    [B, T/N, H*D]`` (this replica's shard), equal to ``fused_attention`` on the whole sequence, shard by shard.

    Call inside ``strategy.run`` (``N`` = its replicas in sync; replica ``r`` passes tokens ``[r T/N, (r+1) T/N)``);
    with the default strategy (``N = 1``) it is ``fused_attention``. Differentiable (gradients of K/V reach the
    replica that holds them).

    Args:
      q: ``[B, T/N, H*D]``; k, v: ``[B, T/N, KVH*D]``, the dtype of ``q``, this replica's shard.
      tables: the tables of the whole sequence (``n_q = n_k = T``); ``T`` a multiple of ``N * block_size``.
      heads, scale, kv_heads: as ``fused_attention``.
      strategy: the strategy whose ``run`` calls this (checked), or None for the current one.
    """
    shard, n = replica_shard(strategy)
    if n == 1:
        return fused_attention(q, k, v, tables, heads, scale=scale, kv_heads=kv_heads)
    plan = context_parallel_plan(tables, n)
    q = checks.float_tensor("q", q)
    k = checks.float_tensor("k", k, q.dtype)
    v = checks.float_tensor("v", v, q.dtype)
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.shape.rank != 3 or x.shape[1] != plan.shard_len or x.shape[-1] is None:
            raise ValueError(
                f"{name} must be this replica's shard [batch, T / N = {tables.n_q} / {n} = {plan.shard_len}, width] "
                f"with a static width, got shape {x.shape}"
            )
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1] // checks.positive_int("heads", heads))
    gathered = exchange_kv(k, v, plan, shard)
    out = shard_attention(q, k, v, gathered, plan, shard, heads, scale, kv_heads)
    if gathered is not None:
        # Every replica must join the all-gather's backward (an all-reduce): a replica whose rows read no remote
        # block (causal: the first) depends on the buffer through an empty slice, so its tape still calls it.
        out += tf.cast(tf.reduce_sum(gathered[:, :0, :1]), out.dtype)
    return out


def shard_attention(
    q: tf.Tensor,
    k: tf.Tensor,
    v: tf.Tensor,
    gathered: tf.Tensor | None,
    plan: ContextParallelPlan,
    shard: int,
    heads: int,
    scale: float,
    kv_heads: int | None = None,
) -> tf.Tensor:
    """Shard ``shard``'s attention from its own ``q, k, v [B, T/N, ...]`` and the all-gathered buffer of
    ``exchange_kv`` (no collective here): one fused op per source shard its rows touch, merged by lse →
    ``[B, T/N, H*D]``."""
    width = k.shape[-1]
    outs, lses = [], []
    offset = 0
    for source in range(plan.n_shards):
        pair = plan.pair_tables(shard, source)
        size = plan.send_tokens(source)
        if source == shard:
            ks, vs = k, v
        elif pair is not None:
            kv = gathered[:, offset : offset + size]
            ks, vs = kv[..., :width], kv[..., width:]
        offset += size
        if pair is None:
            continue
        out, lse = fused_attention(q, ks, vs, pair, heads, scale=scale, return_lse=True, kv_heads=kv_heads)
        outs.append(out)
        lses.append(lse)
    return merge_partials(outs, lses, heads)


def merge_partials(outs: list[tf.Tensor], lses: list[tf.Tensor], heads: int) -> tf.Tensor:
    """Exact merge of partial attentions over disjoint key sets: ``outs[i] [B, Tq, H*D]`` (0 where a row has no
    key), ``lses[i] [B, H, Tq]`` (-inf there) → ``[B, Tq, H*D]`` in the dtype of ``outs``; a row with no key in
    any part gives 0. No NaN in the value or the gradient. Accumulates part by part (no stacked copy of the
    outputs): the temporaries are a few ``[B, Tq, H*D]`` tensors however many parts there are."""
    if len(outs) == 1:
        return outs[0]
    top = tf.stop_gradient(tf.reduce_max(tf.stack(lses), axis=0))  # [B, H, Tq]
    top = tf.where(tf.math.is_finite(top), top, tf.zeros_like(top))
    weights = [tf.exp(lse - top) for lse in lses]  # exp(-inf) = 0: an empty part has weight 0 (and gradient 0)
    total = tf.add_n(weights)
    total = tf.where(total > 0, total, tf.ones_like(total))
    shape = tf.shape(outs[0])
    merged = None
    for out, weight in zip(outs, weights):
        w = tf.transpose(weight / total, [0, 2, 1])[..., None]  # [B, Tq, H, 1]
        part = tf.reshape(tf.cast(out, w.dtype), [shape[0], shape[1], heads, -1]) * w
        merged = part if merged is None else merged + part
    return tf.cast(tf.reshape(merged, shape), outs[0].dtype)
