"""``CoordinateDescentRouter`` and ``route_back``: pick ``num_tokens`` of ``n`` tokens per routing token.

``call(x [b, n, d], *, num_tokens, mask=None [b, n], random_route=False, routing_tokens=None,
keep_one_route_dim=False)`` → ``RouterReturn(indices, scores, routed_tokens, routed_mask)``, with a route axis
``r`` iff ``keep_one_route_dim`` or ``num_routing_tokens > 1``: ``indices`` int32 ``[b, (r,) k]`` (None when not
routing), ``scores`` float32 ``[b, (r,) k]``, ``routed_tokens [b, (r,) k, d]`` (dtype of x), ``routed_mask``
bool ``[b, (r,) k]`` (None without mask).

Steps: scores ``s = x·routing_tokenᵀ`` in float32 (cosine-sim routing: both L2-normalised, times
``cosine_sim_scale``); routes folded into the batch; ``c = coor_descent(s, k=min(num_tokens·fetch_k_ratio, n))``;
the ``num_tokens`` best are selected; the straight-through score ``c + stop_gradient(1 - c)`` (value 1, 0 where the
selected token is masked) or ``c`` itself; the tokens are gathered from ``x[b, indices[b, r]]``.

``route_shared(x [b, n, d], num_tokens=, masks [b, g, n])`` routes ``g`` rows that share the candidates ``x`` and
differ in their masks, as ``call`` on ``x`` repeated ``g`` times but without the repeat (the autoregressive
attention's query windows, each routing keys from all earlier windows).

Where this differs from the original (each is in the README's CoLT5 table):
- selection ranks by ``s`` (masked entries last) instead of by ``c``: ``c = min(1, exp((s + a)/eps))`` is monotone
  in ``s`` within a row, so the top-k set is the same, but the many saturated scores tied at exactly 1.0 (with
  the router defaults) are broken by the raw score, not by the sort's implementation-defined order;
- with several routing tokens the gather takes ``x[b, indices[b, r]]`` (the original gathers from the wrong batch
  entry when ``b > 1``);
- ``route_block_size``: every token is routable (the original drops the tokens after the last full block, and
  crashes on both of its paths): the sequence is cut into blocks of ``route_block_size`` (the last may be
  shorter), each block routes ``ceil(num_tokens / num_blocks)`` tokens (the last ``min`` of that and its length),
  indices are sorted by block;
- ``random_route`` selects uniformly among the unmasked tokens (mask optional; the original needs one), scores as
  usual from ``c`` at the selected positions;
- ``use_triton`` selects bsattn's fused coordinate-descent op; ``triton_checkpoint_segments`` is kept in the
  config only (the op chooses its own segments).
"""

from __future__ import annotations

import collections
import math
import numbers

import keras
import numpy as np
import tensorflow as tf

from bsattn import _checks as checks
from bsattn.colt5.coor_descent import coor_descent

RouterReturn = collections.namedtuple("RouterReturn", ["indices", "scores", "routed_tokens", "routed_mask"])


def batched_gather(x: tf.Tensor, indices: tf.Tensor) -> tf.Tensor:
    """``x [b, n, ...]``, ``indices [b, ...idx]`` → ``x[b, indices[b, ...]]``, ``[b, ...idx, ...]``."""
    flat = tf.reshape(indices, [tf.shape(indices)[0], -1])
    out = tf.gather(x, flat, batch_dims=1)
    return tf.reshape(out, tf.concat([tf.shape(indices), tf.shape(x)[2:]], 0))


def route_back(src: tf.Tensor, routed_tokens: tf.Tensor, indices: tf.Tensor) -> tf.Tensor:
    """``src [b, n, d]`` with ``src[b, indices[b, i]] = routed_tokens[b, i]`` (a new tensor; differentiable in both).

    ``indices`` int ``[b, k]``, distinct within a row (as the router returns them); ``routed_tokens [b, k, d]``.
    """
    if indices is None:
        raise ValueError("indices is None: the router did not route (n <= num_tokens); use routed_tokens directly")
    if indices.shape.rank != 2:
        raise ValueError(f"indices must be [batch, k] (one route), got shape {indices.shape}")
    b = tf.shape(indices)[0]
    rows = tf.broadcast_to(tf.range(b, dtype=indices.dtype)[:, None], tf.shape(indices))
    nd = tf.stack([rows, indices], axis=-1)
    return tf.tensor_scatter_nd_update(src, nd, tf.cast(routed_tokens, src.dtype))


