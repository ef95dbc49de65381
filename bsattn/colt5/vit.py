"""``ConditionalRoutedViT`` (the original's vit.py): channel-first images ``[b, channels, H, W]`` → logits
``[b, num_classes]``.

Patchify (``b c (h p1) (w p2) -> b h w (p1 p2 c)``) → LayerNorm → Dense → LayerNorm; plus a 2-D sin-cos position
embedding (temperature 10000; ``dim % 4 == 0``); ``depth`` x [``ConditionalRoutedImageAttention`` + residual,
``ConditionalRoutedFeedForward`` on the flattened tokens + residual]; mean pool → LayerNorm → Dense. Routers
default to ``eps = default_coor_descent_eps`` (1.0, "closer to speech") unless ``router_kwargs`` says otherwise.
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from bsattn import _checks as checks
from bsattn.colt5.layers import ConditionalRoutedFeedForward, ConditionalRoutedImageAttention, _Configured


def _pair(t) -> tuple[int, int]:
    return tuple(t) if isinstance(t, (tuple, list)) else (t, t)


def posemb_sincos_2d(h: int, w: int, dim: int, temperature: float = 10000.0) -> np.ndarray:
    """The original's 2-D sin-cos embedding → float32 ``[h, w, dim]`` (x sin, x cos, y sin, y cos)."""
    if dim % 4:
        raise ValueError(f"dim must be a multiple of 4 for the sin-cos position embedding, got {dim}")
    quarter = dim // 4
    y, x = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    omega = 1.0 / temperature ** (np.arange(quarter) / max(quarter - 1, 1))
    y, x = y.reshape(-1)[:, None] * omega[None], x.reshape(-1)[:, None] * omega[None]
    pe = np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], axis=1)
    return pe.reshape(h, w, dim).astype(np.float32)


