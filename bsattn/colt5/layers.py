"""The CoLT5 layers (Keras 3), with the original's constructor arguments, defaults and attribute names.

Every layer sums a light branch that sees every token and a heavy branch that sees only routed tokens:

- ``ConditionalRoutedFeedForward``: ``light_ff`` on all tokens + ``heavy_ff`` on ``num_heavy_tokens`` routed by
  ``router``, times their scores, scattered back (zeros elsewhere). ``[b, n, dim]`` → same.
- ``ConditionalRoutedAttention``: light local attention (every token attends the keys within ``light_window_size
  // 2`` on both sides, an exact band on the fused op) + heavy attention of the queries routed by ``q_router``
  over the keys/values routed by ``kv_router`` (``num_routed_kv`` routes, heads split across them), times the
  query scores, scattered into a learned ``null_q_token`` (or zeros). ``[b, n, dim]`` → same.
- ``ConditionalRoutedAutoregressiveAttention``: causal. Light: each token sees from the start of the previous
  ``light_window_size`` window up to itself. Heavy: per window of ``heavy_window_size`` (from the second on), its
  routed queries attend keys routed from all strictly earlier windows.
- ``ConditionalRoutedCrossAttention``: heavy only, queries routed from x, keys/values from ``context``.
- ``ConditionalRoutedImageAttention``: ``[b, H, W, dim]`` (or channel-first); light full attention inside each
  ``light_window_size²`` patch, heavy over tokens routed from the whole map.
- ``ConditionalRoutedTransformerBlock``: ``x = attn(x) + x; x = ff(x) + x``.

``router_kwargs`` go to every ``CoordinateDescentRouter`` (its defaults: 20 iterations, eps 0.03, eps_init 4,
decay 0.7); ``use_triton`` selects bsattn's fused coordinate-descent op; ``use_flash_attn`` is accepted (the heavy
branch is dense TensorFlow attention; the light branch always runs on the fused op).
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from bsattn import _checks as checks
from bsattn.colt5.modules import FeedForward, HeavyAttention, LightAttention
from bsattn.colt5.router import CoordinateDescentRouter, route_back
from bsattn.patterns import Dense, SlidingWindow, WindowLookAround


def _router(dim, straight_through, router_kwargs, use_triton, policy, name, **fixed) -> CoordinateDescentRouter:
    kwargs = dict(router_kwargs or {})
    if use_triton:
        kwargs["use_triton"] = True
    kwargs.update(fixed)
    return CoordinateDescentRouter(dim, straight_through=straight_through, name=name, dtype=policy, **kwargs)


def _count(name: str, value, default: int) -> int:
    return checks.positive_int(name, default if value is None else value)


class _Configured(keras.layers.Layer):
    """Keeps the constructor arguments for ``get_config``."""

    def _keep_config(self, **config):
        self._config = {k: (dict(v) if isinstance(v, dict) else v) for k, v in config.items()}

    def build(self, input_shape=None):
        pass

    def compute_mask(self, inputs, mask=None):
        return None

    def get_config(self) -> dict:
        return {**super().get_config(), **self._config}


@keras.saving.register_keras_serializable(package="bsattn")
class ConditionalRoutedFeedForward(_Configured):
    """``call(x [b, n, dim], mask=None [b, n], num_heavy_tokens=None)`` → ``[b, n, dim]``."""

    def __init__(self, dim: int, num_heavy_tokens: int, light_ff_mult: float = 0.5, heavy_ff_mult: float = 4,
                 router_straight_through: bool = True, router_kwargs: dict | None = None, use_triton: bool = False,
                 **kwargs):  # fmt: skip
        super().__init__(**kwargs)
        self._keep_config(dim=dim, num_heavy_tokens=num_heavy_tokens, light_ff_mult=light_ff_mult,
                          heavy_ff_mult=heavy_ff_mult, router_straight_through=router_straight_through,
                          router_kwargs=router_kwargs or {}, use_triton=use_triton)  # fmt: skip
        self.dim = checks.positive_int("dim", dim)
        self.num_heavy_tokens = checks.positive_int("num_heavy_tokens", num_heavy_tokens)
        self.supports_masking = True
        p = self.dtype_policy
        self.router = _router(dim, router_straight_through, router_kwargs, use_triton, p, "router")
        self.light_ff = FeedForward(dim, light_ff_mult, name="light_ff", dtype=p)
        self.heavy_ff = FeedForward(dim, heavy_ff_mult, name="heavy_ff", dtype=p)

    def call(self, x, mask=None, num_heavy_tokens=None):
        light = self.light_ff(x)
        k = _count("num_heavy_tokens", num_heavy_tokens, self.num_heavy_tokens)
        indices, scores, routed, _ = self.router(x, num_tokens=k, mask=mask)
        heavy = self.heavy_ff(routed) * tf.cast(scores, light.dtype)[..., None]
        if indices is not None:
            heavy = route_back(tf.zeros_like(light), heavy, indices)
        return light + heavy


class _RoutedAttentionBase(_Configured):
    """The routers, the heavy attention, the null query token and the routed heavy branch."""

    def _build_heavy(self, dim, num_heavy_tokens_q, num_heavy_tokens_kv, num_routed_kv, heavy_dim_head, heavy_heads,
                     router_straight_through, router_kwargs, multiply_keys_by_score, multiply_queries_by_score,
                     use_triton, use_null_q_tokens, use_flash_attn, rotary_emb, kv_router_extra=None,
                     names=("heavy_heads", "num_routed_kv")):  # fmt: skip
        self.dim = checks.positive_int("dim", dim)
        self.num_heavy_tokens_q = checks.positive_int("num_heavy_tokens_q", num_heavy_tokens_q)
        self.num_heavy_tokens_kv = checks.positive_int("num_heavy_tokens_kv", num_heavy_tokens_kv)
        num_routed_kv = checks.positive_int(names[1], num_routed_kv)
        heavy_heads = checks.positive_int(names[0], heavy_heads)
        if heavy_heads % num_routed_kv:
            raise ValueError(f"{names[0]}={heavy_heads} must be divisible by {names[1]}={num_routed_kv} (the heads are "
                             "split evenly across the key/value routes)")  # fmt: skip
        self.multiply_queries_by_score = bool(multiply_queries_by_score)
        self.supports_masking = True
        p = self.dtype_policy
        self.q_router = _router(dim, router_straight_through, router_kwargs, use_triton, p, "q_router")
        self.kv_router = _router(dim, router_straight_through, router_kwargs, use_triton, p, "kv_router",
                                 num_routing_tokens=num_routed_kv, **(kv_router_extra or {}))  # fmt: skip
        self.heavy_attn = HeavyAttention(dim, heavy_dim_head, heavy_heads, multiply_keys_by_score, use_flash_attn,
                                         name="heavy_attn", dtype=p)  # fmt: skip
        self.null_q_token = None
        if use_null_q_tokens:
            self.null_q_token = self.add_weight(name="null_q_token", shape=(self.dim,),
                                                initializer=keras.initializers.RandomNormal(stddev=1.0))  # fmt: skip
        self.rotary_emb = bool(rotary_emb)

    def _heavy(self, xq, xkv, n_q, n_kv, q_mask=None, kv_mask=None, random_route=False, q_offset=None,
               kv_groups=None):  # fmt: skip
        """Routed heavy attention of ``xq [B, i, dim]`` over ``xkv [B, j, dim]`` → ``[B, i, dim]``.

        ``q_offset`` (int ``[B]``): added to the query positions for rotary (their absolute positions).
        ``kv_groups``: ``xkv [b, j, dim]`` is shared by ``kv_groups`` consecutive rows of ``xq`` (``B = b·groups``)
        and ``kv_mask [b, groups, j]`` says which keys each row may route (``CoordinateDescentRouter.route_shared``)."""
        idx_q, sc_q, tok_q, _ = self.q_router(xq, num_tokens=n_q, mask=q_mask, random_route=random_route)
        if kv_groups is None:
            idx_kv, sc_kv, tok_kv, m_kv = self.kv_router(xkv, num_tokens=n_kv, mask=kv_mask,
                                                         random_route=random_route)  # fmt: skip
        else:
            idx_kv, sc_kv, tok_kv, m_kv = self.kv_router.route_shared(xkv, num_tokens=n_kv, masks=kv_mask,
                                                                      random_route=random_route)  # fmt: skip
        positions = None
        if self.rotary_emb:
            batch = tf.shape(xq)[0]
            q_pos = idx_q if idx_q is not None else tf.broadcast_to(tf.range(xq.shape[1]), [batch, xq.shape[1]])
            if q_offset is not None:
                q_pos = q_pos + tf.cast(q_offset, q_pos.dtype)[:, None]
            k_pos = idx_kv
            if k_pos is None:
                k_pos = tf.broadcast_to(tf.range(tok_kv.shape[-2]), tf.shape(tok_kv)[:-1])
            positions = (q_pos, k_pos)
        out = self.heavy_attn(tok_q, context=tok_kv, mask=m_kv, scores_kv=sc_kv,
                              scores_q=sc_q if self.multiply_queries_by_score else None,
                              positions=positions)  # fmt: skip
        out = out * tf.cast(sc_q, out.dtype)[..., None]
        if idx_q is None:
            return out
        if self.null_q_token is not None:
            base = tf.broadcast_to(tf.cast(self.null_q_token, out.dtype), tf.shape(xq))
        else:
            base = tf.zeros(tf.shape(xq), out.dtype)
        return route_back(base, out, idx_q)


@keras.saving.register_keras_serializable(package="bsattn")
class ConditionalRoutedAttention(_RoutedAttentionBase):
    """``call(x [b, n, dim], num_heavy_tokens_q=None, num_heavy_tokens_kv=None, mask=None [b, n])`` →
    ``[b, n, dim]``."""

    def __init__(self, dim: int, num_heavy_tokens_q: int, num_heavy_tokens_kv: int, num_routed_kv: int = 1,
                 has_light_attn: bool = True, light_dim_head: int = 64, light_heads: int = 8,
                 light_window_size: int = 128, heavy_dim_head: int = 64, heavy_heads: int = 8,
                 router_straight_through: bool = True, router_kwargs: dict | None = None,
                 multiply_keys_by_score: bool = False, multiply_queries_by_score: bool = False,
                 use_triton: bool = False, use_null_q_tokens: bool = True, use_flash_attn: bool = False,
                 rotary_emb: bool = False, **kwargs):  # fmt: skip
        super().__init__(**kwargs)
        self._keep_config(dim=dim, num_heavy_tokens_q=num_heavy_tokens_q, num_heavy_tokens_kv=num_heavy_tokens_kv,
                          num_routed_kv=num_routed_kv, has_light_attn=has_light_attn, light_dim_head=light_dim_head,
                          light_heads=light_heads, light_window_size=light_window_size, heavy_dim_head=heavy_dim_head,
                          heavy_heads=heavy_heads, router_straight_through=router_straight_through,
                          router_kwargs=router_kwargs or {}, multiply_keys_by_score=multiply_keys_by_score,
                          multiply_queries_by_score=multiply_queries_by_score, use_triton=use_triton,
                          use_null_q_tokens=use_null_q_tokens, use_flash_attn=use_flash_attn,
                          rotary_emb=rotary_emb)  # fmt: skip
        self.has_light_attn = bool(has_light_attn)
        self.light_window_size = checks.positive_int("light_window_size", light_window_size)
        half = self.light_window_size // 2
        self.light_attn = None
        if self.has_light_attn:
            self.light_attn = LightAttention(dim, light_dim_head, light_heads, SlidingWindow(half, half), "layer",
                                             name="light_attn", dtype=self.dtype_policy)  # fmt: skip
        self._build_heavy(dim, num_heavy_tokens_q, num_heavy_tokens_kv, num_routed_kv, heavy_dim_head, heavy_heads,
                          router_straight_through, router_kwargs, multiply_keys_by_score, multiply_queries_by_score,
                          use_triton, use_null_q_tokens, use_flash_attn, rotary_emb)  # fmt: skip

    def call(self, x, num_heavy_tokens_q=None, num_heavy_tokens_kv=None, mask=None):
        n_q = _count("num_heavy_tokens_q", num_heavy_tokens_q, self.num_heavy_tokens_q)
        n_kv = _count("num_heavy_tokens_kv", num_heavy_tokens_kv, self.num_heavy_tokens_kv)
        heavy = self._heavy(x, x, n_q, n_kv, mask, mask)
        if self.light_attn is None:
            return heavy
        return self.light_attn(x, mask=mask) + heavy


@keras.saving.register_keras_serializable(package="bsattn")
class ConditionalRoutedAutoregressiveAttention(_RoutedAttentionBase):
    """``call(x [b, n, dim], num_heavy_tokens_q=None, num_heavy_tokens_kv=None, random_route=False)`` → same.

    Causal up to the query routing: which queries of a heavy window are routed is a top-k over the whole window,
    so whether token p gets its heavy output (or the null token) depends on later tokens of its window, as in the
    original. Rotary embeddings use the queries' absolute positions (the original uses their offsets inside the
    window for the queries but absolute positions for the keys).
    """

    def __init__(self, dim: int, num_heavy_tokens_q: int, num_heavy_tokens_kv: int, num_routed_kv: int = 1,
                 light_dim_head: int = 64, light_heads: int = 8, light_window_size: int = 128,
                 heavy_window_size: int | None = None, heavy_dim_head: int = 64, heavy_heads: int = 8,
                 router_straight_through: bool = True, router_kwargs: dict | None = None,
                 multiply_keys_by_score: bool = False, multiply_queries_by_score: bool = False,
                 use_triton: bool = False, use_null_q_tokens: bool = True, use_flash_attn: bool = False,
                 rotary_emb: bool = False, **kwargs):  # fmt: skip
        super().__init__(**kwargs)
        self._keep_config(dim=dim, num_heavy_tokens_q=num_heavy_tokens_q, num_heavy_tokens_kv=num_heavy_tokens_kv,
                          num_routed_kv=num_routed_kv, light_dim_head=light_dim_head, light_heads=light_heads,
                          light_window_size=light_window_size, heavy_window_size=heavy_window_size,
                          heavy_dim_head=heavy_dim_head, heavy_heads=heavy_heads,
                          router_straight_through=router_straight_through, router_kwargs=router_kwargs or {},
                          multiply_keys_by_score=multiply_keys_by_score,
                          multiply_queries_by_score=multiply_queries_by_score, use_triton=use_triton,
                          use_null_q_tokens=use_null_q_tokens, use_flash_attn=use_flash_attn,
                          rotary_emb=rotary_emb)  # fmt: skip
        self.light_window_size = checks.positive_int("light_window_size", light_window_size)
        self.heavy_window_size = checks.positive_int(
            "heavy_window_size", self.light_window_size if heavy_window_size is None else heavy_window_size
        )
        self.light_attn = LightAttention(dim, light_dim_head, light_heads,
                                         WindowLookAround(self.light_window_size, 1, 0, causal=True), "layer",
                                         name="light_attn", dtype=self.dtype_policy)  # fmt: skip
        self._build_heavy(dim, num_heavy_tokens_q, num_heavy_tokens_kv, num_routed_kv, heavy_dim_head, heavy_heads,
                          router_straight_through, router_kwargs, multiply_keys_by_score, multiply_queries_by_score,
                          use_triton, use_null_q_tokens, use_flash_attn, rotary_emb)  # fmt: skip

    def call(self, x, num_heavy_tokens_q=None, num_heavy_tokens_kv=None, random_route=False):
        n_q = _count("num_heavy_tokens_q", num_heavy_tokens_q, self.num_heavy_tokens_q)
        n_kv = _count("num_heavy_tokens_kv", num_heavy_tokens_kv, self.num_heavy_tokens_kv)
        light = self.light_attn(x)
        n, w, d = x.shape[1], self.heavy_window_size, self.dim
        windows = -(-n // w)
        if windows < 2:  # only the first window: no earlier keys, no heavy output (as the original)
            return light
        padded = windows * w
        batch = tf.shape(x)[0]
        xp = tf.pad(x, [[0, 0], [0, padded - n], [0, 0]])
        q = tf.reshape(tf.reshape(xp, [batch, windows, w, d])[:, 1:], [-1, w, d])  # [b*(N-1), w, d]
        q_mask = np.arange(padded).reshape(windows, w)[1:] < n  # [N-1, w]
        q_mask = tf.reshape(tf.tile(tf.constant(q_mask)[None], [batch, 1, 1]), [-1, w])
        # Every query window routes its keys from the whole padded sequence, masked to the earlier windows: one
        # set of candidates shared by the N-1 windows (scored once, never repeated).
        kv_mask = np.arange(padded)[None, :] // w < np.arange(1, windows)[:, None]  # key window < query window
        kv_mask = tf.tile(tf.constant(kv_mask)[None], [batch, 1, 1])  # [b, N-1, padded]
        offsets = tf.tile(tf.range(1, windows) * w, [batch])
        heavy = self._heavy(q, xp, n_q, n_kv, q_mask, kv_mask, random_route, q_offset=offsets,
                            kv_groups=windows - 1)  # fmt: skip
        heavy = tf.reshape(heavy, [batch, (windows - 1) * w, d])[:, : n - w]
        return light + tf.pad(heavy, [[0, 0], [w, 0], [0, 0]])


@keras.saving.register_keras_serializable(package="bsattn")
class ConditionalRoutedCrossAttention(_RoutedAttentionBase):
    """``call(x [b, i, dim], context [b, j, dim], num_tokens_q=None, num_tokens_kv=None, mask=None [b, i],
    context_mask=None [b, j])`` → ``[b, i, dim]`` (heavy branch only; the original raises NameError at HEAD).

    ``kv_routing_tokens`` routes that many key/value sets (heads split across them); ``num_sets_kv``, unused by
    the original, is the same setting here (give one of the two, or equal values).
    """

    def __init__(self, dim: int, num_tokens_q: int, num_tokens_kv: int, num_sets_kv: int = 1, dim_head: int = 64,
                 heads: int = 8, router_straight_through: bool = True, router_kwargs: dict | None = None,
                 kv_routing_tokens: int = 1, multiply_keys_by_score: bool = False, use_triton: bool = False,
                 use_null_q_tokens: bool = True, use_flash_attn: bool = False, route_block_size: int | None = None,
                 **kwargs):  # fmt: skip
        super().__init__(**kwargs)
        self._keep_config(dim=dim, num_tokens_q=num_tokens_q, num_tokens_kv=num_tokens_kv, num_sets_kv=num_sets_kv,
                          dim_head=dim_head, heads=heads, router_straight_through=router_straight_through,
                          router_kwargs=router_kwargs or {}, kv_routing_tokens=kv_routing_tokens,
                          multiply_keys_by_score=multiply_keys_by_score, use_triton=use_triton,
                          use_null_q_tokens=use_null_q_tokens, use_flash_attn=use_flash_attn,
                          route_block_size=route_block_size)  # fmt: skip
        sets = checks.positive_int("num_sets_kv", num_sets_kv)
        routes = checks.positive_int("kv_routing_tokens", kv_routing_tokens)
        if sets > 1 and routes > 1 and sets != routes:
            raise ValueError(f"num_sets_kv={sets} and kv_routing_tokens={routes} name the same setting; give one")
        self.num_tokens_q, self.num_tokens_kv = num_tokens_q, num_tokens_kv
        self._build_heavy(dim, num_tokens_q, num_tokens_kv, max(sets, routes), dim_head, heads,
                          router_straight_through, router_kwargs, multiply_keys_by_score, False, use_triton,
                          use_null_q_tokens, use_flash_attn, False,
                          kv_router_extra={"route_block_size": route_block_size},
                          names=("heads", "kv_routing_tokens" if routes >= sets else "num_sets_kv"))  # fmt: skip

    def call(self, x, context, num_tokens_q=None, num_tokens_kv=None, mask=None, context_mask=None):
        if context.shape.rank != 3 or context.shape[-1] != self.dim:
            raise ValueError(f"context must be [batch, length, {self.dim}], got shape {context.shape}")
        n_q = _count("num_tokens_q", num_tokens_q, self.num_heavy_tokens_q)
        n_kv = _count("num_tokens_kv", num_tokens_kv, self.num_heavy_tokens_kv)
        return self._heavy(x, tf.cast(context, x.dtype), n_q, n_kv, mask, context_mask)


@keras.saving.register_keras_serializable(package="bsattn")
class ConditionalRoutedImageAttention(_RoutedAttentionBase):
    """``call(x [b, H, W, dim] (or [b, dim, H, W] with channel_first), num_heavy_tokens_q=None,
    num_heavy_tokens_kv=None, mask=None [b, H, W])`` → the shape of x.

    Light: full attention (RMSNorm pre-norm) inside each ``light_window_size x light_window_size`` patch (H, W
    multiples of it). Heavy: tokens routed from the whole map (``route_per_window=True``: per patch, as the
    original does, which makes the heavy branch as local as the light one).
    """

    def __init__(self, dim: int, num_heavy_tokens_q: int, num_heavy_tokens_kv: int, num_routed_kv: int = 1,
                 light_dim_head: int = 64, light_heads: int = 8, light_window_size: int = 128,
                 heavy_dim_head: int = 64, heavy_heads: int = 8, router_straight_through: bool = True,
                 router_kwargs: dict | None = None, multiply_keys_by_score: bool = False,
                 multiply_queries_by_score: bool = False, use_triton: bool = False, use_null_q_tokens: bool = True,
                 use_flash_attn: bool = False, channel_first: bool = False, route_per_window: bool = False,
                 **kwargs):  # fmt: skip
        super().__init__(**kwargs)
        self._keep_config(dim=dim, num_heavy_tokens_q=num_heavy_tokens_q, num_heavy_tokens_kv=num_heavy_tokens_kv,
                          num_routed_kv=num_routed_kv, light_dim_head=light_dim_head, light_heads=light_heads,
                          light_window_size=light_window_size, heavy_dim_head=heavy_dim_head,
                          heavy_heads=heavy_heads, router_straight_through=router_straight_through,
                          router_kwargs=router_kwargs or {}, multiply_keys_by_score=multiply_keys_by_score,
                          multiply_queries_by_score=multiply_queries_by_score, use_triton=use_triton,
                          use_null_q_tokens=use_null_q_tokens, use_flash_attn=use_flash_attn,
                          channel_first=channel_first, route_per_window=route_per_window)  # fmt: skip
        self.channel_first = bool(channel_first)
        self.route_per_window = bool(route_per_window)
        self.light_window_size = checks.positive_int("light_window_size", light_window_size)
        self.light_attn = LightAttention(dim, light_dim_head, light_heads, Dense(), "rms", name="light_attn",
                                         dtype=self.dtype_policy)  # fmt: skip
        self._build_heavy(dim, num_heavy_tokens_q, num_heavy_tokens_kv, num_routed_kv, heavy_dim_head, heavy_heads,
                          router_straight_through, router_kwargs, multiply_keys_by_score, multiply_queries_by_score,
                          use_triton, use_null_q_tokens, use_flash_attn, False)  # fmt: skip

    def call(self, x, num_heavy_tokens_q=None, num_heavy_tokens_kv=None, mask=None):
        if x.shape.rank != 4:
            raise ValueError(f"x must be a 4-D feature map, got shape {x.shape}")
        if self.channel_first:
            x = tf.transpose(x, [0, 2, 3, 1])
        _, hh, ww, d = x.shape
        w = self.light_window_size
        if d != self.dim or hh is None or ww is None or hh % w or ww % w:
            raise ValueError(f"x must be [batch, H, W, {self.dim}] (channels last unless channel_first) with H and W "
                             f"multiples of light_window_size={w}, got {x.shape}")  # fmt: skip
        n_q = _count("num_heavy_tokens_q", num_heavy_tokens_q, self.num_heavy_tokens_q)
        n_kv = _count("num_heavy_tokens_kv", num_heavy_tokens_kv, self.num_heavy_tokens_kv)
        batch = tf.shape(x)[0]
        if mask is not None:
            mask = tf.convert_to_tensor(mask)
            if mask.shape.rank != 3 or not mask.shape[1:].is_compatible_with([hh, ww]):
                raise ValueError(f"mask must be [batch, {hh}, {ww}], got shape {mask.shape}")
            mask = tf.cast(mask, tf.bool)

        def to_windows(t):  # [b, H, W, ...] -> [b*nh*nw, w*w, ...]
            extra = t.shape[3:].as_list()
            t = tf.reshape(t, [batch, hh // w, w, ww // w, w] + extra)
            t = tf.transpose(t, [0, 1, 3, 2, 4] + list(range(5, 5 + len(extra))))
            return tf.reshape(t, [-1, w * w] + extra)

        def from_windows(t):
            t = tf.reshape(t, [batch, hh // w, ww // w, w, w, d])
            return tf.reshape(tf.transpose(t, [0, 1, 3, 2, 4, 5]), [batch, hh, ww, d])

        xw = to_windows(x)
        mw = None if mask is None else to_windows(mask[..., None])[..., 0]
        out = from_windows(self.light_attn(xw, mask=mw))
        if self.route_per_window:
            out = out + from_windows(self._heavy(xw, xw, n_q, n_kv, mw, mw))
        else:
            flat = tf.reshape(x, [batch, hh * ww, d])
            mflat = None if mask is None else tf.reshape(mask, [batch, hh * ww])
            out = out + tf.reshape(self._heavy(flat, flat, n_q, n_kv, mflat, mflat), [batch, hh, ww, d])
        return tf.transpose(out, [0, 3, 1, 2]) if self.channel_first else out


@keras.saving.register_keras_serializable(package="bsattn")
class ConditionalRoutedTransformerBlock(_Configured):
    """``call(x [b, n, dim], mask=None, num_heavy_attn_tokens_q=None, num_heavy_attn_tokens_kv=None,
    num_heavy_ff_tokens=None)`` → ``[b, n, dim]``: ``x = conditional_attn(x) + x; x = conditional_ff(x) + x``."""

    def __init__(self, dim: int, num_heavy_attn_tokens_q: int, num_heavy_attn_tokens_kv: int,
                 num_heavy_ff_tokens: int, num_routed_kv: int = 1, light_dim_head: int = 64, light_heads: int = 8,
                 light_window_size: int = 128, heavy_dim_head: int = 64, heavy_heads: int = 8,
                 light_ff_mult: float = 0.5, heavy_ff_mult: float = 4, router_straight_through: bool = True,
                 router_kwargs: dict | None = None, multiply_keys_by_score: bool = False,
                 multiply_queries_by_score: bool = False, use_triton: bool = False, use_null_q_tokens: bool = True,
                 use_flash_attn: bool = False, **kwargs):  # fmt: skip
        super().__init__(**kwargs)
        self._keep_config(dim=dim, num_heavy_attn_tokens_q=num_heavy_attn_tokens_q,
                          num_heavy_attn_tokens_kv=num_heavy_attn_tokens_kv, num_heavy_ff_tokens=num_heavy_ff_tokens,
                          num_routed_kv=num_routed_kv, light_dim_head=light_dim_head, light_heads=light_heads,
                          light_window_size=light_window_size, heavy_dim_head=heavy_dim_head, heavy_heads=heavy_heads,
                          light_ff_mult=light_ff_mult, heavy_ff_mult=heavy_ff_mult,
                          router_straight_through=router_straight_through, router_kwargs=router_kwargs or {},
                          multiply_keys_by_score=multiply_keys_by_score,
                          multiply_queries_by_score=multiply_queries_by_score, use_triton=use_triton,
                          use_null_q_tokens=use_null_q_tokens, use_flash_attn=use_flash_attn)  # fmt: skip
        self.supports_masking = True
        p = self.dtype_policy
        self.conditional_ff = ConditionalRoutedFeedForward(
            dim, num_heavy_ff_tokens, light_ff_mult, heavy_ff_mult, router_straight_through, router_kwargs,
            use_triton, name="conditional_ff", dtype=p,
        )  # fmt: skip
        self.conditional_attn = ConditionalRoutedAttention(
            dim, num_heavy_attn_tokens_q, num_heavy_attn_tokens_kv, num_routed_kv, True, light_dim_head, light_heads,
            light_window_size, heavy_dim_head, heavy_heads, router_straight_through, router_kwargs,
            multiply_keys_by_score, multiply_queries_by_score, use_triton, use_null_q_tokens, use_flash_attn,
            name="conditional_attn", dtype=p,
        )  # fmt: skip

    def call(self, x, mask=None, num_heavy_attn_tokens_q=None, num_heavy_attn_tokens_kv=None,
             num_heavy_ff_tokens=None):  # fmt: skip
        x = self.conditional_attn(x, num_heavy_attn_tokens_q, num_heavy_attn_tokens_kv, mask=mask) + x
        return self.conditional_ff(x, mask=mask, num_heavy_tokens=num_heavy_ff_tokens) + x