def _l2norm(t: tf.Tensor) -> tf.Tensor:
    """``F.normalize``: ``t / max(||t||, 1e-12)`` over the last axis."""
    norm = tf.sqrt(tf.reduce_sum(tf.square(t), axis=-1, keepdims=True))
    return t / tf.maximum(norm, tf.constant(1e-12, t.dtype))


@keras.saving.register_keras_serializable(package="bsattn")
class CoordinateDescentRouter(keras.layers.Layer):
    """The original's router (see the module docstring); owns ``routing_token [num_routing_tokens, dim] ~ N(0, 1)``
    as a trainable weight unless ``learned_routing_tokens`` (then ``routing_tokens [b, d]`` or ``[b, r, d]`` come
    with each call)."""

    def __init__(self, dim: int, straight_through: bool = True, n_iters: int = 20, fetch_k_ratio: float = 9 / 8,
                 eps: float = 0.03, eps_decay: float = 0.7, eps_init: float = 4.0, num_routing_tokens: int = 1,
                 learned_routing_tokens: bool = False, use_triton: bool = False, cosine_sim_routing: bool = False,
                 cosine_sim_scale: float = 8, route_block_size: int | None = None,
                 triton_checkpoint_segments: int | None = None, **kwargs):  # fmt: skip
        kwargs.setdefault("autocast", False)  # the routing token stays float32 under mixed precision
        super().__init__(**kwargs)
        self.dim = checks.positive_int("dim", dim)
        self.straight_through = bool(straight_through)
        self.n_iters = checks.positive_int("n_iters", n_iters)
        if isinstance(fetch_k_ratio, bool) or not isinstance(fetch_k_ratio, numbers.Real) or not fetch_k_ratio >= 1:
            raise ValueError(f"fetch_k_ratio must be a number >= 1, got {fetch_k_ratio!r}")
        self.fetch_k_ratio = float(fetch_k_ratio)
        for name, value in (("eps", eps), ("eps_decay", eps_decay)) + ((("eps_init", eps_init),) if eps_init else ()):
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value > 0:
                raise ValueError(f"{name} must be a positive number, got {value!r}")
        self.eps, self.eps_decay = float(eps), float(eps_decay)
        self.eps_init = None if eps_init is None else float(eps_init)
        self.num_routing_tokens = checks.positive_int("num_routing_tokens", num_routing_tokens)
        self.learned_routing_tokens = bool(learned_routing_tokens)
        self.use_triton = bool(use_triton)
        self.cosine_sim_routing = bool(cosine_sim_routing)
        self.cosine_sim_scale = float(cosine_sim_scale)
        self.route_block_size = None if route_block_size is None else checks.positive_int("route_block_size",
                                                                                           route_block_size)
        self.triton_checkpoint_segments = triton_checkpoint_segments
        self.supports_masking = True  # mask is an argument of call (Keras must not warn about it)
        self.routing_token = None
        if not self.learned_routing_tokens:
            self.routing_token = self.add_weight(
                name="routing_token", shape=(self.num_routing_tokens, self.dim),
                initializer=keras.initializers.RandomNormal(stddev=1.0), trainable=True,
            )  # fmt: skip

    @property
    def is_one_routing_token(self) -> bool:
        return self.num_routing_tokens == 1

    def route_back(self, src: tf.Tensor, routed_tokens: tf.Tensor, indices: tf.Tensor) -> tf.Tensor:
        return route_back(src, routed_tokens, indices)

    def build(self, input_shape=None):
        pass

    def compute_mask(self, inputs, mask=None):
        return None

    def call(self, x, *, num_tokens: int, mask=None, random_route: bool = False, routing_tokens=None,
             keep_one_route_dim: bool = False) -> RouterReturn:  # fmt: skip
        x = tf.convert_to_tensor(x)
        if x.shape.rank != 3 or x.shape[-1] != self.dim or x.shape[1] is None:
            raise ValueError(f"x must be [batch, n, {self.dim}] with a static n, got shape {x.shape}")
        num_tokens = checks.positive_int("num_tokens", num_tokens)
        n, r = x.shape[1], self.num_routing_tokens
        if mask is not None:
            mask = tf.convert_to_tensor(mask)
            if mask.dtype != tf.bool:
                mask = tf.not_equal(mask, tf.zeros([], mask.dtype))
            if mask.shape.rank != 2 or not mask.shape.is_compatible_with([x.shape[0], n]):
                raise ValueError(f"mask must be [batch, n] = [{x.shape[0]}, {n}], got shape {mask.shape}")
        has_route_dim = keep_one_route_dim or r > 1
        batch = tf.shape(x)[0]
        if n <= num_tokens:  # nothing to choose: every token, in order, score 1
            if not has_route_dim:
                return RouterReturn(None, tf.ones([batch, n], tf.float32), x, mask)
            tokens = tf.repeat(x[:, None], r, axis=1)
            mask = None if mask is None else tf.repeat(mask[:, None], r, axis=1)
            return RouterReturn(None, tf.ones([batch, r, n], tf.float32), tokens, mask)

        tokens = self._routing_tokens(routing_tokens, x)  # [r, d] or [b, r, d], float32
        x32 = tf.cast(x, tf.float32)
        if self.route_block_size is None or self.route_block_size >= n:
            indices, scores = self._route(x32, mask, num_tokens, tokens, random_route)
        else:
            indices, scores = self._route_blocks(x32, mask, num_tokens, tokens, random_route)
        if self.straight_through:
            scores = scores + tf.stop_gradient(1.0 - scores)
        routed_mask = None
        if mask is not None:
            routed_mask = batched_gather(mask, indices)
            if self.straight_through:
                scores = tf.where(routed_mask, scores, tf.zeros([], scores.dtype))
        routed = batched_gather(x, indices)
        if not has_route_dim:
            indices, scores, routed = indices[:, 0], scores[:, 0], routed[:, 0]
            routed_mask = None if routed_mask is None else routed_mask[:, 0]
        return RouterReturn(indices, scores, routed, routed_mask)

    def _routing_tokens(self, routing_tokens, x: tf.Tensor) -> tf.Tensor:
        if not self.learned_routing_tokens:
            if routing_tokens is not None:
                raise ValueError("routing_tokens are passed only with learned_routing_tokens=True")
            return tf.cast(self.routing_token, tf.float32)
        if routing_tokens is None:
            raise ValueError("learned_routing_tokens=True: pass routing_tokens [batch, dim] or [batch, r, dim]")
        t = tf.cast(tf.convert_to_tensor(routing_tokens), tf.float32)
        t = t[:, None] if t.shape.rank == 2 else t
        if t.shape.rank != 3 or t.shape[1:] != (self.num_routing_tokens, self.dim):
            raise ValueError(f"routing_tokens must be [batch, {self.dim}] or [batch, {self.num_routing_tokens}, "
                             f"{self.dim}], got shape {routing_tokens.shape}")  # fmt: skip
        return t

    def _scores(self, x32, tokens):
        """``s = x·tokenᵀ`` (cosine-sim routing: normalised, times the scale): ``x32 [B, m, d]``,
        ``tokens [r, d] | [B, r, d]`` → float32 ``[B, r, m]``."""
        if self.cosine_sim_routing:
            x32, tokens = _l2norm(x32), _l2norm(tokens)
        s = tf.einsum("bnd,rd->brn" if tokens.shape.rank == 2 else "bnd,brd->brn", x32, tokens)
        return s * self.cosine_sim_scale if self.cosine_sim_routing else s

    def _select(self, rows, row_mask, num_tokens, random_route):
        """Coordinate descent and selection on ``rows [R, m]`` (``row_mask [R, m]``) → ``indices [R, k]`` int32 and
        the coordinate-descent values there, float32 ``[R, k]``."""
        m = rows.shape[-1]
        c = coor_descent(rows, n_iters=self.n_iters, k=min(num_tokens * self.fetch_k_ratio, m), eps=self.eps,
                         eps_init=self.eps_init, eps_decay=self.eps_decay, mask=row_mask,
                         fused=self.use_triton)  # fmt: skip
        ranked = tf.random.uniform(tf.shape(rows)) if random_route else rows
        if row_mask is not None:
            ranked = tf.where(row_mask, ranked, tf.constant(-math.inf, ranked.dtype))
        _, idx = tf.math.top_k(tf.stop_gradient(ranked), num_tokens)
        return idx, tf.cast(tf.gather(c, idx, batch_dims=1), tf.float32)

    def _route(self, x32, mask, num_tokens, tokens, random_route):
        """``x32 [B, m, d]``, ``mask [B, m]``, ``tokens [r, d] | [B, r, d]`` → ``indices [B, r, k]`` int32,
        ``scores [B, r, k]`` float32 (coordinate-descent values at the selected tokens)."""
        m, r = x32.shape[1], self.num_routing_tokens
        num_tokens = min(num_tokens, m)
        rows = tf.reshape(self._scores(x32, tokens), [-1, m])  # routes folded into the batch: [B*r, m]
        row_mask = None if mask is None else tf.reshape(tf.repeat(mask[:, None], r, axis=1), [-1, m])
        idx, scores = self._select(rows, row_mask, num_tokens, random_route)
        shape = [-1, r, num_tokens]
        return tf.reshape(idx, shape), tf.reshape(scores, shape)

    def route_shared(self, x, *, num_tokens: int, masks, random_route: bool = False) -> RouterReturn:
        """``call(repeat(x, g), mask=masks)`` without the repeat: ``g`` routings of the same candidates
        ``x [b, n, d]`` that differ only in their masks ``masks`` bool ``[b, g, n]`` (e.g. one per query window
        of the autoregressive attention). → ``RouterReturn`` over ``b·g`` rows, as ``call`` on the repeated
        ``[b·g, n, d]`` (scores computed once per token; tokens gathered from x). No ``route_block_size``,
        learned routing tokens or no-routing path here: those go through ``call``."""
        b, n, g = tf.shape(x)[0], x.shape[1], masks.shape[1]
        r = self.num_routing_tokens
        if n <= num_tokens or self.route_block_size is not None or self.learned_routing_tokens:
            repeated = tf.reshape(tf.repeat(x[:, None], g, axis=1), [-1, n, x.shape[-1]])
            return self(repeated, num_tokens=num_tokens, mask=tf.reshape(masks, [-1, n]), random_route=random_route)
        num_tokens = checks.positive_int("num_tokens", num_tokens)
        s = self._scores(tf.cast(x, tf.float32), tf.cast(self.routing_token, tf.float32))  # [b, r, n]
        rows = tf.reshape(tf.broadcast_to(s[:, None], [b, g, r, n]), [-1, n])  # [b*g*r, n]
        row_mask = tf.reshape(tf.broadcast_to(masks[:, :, None], [b, g, r, n]), [-1, n])
        idx, scores = self._select(rows, row_mask, num_tokens, random_route)
        if self.straight_through:
            scores = scores + tf.stop_gradient(1.0 - scores)
        routed_mask = tf.gather(row_mask, idx, batch_dims=1)
        if self.straight_through:
            scores = tf.where(routed_mask, scores, tf.zeros([], scores.dtype))
        routed = batched_gather(x, tf.reshape(idx, [b, -1]))  # [b, g*r*k, d]
        shape = [-1, r, num_tokens] if r > 1 else [-1, num_tokens]
        routed = tf.reshape(routed, shape + [x.shape[-1]])
        return RouterReturn(tf.reshape(idx, shape), tf.reshape(scores, shape), routed, tf.reshape(routed_mask, shape))

    def _route_blocks(self, x32, mask, num_tokens, tokens, random_route):
        """Uniform routing over blocks of ``route_block_size`` (see the module docstring) → as ``_route``."""
        w, n, d, r = self.route_block_size, x32.shape[1], self.dim, self.num_routing_tokens
        full, tail = n // w, n % w
        per_block = -(-num_tokens // (full + (tail > 0)))
        batch = tf.shape(x32)[0]
        xb = tf.reshape(x32[:, : full * w], [-1, w, d])  # [b*full, w, d]
        mb = None if mask is None else tf.reshape(mask[:, : full * w], [-1, w])
        tb = tokens if tokens.shape.rank == 2 else tf.repeat(tokens, full, axis=0)
        idx, sc = self._route(xb, mb, per_block, tb, random_route)  # [b*full, r, kb]
        kb = idx.shape[-1]
        offsets = tf.constant(np.arange(full, dtype=np.int32) * w)[None, :, None, None]
        idx = tf.transpose(tf.reshape(idx, [batch, full, r, kb]) + offsets, [0, 2, 1, 3])
        sc = tf.transpose(tf.reshape(sc, [batch, full, r, kb]), [0, 2, 1, 3])
        idx, sc = tf.reshape(idx, [batch, r, full * kb]), tf.reshape(sc, [batch, r, full * kb])
        if tail:
            mt = None if mask is None else mask[:, full * w :]
            idx_t, sc_t = self._route(x32[:, full * w :], mt, per_block, tokens, random_route)
            idx, sc = tf.concat([idx, idx_t + full * w], -1), tf.concat([sc, sc_t], -1)
        return idx, sc

    def get_config(self) -> dict:
        return {
            **super().get_config(),
            "dim": self.dim,
            "straight_through": self.straight_through,
            "n_iters": self.n_iters,
            "fetch_k_ratio": self.fetch_k_ratio,
            "eps": self.eps,
            "eps_decay": self.eps_decay,
            "eps_init": self.eps_init,
            "num_routing_tokens": self.num_routing_tokens,
            "learned_routing_tokens": self.learned_routing_tokens,
            "use_triton": self.use_triton,
            "cosine_sim_routing": self.cosine_sim_routing,
            "cosine_sim_scale": self.cosine_sim_scale,
            "route_block_size": self.route_block_size,
            "triton_checkpoint_segments": self.triton_checkpoint_segments,
        }