@keras.saving.register_keras_serializable(package="bsattn")
class ConditionalRoutedViT(_Configured):
    """See the module docstring; attributes ``attn_layers`` and ``ff_layers``, ``to_patch_embedding`` parts
    ``patch_norm``, ``patch_proj``, ``embed_norm``, and ``head_norm``, ``head``."""

    def __init__(self, image_size, patch_size, num_classes: int, dim: int, depth: int, attn_num_heavy_tokens_q: int,
                 attn_num_heavy_tokens_kv: int, attn_heavy_dim_head: int, attn_heavy_heads: int,
                 attn_light_dim_head: int, attn_light_heads: int, attn_light_window_size: int,
                 ff_num_heavy_tokens: int, ff_heavy_mult: float, ff_light_mult: float, channels: int = 3,
                 router_straight_through: bool = True, router_kwargs: dict | None = None,
                 router_use_triton: bool = False, flash_attn: bool = True, attn_num_routed_kv: int = 1,
                 default_coor_descent_eps: float = 1.0, **kwargs):  # fmt: skip
        super().__init__(**kwargs)
        self._keep_config(image_size=image_size, patch_size=patch_size, num_classes=num_classes, dim=dim, depth=depth,
                          attn_num_heavy_tokens_q=attn_num_heavy_tokens_q,
                          attn_num_heavy_tokens_kv=attn_num_heavy_tokens_kv, attn_heavy_dim_head=attn_heavy_dim_head,
                          attn_heavy_heads=attn_heavy_heads, attn_light_dim_head=attn_light_dim_head,
                          attn_light_heads=attn_light_heads, attn_light_window_size=attn_light_window_size,
                          ff_num_heavy_tokens=ff_num_heavy_tokens, ff_heavy_mult=ff_heavy_mult,
                          ff_light_mult=ff_light_mult, channels=channels,
                          router_straight_through=router_straight_through, router_kwargs=router_kwargs or {},
                          router_use_triton=router_use_triton, flash_attn=flash_attn,
                          attn_num_routed_kv=attn_num_routed_kv,
                          default_coor_descent_eps=default_coor_descent_eps)  # fmt: skip
        (ih, iw), (ph, pw) = _pair(image_size), _pair(patch_size)
        for name, v in (("image_size", ih), ("image_size", iw), ("patch_size", ph), ("patch_size", pw)):
            checks.positive_int(name, v)
        if ih % ph or iw % pw:
            raise ValueError(f"image_size {(ih, iw)} must be divisible by patch_size {(ph, pw)}")
        self.image_size, self.patch_size = (ih, iw), (ph, pw)
        self.channels = checks.positive_int("channels", channels)
        self.dim = checks.positive_int("dim", dim)
        gh, gw = ih // ph, iw // pw
        if gh % attn_light_window_size or gw % attn_light_window_size:
            raise ValueError(f"the patch grid {(gh, gw)} must be a multiple of attn_light_window_size="
                             f"{attn_light_window_size}")  # fmt: skip
        self.pos_embedding = posemb_sincos_2d(gh, gw, self.dim)
        p = self.dtype_policy
        router_kwargs = {"eps": default_coor_descent_eps, **(router_kwargs or {})}
        self.patch_norm = keras.layers.LayerNormalization(epsilon=1e-5, name="patch_norm", dtype=p)
        self.patch_proj = keras.layers.Dense(self.dim, name="patch_proj", dtype=p)
        self.embed_norm = keras.layers.LayerNormalization(epsilon=1e-5, name="embed_norm", dtype=p)
        self.attn_layers, self.ff_layers = [], []
        for i in range(checks.positive_int("depth", depth)):
            attn = ConditionalRoutedImageAttention(
                dim, attn_num_heavy_tokens_q, attn_num_heavy_tokens_kv, num_routed_kv=attn_num_routed_kv,
                light_dim_head=attn_light_dim_head, light_heads=attn_light_heads,
                light_window_size=attn_light_window_size, heavy_dim_head=attn_heavy_dim_head,
                heavy_heads=attn_heavy_heads, router_straight_through=router_straight_through,
                router_kwargs=router_kwargs, use_triton=router_use_triton, use_flash_attn=flash_attn,
                channel_first=False, use_null_q_tokens=True, name=f"attn_{i}", dtype=p,
            )  # fmt: skip
            ff = ConditionalRoutedFeedForward(
                dim, ff_num_heavy_tokens, light_ff_mult=ff_light_mult, heavy_ff_mult=ff_heavy_mult,
                router_straight_through=router_straight_through, router_kwargs=router_kwargs,
                use_triton=router_use_triton, name=f"ff_{i}", dtype=p,
            )  # fmt: skip
            self.attn_layers.append(attn)
            self.ff_layers.append(ff)
        self.head_norm = keras.layers.LayerNormalization(epsilon=1e-5, name="head_norm", dtype=p)
        self.head = keras.layers.Dense(checks.positive_int("num_classes", num_classes), name="head", dtype=p)
        patch_dim = ph * pw * self.channels
        for layer, width in ((self.patch_norm, patch_dim), (self.patch_proj, patch_dim), (self.embed_norm, self.dim),
                             (self.head_norm, self.dim), (self.head, self.dim)):  # fmt: skip
            layer.build((None, width))

    def call(self, img):
        (ih, iw), (ph, pw), c = self.image_size, self.patch_size, self.channels
        if img.shape.rank != 4 or tuple(img.shape[1:]) != (c, ih, iw):
            raise ValueError(f"img must be [batch, {c}, {ih}, {iw}] (channel first), got shape {img.shape}")
        batch, gh, gw = tf.shape(img)[0], ih // ph, iw // pw
        x = tf.reshape(img, [batch, c, gh, ph, gw, pw])
        x = tf.reshape(tf.transpose(x, [0, 2, 4, 3, 5, 1]), [batch, gh, gw, ph * pw * c])  # (p1 p2 c)
        x = self.embed_norm(self.patch_proj(self.patch_norm(x)))
        x = x + tf.constant(self.pos_embedding, x.dtype)
        for attn, ff in zip(self.attn_layers, self.ff_layers):
            x = attn(x) + x
            flat = tf.reshape(x, [batch, gh * gw, self.dim])
            x = tf.reshape(ff(flat) + flat, [batch, gh, gw, self.dim])
        return self.head(self.head_norm(tf.reduce_mean(x, axis=[1, 2])))
