"""The pure-TensorFlow chunked engine: Rabe & Staats' memory-efficient attention, O(n) memory, XLA-compilable.

Queries are cut into chunks of ``q_bucket_size`` and keys into chunks of ``k_bucket_size`` (the last chunks
padded; padded keys never attended). For each query chunk a ``tf.while_loop`` walks the key chunks keeping a
running row max ``m``, the row sum ``l`` of ``exp(s - m)`` and the weighted values ``acc``, rescaled by
``exp(m_old - m_new)`` whenever the max grows (``stable=False``, the cosine-sim variant, keeps no max: it adds
``exp(s)`` as is). Under ``causal`` the loop stops at the last key chunk a chunk's queries can see, so future
chunks are never computed. Only ``out`` and the log-normaliser ``lse = m + log(l + eps)`` are kept.

The gradient (``tf.custom_gradient``) recomputes every chunk's scores from ``q, k, lse``: ``p = exp(s - lse)``,
``ds = p·(z·dO·vᵀ - rowsum(dO·out))`` (z: dropout's keep scale). One pass over query chunks gives ``dq`` (and the
bias gradient), one over key chunks gives ``dk, dv`` — no scatter into a shared buffer, nothing of size
``[i, j]`` unless the bias itself is. With a single key chunk the first pass accumulates ``dk, dv`` too. ``eps`` enters exactly: ``out = acc / (l + eps)``, and its gradient is
that of ``exp(s - lse)`` with the same ``lse``.

NaN/Inf follow the fused op's rule: a masked entry (padding, causal, a False mask, a -inf bias) is never read into
any result, an attended NaN propagates (a non-finite attended value as NaN). Computes in float32 (float64 for
float64 inputs); returns the dtype of ``q``.
"""

from __future__ import annotations

from typing import NamedTuple

import tensorflow as tf

from bsattn.gather_attention import finite_part
from bsattn.memory_efficient.dropout import dropout_key, keep_scale
from bsattn.memory_efficient.inputs import Inputs, zero_masked_keys


class _Spec(NamedTuple):
    heads: int
    n_q: int
    n_k: int
    qb: int  # query chunk
    kb: int  # key chunk
    n_qc: int
    n_kc: int
    causal: bool
    stable: bool
    eps: float
    rate: float
    counter_q: int  # lengths of the dropout counter
    counter_k: int


def _chunks(x: tf.Tensor, n_chunks: int, size: int) -> tf.Tensor:
    """``[B, H, n, D]`` → ``[n_chunks, B, H, size, D]`` (zero-padded at the end)."""
    x = tf.pad(x, [[0, 0], [0, 0], [0, n_chunks * size - x.shape[2]], [0, 0]])
    b, h, _, d = tf.unstack(tf.shape(x))
    return tf.transpose(tf.reshape(x, [b, h, n_chunks, size, d]), [2, 0, 1, 3, 4])


def _unchunk(x: tf.Tensor) -> tf.Tensor:
    """``[n_chunks, B, H, size, ...]`` → ``[B, H, n_chunks * size, ...]``."""
    rest = list(range(4, x.shape.rank))
    x = tf.transpose(x, [1, 2, 0, 3] + rest)
    shape = tf.shape(x)
    return tf.reshape(x, tf.concat([shape[:2], [-1], shape[4:]], 0))


def _tiled(x: tf.Tensor | None, spec: _Spec, fill) -> tf.Tensor | None:
    """A keep mask or bias ``[b|1, h|1, i|1, j|1]`` → ``[b|1, h|1, n_qc|1, qb|1, n_kc|1, kb|1]`` (padded)."""
    if x is None:
        return None
    dims = x.shape.as_list()
    rows, cols = dims[2] != 1, dims[3] != 1
    pad = [[0, 0], [0, 0], [0, spec.n_qc * spec.qb - spec.n_q if rows else 0],
           [0, spec.n_kc * spec.kb - spec.n_k if cols else 0]]  # fmt: skip
    x = tf.pad(x, pad, constant_values=fill)
    shape = tf.shape(x)
    qdims = [spec.n_qc, spec.qb] if rows else [1, 1]
    kdims = [spec.n_kc, spec.kb] if cols else [1, 1]
    return tf.reshape(x, tf.concat([shape[:2], qdims, kdims], 0))


