"""The CoLT5 Keras layers against float64 NumPy compositions of their weights; masks, routing, round trips."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf
from colt5_reference import feed_forward, heads, layer_norm, merge, rms_norm, softmax_attention
from conftest import f64, normal

from bsattn import (
    ConditionalRoutedAttention,
    ConditionalRoutedAutoregressiveAttention,
    ConditionalRoutedCrossAttention,
    ConditionalRoutedFeedForward,
    ConditionalRoutedImageAttention,
    ConditionalRoutedTransformerBlock,
    ConditionalRoutedViT,
    coor_descent,
)

DIM = 8
SMALL = dict(light_dim_head=4, light_heads=2, heavy_dim_head=4, heavy_heads=4)
SOFT = {"eps": 0.5, "eps_init": None, "eps_decay": 1.0}  # unsaturated router scores: real gradients


def w(v) -> np.ndarray:
    return f64(v.value if hasattr(v, "value") else v)


def _randomise(layer, rng):
    """Non-trivial weights everywhere (norm gains and biases included) so every weight is exercised."""
    for v in layer.weights:
        v.assign(rng.uniform(0.5, 1.5, v.shape) * rng.choice([-1.0, 1.0], v.shape) * (0.5 if len(v.shape) > 1 else 1))


def _ff_ref(ff, x):
    return feed_forward(x, w(ff.norm.gamma), w(ff.proj_in.kernel), w(ff.proj_in.bias), w(ff.proj_out.kernel),
                        w(ff.proj_out.bias))  # fmt: skip


def _light_ref(light, x, keep_tokens, mask=None, norm="layer"):
    """``keep_tokens [n, n]`` (query, key) and a key mask ``[b, n]``."""
    if norm == "layer":
        xn = layer_norm(x, w(light.norm.gamma), w(light.norm.beta))
    else:
        xn = rms_norm(x, w(light.norm.gamma))
    q, k, v = np.split(xn @ w(light.to_qkv.kernel), 3, -1)
    keep = keep_tokens[None, None]
    if mask is not None:
        keep = keep & mask[:, None, None, :]
    out = softmax_attention(heads(q, light.heads), heads(k, light.heads), heads(v, light.heads), keep)
    return merge(out) @ w(light.to_out.kernel)


def _heavy_ref(attn, xq, ctx, kv_mask=None):
    """``xq [b, i, dim]``, ``ctx [b, r, j, dim]``, ``kv_mask [b, r, j]``; scores 1."""
    h, dh = attn.heads, attn.dim_head
    gamma = w(attn.norm.gamma)
    q = heads(rms_norm(xq, gamma) @ w(attn.to_q.kernel), h)
    b, r, j, _ = ctx.shape
    kernel = w(attn.to_kv.kernel).reshape(DIM, r, h // r, 2 * dh)
    kv = np.einsum("brni,irhd->brhnd", rms_norm(ctx, gamma), kernel).reshape(b, h, j, 2 * dh)
    null = w(attn.null_kv)
    k = np.concatenate([np.broadcast_to(null[0][None, :, None], (b, h, 1, dh)), kv[..., :dh]], 2)
    v = np.concatenate([np.broadcast_to(null[1][None, :, None], (b, h, 1, dh)), kv[..., dh:]], 2)
    keep = np.ones((b, h, 1, j + 1), bool)
    if kv_mask is not None:
        keep[..., 1:] = np.repeat(kv_mask, h // r, axis=1)[:, :, None]
    return merge(softmax_attention(q, k, v, keep)) @ w(attn.to_out.kernel)


def _band(n, half):
    i = np.arange(n)
    return np.abs(i[:, None] - i[None, :]) <= half


def _mask(rng, b, n):
    m = rng.uniform(size=(b, n)) > 0.3
    m[:, :2] = True
    return m


# ---- feed-forward ------------------------------------------------------------------------------------------


def test_feed_forward_without_routing_is_light_plus_heavy_everywhere(rng):
    x = normal(rng, (2, 9, DIM))
    ff = ConditionalRoutedFeedForward(DIM, num_heavy_tokens=9)
    _randomise(ff, rng)
    got = ff(x).numpy()
    ref = _ff_ref(ff.light_ff, f64(x)) + _ff_ref(ff.heavy_ff, f64(x))
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def test_feed_forward_routes_heavy_tokens_only(rng):
    x = normal(rng, (2, 12, DIM))
    mask = _mask(rng, 2, 12)
    ff = ConditionalRoutedFeedForward(DIM, num_heavy_tokens=4)
    _randomise(ff, rng)
    got = ff(x, mask=mask).numpy()
    idx = ff.router(x, num_tokens=4, mask=mask).indices.numpy()
    light, heavy = _ff_ref(ff.light_ff, f64(x)), _ff_ref(ff.heavy_ff, f64(x))
    routed = np.zeros((2, 12), bool)
    routed[np.arange(2)[:, None], idx] = True
    ref = light + np.where((routed & mask)[..., None], heavy, 0.0)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


# ---- encoder attention -------------------------------------------------------------------------------------


@pytest.mark.parametrize("has_light", [True, False])
def test_attention_without_routing_matches_reference(rng, has_light):
    n = 13  # not a multiple of the fused op's block size
    x = normal(rng, (2, n, DIM))
    mask = _mask(rng, 2, n)
    layer = ConditionalRoutedAttention(DIM, num_heavy_tokens_q=n, num_heavy_tokens_kv=n, num_routed_kv=2,
                                       light_window_size=6, has_light_attn=has_light, **SMALL)  # fmt: skip
    _randomise(layer, rng)
    got = layer(x, mask=mask).numpy()
    xs = f64(x)
    ref = _heavy_ref(layer.heavy_attn, xs, np.repeat(xs[:, None], 2, 1), np.repeat(mask[:, None], 2, 1))
    if has_light:
        ref = ref + _light_ref(layer.light_attn, xs, _band(n, 3), mask)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())


def test_routed_attention_matches_reference_at_the_routed_queries(rng):
    n = 20
    x = normal(rng, (2, n, DIM))
    layer = ConditionalRoutedAttention(DIM, num_heavy_tokens_q=5, num_heavy_tokens_kv=6, num_routed_kv=2,
                                       light_window_size=8, **SMALL)  # fmt: skip
    _randomise(layer, rng)
    got = layer(x).numpy()
    q = layer.q_router(x, num_tokens=5).indices.numpy()
    kv = layer.kv_router(x, num_tokens=6).indices.numpy()  # [b, 2, 6]
    xs = f64(x)
    light = _light_ref(layer.light_attn, xs, _band(n, 4))
    xq = np.take_along_axis(xs, q[..., None], 1)
    ctx = np.stack([xs[b][kv[b]] for b in range(2)])
    heavy = _heavy_ref(layer.heavy_attn, xq, ctx)
    ref = light + w(layer.null_q_token)
    for b in range(2):
        ref[b, q[b]] = light[b, q[b]] + heavy[b]
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())


def test_gradients_reach_both_routers(rng):
    x = normal(rng, (2, 16, DIM))
    layer = ConditionalRoutedAttention(DIM, num_heavy_tokens_q=4, num_heavy_tokens_kv=5, num_routed_kv=2,
                                       light_window_size=4, router_kwargs=SOFT, multiply_keys_by_score=True,
                                       multiply_queries_by_score=True, rotary_emb=True, **SMALL)  # fmt: skip
    ff = ConditionalRoutedFeedForward(DIM, num_heavy_tokens=6, router_kwargs=SOFT)
    routers = (layer.q_router, layer.kv_router, ff.router)
    for router in routers:  # small scores: unsaturated (a saturated score has no gradient)
        router.routing_token.assign(0.1 * rng.standard_normal(router.routing_token.shape))
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(tf.square(ff(layer(x))))
    grads = tape.gradient(loss, [r.routing_token for r in routers])
    assert all(g is not None and np.abs(g.numpy()).max() > 0 for g in grads)


# ---- autoregressive ----------------------------------------------------------------------------------------


def test_autoregressive_light_branch_and_causality(rng):
    n, win = 21, 6
    x = normal(rng, (1, n, DIM))
    layer = ConditionalRoutedAutoregressiveAttention(DIM, num_heavy_tokens_q=win, num_heavy_tokens_kv=5,
                                                     light_window_size=win, rotary_emb=True, **SMALL)  # fmt: skip
    _randomise(layer, rng)
    got = layer(x).numpy()
    i = np.arange(n)
    keep = (i[None, :] <= i[:, None]) & (i[None, :] // win >= i[:, None] // win - 1)
    light = _light_ref(layer.light_attn, f64(x), keep)
    np.testing.assert_allclose(got[:, :win], light[:, :win], rtol=1e-4, atol=1e-5)  # window 0: light only
    assert np.abs(got[:, win:] - light[:, win:]).max() > 1e-3  # later windows get heavy outputs
    # every query routed (num_heavy_tokens_q >= window): strictly causal, token by token
    x2 = x.numpy().copy()
    x2[0, 14:] += 3.0
    got2 = layer(tf.constant(x2)).numpy()
    np.testing.assert_allclose(got2[:, :14], got[:, :14], rtol=1e-5, atol=1e-6)


def test_autoregressive_with_query_routing_keeps_the_first_window_light(rng):
    x = normal(rng, (2, 16, DIM))
    layer = ConditionalRoutedAutoregressiveAttention(DIM, num_heavy_tokens_q=2, num_heavy_tokens_kv=3,
                                                     light_window_size=4, heavy_window_size=5, num_routed_kv=2,
                                                     **SMALL)  # fmt: skip
    out = layer(x, random_route=True)
    assert out.shape == (2, 16, DIM)
    np.testing.assert_allclose(out.numpy()[:, :5], layer.light_attn(x).numpy()[:, :5], atol=1e-6)


# ---- cross attention ---------------------------------------------------------------------------------------


def test_cross_attention_without_routing_matches_reference(rng):
    x, ctx = normal(rng, (2, 5, DIM)), normal(rng, (2, 11, DIM)).numpy()
    cmask = _mask(rng, 2, 11)
    ctx[~cmask] = 1e3  # masked context tokens must not matter
    layer = ConditionalRoutedCrossAttention(DIM, num_tokens_q=5, num_tokens_kv=11, dim_head=4, heads=2)
    _randomise(layer, rng)
    got = layer(x, tf.constant(ctx), context_mask=cmask).numpy()
    ref = _heavy_ref(layer.heavy_attn, f64(x), ctx[:, None], cmask[:, None])
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())


def test_cross_attention_routes_queries_and_long_contexts(rng):
    x, ctx = normal(rng, (2, 10, DIM)), normal(rng, (2, 40, DIM))
    layer = ConditionalRoutedCrossAttention(DIM, num_tokens_q=4, num_tokens_kv=8, dim_head=4, heads=4,
                                            kv_routing_tokens=2, route_block_size=16)  # fmt: skip
    qmask = _mask(rng, 2, 10)
    out = layer(x, ctx, mask=qmask, context_mask=_mask(rng, 2, 40)).numpy()
    idx = layer.q_router(x, num_tokens=4, mask=qmask).indices.numpy()
    unrouted = np.ones((2, 10), bool)
    unrouted[np.arange(2)[:, None], idx] = False
    np.testing.assert_allclose(out[unrouted], np.broadcast_to(w(layer.null_q_token), out[unrouted].shape), rtol=1e-6)


# ---- image attention, block, ViT ---------------------------------------------------------------------------


def test_image_attention_matches_reference_and_channel_order(rng):
    b, hh, ww, win = 1, 4, 6, 2
    x = normal(rng, (b, hh, ww, DIM))
    layer = ConditionalRoutedImageAttention(DIM, num_heavy_tokens_q=24, num_heavy_tokens_kv=24,
                                            light_window_size=win, **SMALL)  # fmt: skip
    _randomise(layer, rng)
    got = layer(x).numpy()
    xs = f64(x)
    patches = xs.reshape(b, hh // win, win, ww // win, win, DIM).transpose(0, 1, 3, 2, 4, 5).reshape(-1, win * win, DIM)
    light = _light_ref(layer.light_attn, patches, np.ones((4, 4), bool), norm="rms")
    light = light.reshape(b, hh // win, ww // win, win, win, DIM).transpose(0, 1, 3, 2, 4, 5).reshape(b, hh, ww, DIM)
    flat = xs.reshape(b, hh * ww, DIM)
    heavy = _heavy_ref(layer.heavy_attn, flat, flat[:, None]).reshape(b, hh, ww, DIM)
    np.testing.assert_allclose(got, light + heavy, rtol=1e-4, atol=1e-5 * np.abs(got).max())
    cf = ConditionalRoutedImageAttention(DIM, num_heavy_tokens_q=24, num_heavy_tokens_kv=24, light_window_size=win,
                                         channel_first=True, **SMALL)  # fmt: skip
    cf.set_weights(layer.get_weights())
    np.testing.assert_allclose(cf(tf.transpose(x, [0, 3, 1, 2])).numpy(), got.transpose(0, 3, 1, 2), atol=1e-6)
    routed = ConditionalRoutedImageAttention(DIM, num_heavy_tokens_q=5, num_heavy_tokens_kv=7, light_window_size=win,
                                             **SMALL)  # fmt: skip
    assert routed(x, mask=np.ones((b, hh, ww), bool)).shape == x.shape
    with pytest.raises(ValueError, match="light_window_size"):
        layer(normal(rng, (1, 5, 6, DIM)))


def test_transformer_block_and_vit(rng):
    x = normal(rng, (2, 12, DIM))
    block = ConditionalRoutedTransformerBlock(DIM, num_heavy_attn_tokens_q=4, num_heavy_attn_tokens_kv=4,
                                              num_heavy_ff_tokens=5, light_window_size=4, **SMALL)  # fmt: skip
    mask = _mask(rng, 2, 12)
    h = block.conditional_attn(x, mask=mask) + x
    np.testing.assert_allclose(block(x, mask=mask).numpy(), (block.conditional_ff(h, mask=mask) + h).numpy(), atol=1e-5)
    vit = ConditionalRoutedViT(image_size=8, patch_size=2, num_classes=3, dim=DIM, depth=1, attn_num_heavy_tokens_q=5,
                               attn_num_heavy_tokens_kv=5, attn_heavy_dim_head=4, attn_heavy_heads=2,
                               attn_light_dim_head=4, attn_light_heads=2, attn_light_window_size=2,
                               ff_num_heavy_tokens=6, ff_heavy_mult=2, ff_light_mult=0.5)  # fmt: skip
    logits = vit(normal(rng, (2, 3, 8, 8)))
    assert logits.shape == (2, 3) and np.all(np.isfinite(logits.numpy()))
    assert vit.attn_layers[0].kv_router.eps == 1.0  # default_coor_descent_eps
    with pytest.raises(ValueError, match="img"):
        vit(normal(rng, (2, 8, 8, 3)))


# ---- serialisation, mixed precision, bad input -------------------------------------------------------------


def _models(rng):
    # 2 router iterations: the functional models trace every layer twice (build, load); the round trip is the point.
    # The block holds the feed-forward and the encoder attention.
    n, fast = 12, {**SOFT, "n_iters": 2}
    inp = keras.Input((n, DIM))
    layer = ConditionalRoutedTransformerBlock(DIM, num_heavy_attn_tokens_q=4, num_heavy_attn_tokens_kv=4,
                                              num_heavy_ff_tokens=4, num_routed_kv=2, light_window_size=4,
                                              router_kwargs=fast, **SMALL)  # fmt: skip
    yield "block", keras.Model(inp, layer(inp)), [normal(rng, (2, n, DIM))]
    layer = ConditionalRoutedAutoregressiveAttention(DIM, num_heavy_tokens_q=2, num_heavy_tokens_kv=3,
                                                     light_window_size=4, rotary_emb=True, router_kwargs=fast,
                                                     **SMALL)  # fmt: skip
    yield "ar", keras.Model(inp, layer(inp)), [normal(rng, (2, n, DIM))]
    ctx = keras.Input((20, DIM))
    layer = ConditionalRoutedCrossAttention(DIM, num_tokens_q=4, num_tokens_kv=6, dim_head=4, heads=2,
                                            router_kwargs=fast)  # fmt: skip
    yield "cross", keras.Model([inp, ctx], layer(inp, ctx)), [normal(rng, (2, n, DIM)), normal(rng, (2, 20, DIM))]
    img = keras.Input((4, 4, DIM))
    layer = ConditionalRoutedImageAttention(DIM, num_heavy_tokens_q=4, num_heavy_tokens_kv=4, light_window_size=2,
                                            router_kwargs=fast, **SMALL)  # fmt: skip
    yield "image", keras.Model(img, layer(img)), [normal(rng, (2, 4, 4, DIM))]


def test_keras_round_trip(rng, tmp_path):
    for name, model, inputs in _models(rng):
        inputs = inputs if len(inputs) > 1 else inputs[0]
        before = model(inputs).numpy()
        path = tmp_path / f"{name}.keras"
        model.save(path)
        loaded = keras.saving.load_model(path)
        np.testing.assert_allclose(loaded(inputs).numpy(), before, rtol=1e-6, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision(rng, policy):
    keras.utils.set_random_seed(int(rng.integers(1 << 30)))  # the weights too: a near-tie must not depend on test order
    x = normal(rng, (2, 16, DIM))
    kw = dict(num_heavy_attn_tokens_q=4, num_heavy_attn_tokens_kv=6, num_heavy_ff_tokens=5, light_window_size=4,
              num_routed_kv=2, router_kwargs={"n_iters": 5}, **SMALL)  # fmt: skip
    ref = ConditionalRoutedTransformerBlock(DIM, **kw)
    mixed = ConditionalRoutedTransformerBlock(DIM, dtype=policy, **kw)
    mixed.set_weights(ref.get_weights())
    with tf.GradientTape() as tape:
        out = mixed(x)
        loss = tf.reduce_sum(tf.cast(out, tf.float32) ** 2)
    assert out.dtype == keras.mixed_precision.Policy(policy).compute_dtype
    assert mixed.conditional_ff.router.routing_token.dtype == "float32"
    grads = tape.gradient(loss, mixed.trainable_variables)
    assert all(g is not None and np.all(np.isfinite(f64(g))) for g in grads)
    expected = ref(x).numpy()
    tol = 0.02 if policy == "mixed_float16" else 0.1
    close = np.abs(f64(out) - expected) <= tol * np.abs(expected).max()
    assert close.mean() > 0.95  # a near-tie in the routing may flip a token in reduced precision


def test_bad_layer_arguments(rng):
    with pytest.raises(ValueError, match="num_routed_kv"):
        ConditionalRoutedAttention(DIM, num_heavy_tokens_q=2, num_heavy_tokens_kv=2, num_routed_kv=3, **SMALL)
    with pytest.raises(ValueError, match="kv_routing_tokens"):
        ConditionalRoutedCrossAttention(DIM, num_tokens_q=2, num_tokens_kv=2, heads=4, kv_routing_tokens=3)
    with pytest.raises(ValueError, match="num_heavy_tokens"):
        ConditionalRoutedFeedForward(DIM, num_heavy_tokens=0)
    with pytest.raises(ValueError, match="mask"):
        ConditionalRoutedFeedForward(DIM, num_heavy_tokens=2)(normal(rng, (2, 6, DIM)), mask=np.ones((2, 5), bool))
    with pytest.raises(ValueError, match="patch_size"):
        ConditionalRoutedViT(image_size=9, patch_size=2, num_classes=3, dim=DIM, depth=1, attn_num_heavy_tokens_q=2,
                             attn_num_heavy_tokens_kv=2, attn_heavy_dim_head=4, attn_heavy_heads=2,
                             attn_light_dim_head=4, attn_light_heads=2, attn_light_window_size=2,
                             ff_num_heavy_tokens=2, ff_heavy_mult=2, ff_light_mult=0.5)  # fmt: skip


def test_layers_compile_under_xla(rng):
    x = normal(rng, (2, 20, DIM))
    fast = {**SOFT, "n_iters": 2}
    layer = ConditionalRoutedAutoregressiveAttention(DIM, num_heavy_tokens_q=2, num_heavy_tokens_kv=4, num_routed_kv=2,
                                                     light_window_size=8, rotary_emb=True, router_kwargs=fast,
                                                     **SMALL)  # fmt: skip
    compiled = tf.function(lambda t: layer(t), jit_compile=True)  # the light branch runs as gather_attention there
    np.testing.assert_allclose(compiled(x).numpy(), layer(x).numpy(), rtol=1e-5, atol=1e-5)
    # coor_descent with a per-row k tensor (the one XLA session of the suite)
    s, k = normal(rng, (4, 40)), tf.constant([3.0, 4.0, 5.0, 6.0])
    kw = dict(n_iters=4, eps=0.03, eps_init=4.0, eps_decay=0.7)
    fn = tf.function(lambda s, k: coor_descent(s, k=k, **kw), jit_compile=True)
    np.testing.assert_allclose(fn(s, k).numpy(), coor_descent(s, k=k, **kw).numpy(), atol=1e-5)


def test_autoregressive_heavy_branch_matches_reference(rng):
    n, win, n_q, n_kv = 22, 6, 2, 5  # 4 windows (the last one padded); queries of windows 1-3
    x = normal(rng, (2, n, DIM))
    layer = ConditionalRoutedAutoregressiveAttention(DIM, num_heavy_tokens_q=n_q, num_heavy_tokens_kv=n_kv,
                                                     num_routed_kv=2, light_window_size=win, **SMALL)  # fmt: skip
    _randomise(layer, rng)
    got = layer(x).numpy() - layer.light_attn(x).numpy()
    xs = np.pad(f64(x), [(0, 0), (0, 24 - n), (0, 0)])
    expected = np.zeros((2, 24, DIM))
    for m in range(1, 4):
        q = tf.constant(xs[:, m * win : (m + 1) * win], tf.float32)
        q_mask = np.broadcast_to(np.arange(m * win, (m + 1) * win) < n, (2, win))
        kv_mask = np.broadcast_to(np.arange(24) < m * win, (2, 24))
        iq = layer.q_router(q, num_tokens=n_q, mask=q_mask).indices.numpy()
        ikv = layer.kv_router(tf.constant(xs, tf.float32), num_tokens=n_kv, mask=kv_mask).indices.numpy()  # [2, 2, 5]
        xq = np.take_along_axis(xs[:, m * win : (m + 1) * win], iq[..., None], 1)
        ctx = np.stack([xs[b][ikv[b]] for b in range(2)])
        kv_keep = np.take_along_axis(np.broadcast_to(kv_mask[:, None], (2, 2, 24)), ikv, -1)
        heavy = _heavy_ref(layer.heavy_attn, xq, ctx, kv_keep)
        block = np.broadcast_to(w(layer.null_q_token), (2, win, DIM)).copy()
        for b in range(2):
            block[b, iq[b]] = heavy[b] * q_mask[b, iq[b]][:, None]
        expected[:, m * win : (m + 1) * win] = block
    np.testing.assert_allclose(got, expected[:, :n], rtol=1e-4, atol=1e-4 * np.abs(expected).max())
