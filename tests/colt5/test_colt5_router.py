"""``CoordinateDescentRouter`` invariants and ``route_back``, against float64 NumPy computations."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
from colt5_reference import coor_descent as ref_cd
from conftest import f64, normal

from bsattn import CoordinateDescentRouter, route_back

DIM = 8


def _router(**kw) -> CoordinateDescentRouter:
    router = CoordinateDescentRouter(DIM, **kw)
    if router.routing_token is not None:
        rng = np.random.default_rng(7)
        router.routing_token.assign(rng.standard_normal(router.routing_token.shape))
    return router


def _mask(rng, b, n, p=0.3):
    m = rng.uniform(size=(b, n)) > p
    m[:, :2] = True
    return m


def _expected(x, tokens, k, mask=None, cosine=False, n_iters=20, eps=0.03, eps_init=4.0, eps_decay=0.7):
    """Per (b, r): the top-k of the scores (masked last, ties by index) and the coordinate-descent values."""
    x, tokens = f64(x), f64(tokens)
    if cosine:
        x = x / np.linalg.norm(x, axis=-1, keepdims=True)
        tokens = tokens / np.linalg.norm(tokens, axis=-1, keepdims=True)
    s = np.einsum("bnd,rd->brn", x, tokens) * (8 if cosine else 1)
    m = None if mask is None else np.broadcast_to(mask[:, None], s.shape)
    c = ref_cd(s, n_iters, min(k * 9 / 8, s.shape[-1]), eps, eps_init, eps_decay, m)
    ranked = s if m is None else np.where(m, s, -np.inf)
    idx = np.argsort(-ranked, axis=-1, kind="stable")[..., :k]
    return np.sort(idx, -1), c


@pytest.mark.parametrize("routes", [1, 3])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("cosine", [False, True])
def test_routes_the_top_tokens(rng, routes, masked, cosine):
    b, n, k = 2, 20, 5
    x = normal(rng, (b, n, DIM))
    mask = _mask(rng, b, n) if masked else None
    router = _router(num_routing_tokens=routes, cosine_sim_routing=cosine)
    out = router(x, num_tokens=k, mask=mask)
    shape = (b, routes, k) if routes > 1 else (b, k)
    assert out.indices.shape == shape and out.scores.shape == shape and out.routed_tokens.shape == shape + (DIM,)
    idx, c = _expected(x, router.routing_token.numpy(), k, mask, cosine)
    got = out.indices.numpy().reshape(b, routes, k)
    np.testing.assert_array_equal(np.sort(got, -1), idx)
    # the gathered tokens come from the same batch entry (the original's several-route gather does not)
    xs = x.numpy()
    tokens = out.routed_tokens.numpy().reshape(b, routes, k, DIM)
    for bi in range(b):
        np.testing.assert_array_equal(tokens[bi], xs[bi][got[bi]])
    scores = out.scores.numpy().reshape(b, routes, k)
    if masked:
        sel_mask = np.take_along_axis(np.broadcast_to(mask[:, None], (b, routes, n)), got, -1)
        np.testing.assert_array_equal(out.routed_mask.numpy().reshape(b, routes, k), sel_mask)
        assert np.all(scores[~sel_mask] == 0)
        np.testing.assert_allclose(scores[sel_mask], 1.0, atol=1e-7)
    else:
        assert out.routed_mask is None
        np.testing.assert_allclose(scores, 1.0, atol=1e-7)


def test_scores_without_straight_through_are_coordinate_descent_values(rng):
    x = normal(rng, (2, 16, DIM))
    router = _router(straight_through=False, num_routing_tokens=2)
    out = router(x, num_tokens=4)
    _, c = _expected(x, router.routing_token.numpy(), 4)
    np.testing.assert_allclose(out.scores.numpy(), np.take_along_axis(c, out.indices.numpy(), -1), atol=2e-4)


def test_gradients_reach_the_routing_tokens_and_x(rng):
    x = normal(rng, (2, 16, DIM))
    router = _router(num_routing_tokens=2, eps=0.5, eps_init=None, eps_decay=1.0)  # unsaturated: real gradients
    with tf.GradientTape() as tape:
        tape.watch(x)
        out = router(x, num_tokens=4)
        loss = tf.reduce_sum(out.scores * tf.reduce_sum(out.routed_tokens, -1))
    g_tok, g_x = tape.gradient(loss, [router.routing_token, x])
    assert np.abs(g_tok.numpy()).min() > 0 and np.all(np.isfinite(g_x.numpy()))


def test_route_folding_equals_one_router_per_routing_token(rng):
    x = normal(rng, (2, 18, DIM))
    many = _router(num_routing_tokens=3)
    out = many(x, num_tokens=4)
    for r in range(3):
        one = CoordinateDescentRouter(DIM)
        one.routing_token.assign(many.routing_token.numpy()[r : r + 1])
        single = one(x, num_tokens=4)
        np.testing.assert_array_equal(out.indices.numpy()[:, r], single.indices.numpy())
        np.testing.assert_allclose(out.routed_tokens.numpy()[:, r], single.routed_tokens.numpy())


def test_learned_routing_tokens_are_passed_per_batch(rng):
    x = normal(rng, (2, 12, DIM))
    owned = _router(num_routing_tokens=2)
    tokens = np.broadcast_to(owned.routing_token.numpy(), (2, 2, DIM))
    passed = CoordinateDescentRouter(DIM, num_routing_tokens=2, learned_routing_tokens=True)
    assert passed.routing_token is None and not passed.trainable_weights
    a, b = owned(x, num_tokens=3), passed(x, num_tokens=3, routing_tokens=tf.constant(tokens))
    np.testing.assert_array_equal(a.indices.numpy(), b.indices.numpy())
    with pytest.raises(ValueError, match="routing_tokens"):
        passed(x, num_tokens=3)


@pytest.mark.parametrize("keep_one", [False, True])
def test_no_routing_when_n_fits(rng, keep_one):
    x = normal(rng, (2, 6, DIM))
    mask = _mask(rng, 2, 6)
    out = _router()(x, num_tokens=6, mask=mask, keep_one_route_dim=keep_one)
    assert out.indices is None
    lead = (2, 1) if keep_one else (2,)
    np.testing.assert_array_equal(out.scores.numpy(), np.ones(lead + (6,)))
    tokens = np.broadcast_to(x.numpy().reshape(2, *([1] * keep_one), 6, DIM), lead + (6, DIM))
    np.testing.assert_array_equal(out.routed_tokens.numpy(), tokens)
    np.testing.assert_array_equal(out.routed_mask.numpy(), mask.reshape(lead + (6,)))


def test_route_block_size_routes_every_block_including_the_tail(rng):
    b, n, w, k = 2, 50, 16, 7  # 3 full blocks and a tail of 2: ceil(7 / 4) = 2 tokens per block
    x = normal(rng, (b, n, DIM))
    router = _router(route_block_size=w)
    out = router(x, num_tokens=k)
    idx = out.indices.numpy()
    assert idx.shape == (b, 8)
    s = np.einsum("bnd,rd->bn", f64(x), router.routing_token.numpy())
    for block, (lo, hi) in enumerate([(0, 16), (16, 32), (32, 48), (48, 50)]):
        got = idx[:, 2 * block : 2 * block + 2]
        assert np.all((got >= lo) & (got < hi))
        best = np.sort(np.argsort(-s[:, lo:hi], -1)[:, :2] + lo, -1)
        np.testing.assert_array_equal(np.sort(got, -1), best)
    np.testing.assert_array_equal(out.routed_tokens.numpy(), np.take_along_axis(x.numpy(), idx[..., None], 1))


def test_random_route_picks_unmasked_tokens(rng):
    x = normal(rng, (2, 30, DIM))
    mask = np.zeros((2, 30), bool)
    mask[:, ::3] = True
    out = _router()(x, num_tokens=6, mask=mask, random_route=True)
    idx = out.indices.numpy()
    assert np.all(mask[np.arange(2)[:, None], idx]) and all(len(set(r)) == 6 for r in idx)


def test_route_back_scatters_and_differentiates(rng):
    src = normal(rng, (2, 7, 3))
    routed = normal(rng, (2, 3, 3))
    idx = tf.constant([[0, 4, 6], [5, 1, 2]])
    with tf.GradientTape() as tape:
        tape.watch([src, routed])
        out = route_back(src, routed, idx)
        loss = tf.reduce_sum(out * np.arange(1.0, 8.0)[None, :, None])
    expected = src.numpy().copy()
    for bi in range(2):
        expected[bi, idx.numpy()[bi]] = routed.numpy()[bi]
    np.testing.assert_array_equal(out.numpy(), expected)
    g_src, g_routed = tape.gradient(loss, [src, routed])
    weights = np.arange(1.0, 8.0)
    np.testing.assert_array_equal(g_routed.numpy()[..., 0], weights[idx.numpy()])
    assert np.all(g_src.numpy()[0, [0, 4, 6]] == 0) and np.all(g_src.numpy()[0, 1] == 2)


@pytest.mark.parametrize(
    "call, name",
    [
        (dict(num_tokens=0), "num_tokens"),
        (dict(num_tokens=3, mask=np.ones((2, 5), bool)), "mask"),
    ],
)
def test_bad_call_arguments(rng, call, name):
    with pytest.raises(ValueError, match=name):
        _router()(normal(rng, (2, 9, DIM)), **call)


def test_bad_constructor_arguments():
    for kw, name in ((dict(fetch_k_ratio=0.5), "fetch_k_ratio"), (dict(n_iters=0), "n_iters"),
                     (dict(route_block_size=0), "route_block_size"), (dict(eps=-1.0), "eps")):  # fmt: skip
        with pytest.raises(ValueError, match=name):
            CoordinateDescentRouter(DIM, **kw)


@pytest.mark.parametrize("routes", [1, 2])
def test_route_shared_equals_routing_the_repeated_candidates(rng, routes):
    b, g, n = 2, 3, 15
    x = normal(rng, (b, n, DIM))
    masks = rng.uniform(size=(b, g, n)) > 0.4
    masks[..., :4] = True
    router = _router(num_routing_tokens=routes)
    shared = router.route_shared(x, num_tokens=5, masks=tf.constant(masks))
    repeated = tf.reshape(tf.repeat(x[:, None], g, axis=1), [-1, n, DIM])
    plain = router(repeated, num_tokens=5, mask=masks.reshape(-1, n))
    for a, c in zip(shared, plain):
        np.testing.assert_allclose(a.numpy(), c.numpy(), rtol=1e-6, atol=1e-7)


def test_fused_router_equals_the_unrolled_one_on_a_padded_batch(rng):
    """use_triton=True (bsattn's fused coordinate-descent op) on a batch whose second entry has fewer unmasked
    tokens than k: the same indices, scores and gradients as the unrolled loop."""
    x = tf.constant(normal(rng, (2, 24, DIM)), tf.float32)
    mask = np.ones((2, 24), bool)
    mask[1, 5:] = False  # 5 real tokens, k = 8 * 9 / 8 = 9 > 5
    results = []
    for use_triton in (False, True):
        router = _router(use_triton=use_triton)
        with tf.GradientTape() as tape:
            tape.watch(x)
            out = router(x, num_tokens=8, mask=mask)
            loss = tf.reduce_sum(out.scores)
        results.append((out.indices.numpy(), out.scores.numpy(), tape.gradient(loss, x).numpy()))
    np.testing.assert_array_equal(results[0][0], results[1][0])
    np.testing.assert_allclose(results[1][1], results[0][1], atol=2e-5)
    np.testing.assert_allclose(results[1][2], results[0][2], atol=2e-4)