def _tile(t6: tf.Tensor | None, qi: tf.Tensor, kc: tf.Tensor) -> tf.Tensor | None:
    """Tile ``(qi, kc)`` of a ``_tiled`` tensor → ``[b|1, h|1, qb|1, kb|1]``."""
    if t6 is None:
        return None
    t = tf.gather(t6, qi, axis=2) if t6.shape[2] != 1 else t6[:, :, 0]
    return tf.gather(t, kc, axis=3) if t.shape[3] != 1 else t[:, :, :, 0]


class _Tensors(NamedTuple):
    """The chunked operands of one call (compute dtype)."""

    q: tf.Tensor  # [n_qc, B, H, qb, D], already multiplied by the scale
    k: tf.Tensor  # [n_kc, B, H, kb, D]
    v: tf.Tensor  # [n_kc, B, H, kb, D]
    keep: tf.Tensor | None  # _tiled bool
    bias: tf.Tensor | None  # _tiled
    key: tf.Tensor | None  # dropout key (uint64 scalar)


def _positions(spec: _Spec, qi: tf.Tensor, kc: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    return qi * spec.qb + tf.range(spec.qb), kc * spec.kb + tf.range(spec.kb)


def _scores(spec: _Spec, t: _Tensors, qi, kc, q_c, k_c) -> tf.Tensor:
    """Scores of tile ``(qi, kc)`` with -inf where not attended → ``[B, H, qb, kb]``."""
    s = tf.matmul(q_c, k_c, transpose_b=True)
    if t.bias is not None:
        s = s + _tile(t.bias, qi, kc)
    rows, cols = _positions(spec, qi, kc)
    valid = cols[None, :] < spec.n_k
    if spec.causal:  # bottom-right aligned: row r sees keys <= r + (n_k - n_q)
        valid &= cols[None, :] <= rows[:, None] + (spec.n_k - spec.n_q)
    if t.keep is not None:
        valid = valid & _tile(t.keep, qi, kc)
    return tf.where(valid, s, tf.constant(-float("inf"), s.dtype))


# A masked score is an exact -inf and its probability and score gradient exact zeros, but a product with them still
# reads the other operand: 0 · NaN = NaN. So the products take that operand with its non-finite entries zeroed, and
# an attended non-finite value propagates explicitly (as NaN), as it does in dense TF; an attended NaN score needs
# nothing (its row of p and ds is NaN by itself).


def _attended(s: tf.Tensor) -> tf.Tensor:
    """The attended entries of a masked score tile (masked ones are exactly -inf; a NaN score is attended)."""
    return tf.logical_not(tf.equal(s, tf.constant(-float("inf"), s.dtype)))


def _weighted_values(p: tf.Tensor, v_c: tf.Tensor, attended: tf.Tensor) -> tf.Tensor:
    """``p [B, H, qb, kb] · v_c [B, H, kb, D]``; a non-finite v entry makes NaN only the rows that attend its key."""
    bad = tf.logical_not(tf.math.is_finite(v_c))
    o = tf.matmul(p, finite_part(v_c))
    hit = lambda: tf.matmul(tf.cast(attended, p.dtype), tf.cast(bad, p.dtype)) > 0  # noqa: E731
    return tf.cond(tf.reduce_any(bad), lambda: tf.where(hit(), tf.constant(float("nan"), p.dtype), o), lambda: o)


def _value_scores(do_c: tf.Tensor, v_c: tf.Tensor, attended: tf.Tensor) -> tf.Tensor:
    """``dp = do_c · v_cᵀ [B, H, qb, kb]``: NaN at the attended keys whose v is not finite, finite elsewhere."""
    bad_key = tf.reduce_any(tf.logical_not(tf.math.is_finite(v_c)), -1)[:, :, None, :]  # [B, H, 1, kb]
    dp = tf.matmul(do_c, finite_part(v_c), transpose_b=True)
    nan = tf.constant(float("nan"), dp.dtype)
    return tf.cond(tf.reduce_any(bad_key), lambda: tf.where(attended & bad_key, nan, dp), lambda: dp)


def _dropout(spec: _Spec, t: _Tensors, qi, kc, dtype) -> tf.Tensor | None:
    if t.key is None:
        return None
    rows, cols = _positions(spec, qi, kc)
    batch = tf.shape(t.q)[1]
    return keep_scale(t.key, spec.rate, batch, spec.heads, rows, cols, spec.counter_q, spec.counter_k, dtype)


def _key_chunks_of(spec: _Spec, qi: tf.Tensor) -> tf.Tensor:
    """How many leading key chunks query chunk ``qi`` sees (all unless causal)."""
    if not spec.causal:
        return tf.constant(spec.n_kc)
    last = tf.minimum((qi + 1) * spec.qb, spec.n_q) - 1 + (spec.n_k - spec.n_q)
    return tf.where(last < 0, 0, tf.minimum(last // spec.kb + 1, spec.n_kc))


def _first_query_chunk(spec: _Spec, kc: tf.Tensor) -> tf.Tensor:
    """The first query chunk that sees a key of chunk ``kc`` (0 unless causal; ``n_qc`` if none)."""
    if not spec.causal:
        return tf.constant(0)
    first_row = tf.maximum(kc * spec.kb - (spec.n_k - spec.n_q), 0)
    return tf.minimum(first_row // spec.qb, spec.n_qc)


def _forward(spec: _Spec, t: _Tensors) -> tuple[tf.Tensor, tf.Tensor]:
    """→ ``out [n_qc, B, H, qb, D]`` and ``lse [n_qc, B, H, qb]`` (compute dtype)."""
    dtype = t.q.dtype
    stats_shape = tf.shape(t.q)[1:4]

    def row(qi):
        q_c = t.q[qi]

        def body(kc, m, l, acc):
            k_c, v_c = t.k[kc], t.v[kc]
            s = _scores(spec, t, qi, kc, q_c, k_c)
            if spec.stable:
                m_new = tf.maximum(m, tf.reduce_max(s, -1))
                m_safe = tf.where(tf.math.is_inf(m_new), tf.zeros([], dtype), m_new)  # a row with nothing yet
                alpha = tf.exp(m - m_safe)
                p = tf.exp(s - m_safe[..., None])
                l, acc, m = l * alpha, acc * alpha[..., None], m_new
            else:  # bounded (cosine-sim) scores: plain exp, no max
                p = tf.exp(s)
            z = _dropout(spec, t, qi, kc, dtype)
            acc = acc + _weighted_values(p if z is None else p * z, v_c, _attended(s))
            return kc + 1, m, l + tf.reduce_sum(p, -1), acc

        m0 = tf.fill(stats_shape, tf.constant(-float("inf"), dtype))
        init = (tf.constant(0), m0, tf.zeros(stats_shape, dtype), tf.zeros_like(q_c))
        n = _key_chunks_of(spec, qi)
        _, m, l, acc = tf.while_loop(lambda kc, *_: kc < n, body, init, parallel_iterations=1)
        norm = l + spec.eps
        kept = (l > 0) | tf.math.is_nan(l)  # a NaN row (an attended NaN score) stays NaN; a row without keys gives 0
        out = tf.where(kept[..., None], acc / tf.where(norm > 0, norm, tf.ones_like(norm))[..., None], tf.zeros([], dtype))
        lse = tf.math.log(norm) + (m if spec.stable else 0)
        return out, lse

    def body(qi, outs, lses):
        out, lse = row(qi)
        return qi + 1, outs.write(qi, out), lses.write(qi, lse)

    outs = tf.TensorArray(dtype, size=spec.n_qc, element_shape=t.q.shape[1:])
    lses = tf.TensorArray(dtype, size=spec.n_qc, element_shape=t.q.shape[1:4])
    _, outs, lses = tf.while_loop(lambda qi, *_: qi < spec.n_qc, body, (tf.constant(0), outs, lses),
                                  parallel_iterations=1)  # fmt: skip
    return outs.stack(), lses.stack()


class _Saved(NamedTuple):
    """What the backward reads per query chunk."""

    do: tf.Tensor  # [n_qc, B, H, qb, D] upstream gradient
    lse: tf.Tensor  # [n_qc, B, H, qb], 0 where -inf (those rows attend nothing)
    delta: tf.Tensor  # [n_qc, B, H, qb] rowsum(dO * out)


def _grad_tile(spec: _Spec, t: _Tensors, g: _Saved, qi, kc):
    """``(p·z, ds)`` of tile ``(qi, kc)``, each ``[B, H, qb, kb]``."""
    q_c, k_c, v_c, do_c = t.q[qi], t.k[kc], t.v[kc], g.do[qi]
    s = _scores(spec, t, qi, kc, q_c, k_c)
    attended = _attended(s)
    zero = tf.zeros([], s.dtype)
    p = tf.where(attended, tf.exp(s - g.lse[qi][..., None]), zero)  # 0 at masked entries, even in a NaN row
    dp = _value_scores(do_c, v_c, attended)
    z = _dropout(spec, t, qi, kc, p.dtype)
    if z is not None:
        dp = dp * z
    ds = tf.where(attended, p * (dp - g.delta[qi][..., None]), zero)
    return (p if z is None else p * z), ds


def _grad_q(spec: _Spec, t: _Tensors, g: _Saved, bias_shape: list | None, with_kv: bool = False):
    """``dq [n_qc, B, H, qb, D]`` (unscaled), the bias gradient ``[b|1, h|1, I, J]`` (padded lengths) and, with
    ``with_kv`` (one key chunk: ``n_kc == 1``), ``dk, dv [1, B, H, kb, D]`` accumulated in the same pass, which
    saves ``_grad_kv``'s second computation of every tile's scores; else ``None, None``."""
    dtype = t.q.dtype
    rows = bias_shape is not None and bias_shape[2] != 1
    cols = bias_shape is not None and bias_shape[3] != 1
    axes = [a for a in range(4) if bias_shape is not None and bias_shape[a] == 1]

    def bias_tile(ds):
        return tf.reduce_sum(ds, axes, keepdims=True) if axes else ds

    def tile_shape(batch):
        b = 1 if bias_shape[0] == 1 else batch
        return [b, bias_shape[1], spec.qb if rows else 1]

    def row(qi, dk, dv):
        def body(kc, dq, db, dk, dv):
            pz, ds = _grad_tile(spec, t, g, qi, kc)
            dq = dq + tf.matmul(ds, finite_part(t.k[kc]))
            if bias_shape is not None:
                db = db.write(kc, bias_tile(ds)) if cols else db + bias_tile(ds)
            if with_kv:  # kc is 0: the only key chunk
                dv = dv + tf.matmul(pz, g.do[qi], transpose_a=True)
                dk = dk + tf.matmul(ds, finite_part(t.q[qi]), transpose_a=True)
            return kc + 1, dq, db, dk, dv

        batch = tf.shape(t.q)[1]
        if bias_shape is None:
            db0 = tf.zeros([])
        elif cols:
            db0 = tf.TensorArray(dtype, size=spec.n_kc)
        else:
            db0 = tf.zeros(tile_shape(batch) + [1], dtype)
        n = _key_chunks_of(spec, qi)
        init = (tf.constant(0), tf.zeros_like(t.q[qi]), db0, dk, dv)
        _, dq, db, dk, dv = tf.while_loop(lambda kc, *_: kc < n, body, init, parallel_iterations=1)
        if bias_shape is not None and cols:
            zeros = tf.zeros(tile_shape(batch) + [spec.kb], dtype)  # the future chunks' gradient
            _, db = tf.while_loop(lambda kc, _: kc < spec.n_kc, lambda kc, db: (kc + 1, db.write(kc, zeros)), (n, db))
            db = tf.transpose(db.stack(), [1, 2, 3, 0, 4])  # [n_kc, b, h, qb|1, kb] → [b, h, qb|1, n_kc*kb]
            db = tf.reshape(db, tf.concat([tf.shape(db)[:3], [spec.n_kc * spec.kb]], 0))
        return dq, db, dk, dv

    def body(qi, dqs, dbs, dk, dv):
        dq, db, dk, dv = row(qi, dk, dv)
        if bias_shape is not None:
            dbs = dbs.write(qi, db) if rows else dbs + db
        return qi + 1, dqs.write(qi, dq), dbs, dk, dv

    if bias_shape is None:
        dbs0 = tf.zeros([])
    elif rows:
        dbs0 = tf.TensorArray(dtype, size=spec.n_qc)
    else:
        width = spec.n_kc * spec.kb if cols else 1
        dbs0 = tf.zeros(tile_shape(tf.shape(t.q)[1]) + [width], dtype)
    dqs = tf.TensorArray(dtype, size=spec.n_qc, element_shape=t.q.shape[1:])
    kv0 = tf.zeros_like(t.k[0]) if with_kv else tf.zeros([], dtype)  # a placeholder without with_kv
    _, dqs, dbs, dk, dv = tf.while_loop(lambda qi, *_: qi < spec.n_qc, body, (tf.constant(0), dqs, dbs0, kv0, kv0),
                                        parallel_iterations=1)  # fmt: skip
    if rows:  # [n_qc, b, h, qb, J] → [b, h, n_qc*qb, J]
        dbs = _unchunk(dbs.stack())
    kv = (dk[None], dv[None]) if with_kv else (None, None)
    return dqs.stack(), None if bias_shape is None else dbs, *kv


def _grad_kv(spec: _Spec, t: _Tensors, g: _Saved):
    """``dk, dv [n_kc, B, H, kb, D]`` (dk includes the scale through the scaled ``q``)."""

    def column(kc):
        def body(qi, dk, dv):
            pz, ds = _grad_tile(spec, t, g, qi, kc)
            dv = dv + tf.matmul(pz, g.do[qi], transpose_a=True)
            dk = dk + tf.matmul(ds, finite_part(t.q[qi]), transpose_a=True)
            return qi + 1, dk, dv

        zeros = tf.zeros_like(t.k[kc])
        init = (_first_query_chunk(spec, kc), zeros, zeros)
        _, dk, dv = tf.while_loop(lambda qi, *_: qi < spec.n_qc, body, init, parallel_iterations=1)
        return dk, dv

    def body(kc, dks, dvs):
        dk, dv = column(kc)
        return kc + 1, dks.write(kc, dk), dvs.write(kc, dv)

    dks = tf.TensorArray(t.k.dtype, size=spec.n_kc, element_shape=t.k.shape[1:])
    dvs = tf.TensorArray(t.k.dtype, size=spec.n_kc, element_shape=t.k.shape[1:])
    _, dks, dvs = tf.while_loop(lambda kc, *_: kc < spec.n_kc, body, (tf.constant(0), dks, dvs),
                                parallel_iterations=1)  # fmt: skip
    return dks.stack(), dvs.stack()


def chunked_attention(
    x: Inputs,
    causal: bool,
    scale: float,
    q_bucket_size: int,
    k_bucket_size: int,
    eps: float = 0.0,
    stable: bool = True,
    dropout_rate: float = 0.0,
    seed: tf.Tensor | None = None,
    counter_lengths: tuple[int, int] | None = None,
) -> tf.Tensor:
    """Attention of checked inputs by chunks → ``[b, h, i, d]`` in the dtype of ``q`` (see the module docstring).

    Args:
      x: from ``check_inputs`` (``keep``: True = attend; ``bias`` added to the scaled scores).
      causal: bottom-right aligned (row ``r`` sees keys ``<= r + j - i``).
      scale: multiplies ``q·kᵀ``.
      q_bucket_size, k_bucket_size: chunk lengths (clipped to ``i`` and ``j``).
      eps: ``out = acc / (l + eps)`` as the original; 0 = exact softmax.
      stable: keep a running max (False: the cosine-sim variant's plain ``exp``).
      dropout_rate, seed: the fused op's dropout (same hash, same entries), int64 seed (None: a random one);
        ``counter_lengths``: the ``(Tq, Tk)`` of the dropout counter (default ``(i, j)``).
    """
    compute = tf.float64 if x.q.dtype == tf.float64 else tf.float32
    qb, kb = min(q_bucket_size, x.n_q), min(k_bucket_size, x.n_k)
    n_qc, n_kc = -(-x.n_q // qb), -(-x.n_k // kb)
    counter_q, counter_k = counter_lengths or (x.n_q, x.n_k)
    spec = _Spec(x.heads, x.n_q, x.n_k, qb, kb, n_qc, n_kc, causal, stable, eps, dropout_rate, counter_q, counter_k)
    key = None
    if dropout_rate > 0:
        if seed is None:
            seed = tf.random.uniform([], 0, 2**62, dtype=tf.int64)
        key = dropout_key(seed)
    keep6 = _tiled(x.keep, spec, False)
    bias_shape = None if x.bias is None else tuple(x.bias.shape.as_list())

    def operands(q, k, v, bias):
        q = tf.cast(q, compute) * tf.constant(scale, compute)
        k, v = tf.cast(k, compute), tf.cast(v, compute)
        k, v = zero_masked_keys(x.keep, k, v)
        bias6 = None if bias is None else _tiled(tf.cast(bias, compute), spec, 0)
        return _Tensors(_chunks(q, n_qc, qb), _chunks(k, n_kc, kb), _chunks(v, n_kc, kb), keep6, bias6, key)

    @tf.custom_gradient
    def attend(*inputs):
        q, k, v = inputs[:3]
        t = operands(*inputs[:3], inputs[3] if len(inputs) == 4 else None)
        out_c, lse_c = _forward(spec, t)
        out = _unchunk(out_c)[:, :, : x.n_q]

        def grad(dout):
            do = _chunks(tf.cast(dout, compute), n_qc, qb)
            lse = tf.where(tf.math.is_inf(lse_c), tf.zeros([], compute), lse_c)
            g = _Saved(do, lse, tf.reduce_sum(do * out_c, -1))
            dq, dbias, dk, dv = _grad_q(spec, t, g, bias_shape, with_kv=n_kc == 1)
            if n_kc > 1:
                dk, dv = _grad_kv(spec, t, g)
            dq = _unchunk(dq)[:, :, : x.n_q] * tf.constant(scale, compute)
            dk, dv = (_unchunk(d)[:, :, : x.n_k] for d in (dk, dv))
            grads = [tf.cast(dq, q.dtype), tf.cast(dk, k.dtype), tf.cast(dv, v.dtype)]
            if dbias is not None:
                dbias = dbias[:, :, : x.n_q if bias_shape[2] != 1 else 1, : x.n_k if bias_shape[3] != 1 else 1]
                grads.append(tf.cast(dbias, inputs[3].dtype))
            return grads

        return tf.cast(out, x.q.dtype), grad

    inputs = (x.q, x.k, x.v) if x.bias is None else (x.q, x.k, x.v, x.bias)
    return attend(*inputs)
