"""``coor_descent`` and ``topk`` against float64 NumPy references (forward, finite-difference gradients)."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
from colt5_reference import coor_descent as ref_cd
from colt5_reference import finite_difference
from conftest import f64, normal

from bsattn import coor_descent, topk

# (n_iters, eps, eps_init, eps_decay): the router defaults, converged, topk's default, a plain schedule
SCHEDULES = {
    "router": (20, 0.03, 4.0, 0.7),
    "converged": (50, 1.0, None, 1.0),
    "topk": (20, 0.1, None, 1.0),
    "decay": (8, 0.2, 1.0, 0.8),
}


def _mask(rng, shape, p=0.3):
    mask = rng.uniform(size=shape) > p
    mask[..., 0] = True
    return mask


@pytest.mark.parametrize("schedule", sorted(SCHEDULES))
@pytest.mark.parametrize("shape", [(5, 24), (2, 3, 17)])
@pytest.mark.parametrize("per_row_k, masked", [(False, False), (True, True), (False, True)])
def test_forward_matches_reference(rng, schedule, shape, per_row_k, masked):
    n_iters, eps, eps_init, decay = SCHEDULES[schedule]
    s = normal(rng, shape, tf.float64)
    k = rng.uniform(1.5, 6.0, shape[:-1]) if per_row_k else 4.5
    mask = _mask(rng, shape) if masked else None
    kw = dict(n_iters=n_iters, eps=eps, eps_init=eps_init, eps_decay=decay)
    ref = ref_cd(f64(s), k=k, mask=mask, **kw)
    k_t = tf.constant(k) if per_row_k else k
    got64 = coor_descent(s, k=k_t, mask=mask, **kw)
    assert got64.dtype == tf.float64
    np.testing.assert_allclose(got64.numpy(), ref, rtol=0, atol=1e-11)
    got32 = coor_descent(tf.cast(s, tf.float32), k=k_t, mask=mask, **kw)
    assert got32.dtype == tf.float32
    np.testing.assert_allclose(got32.numpy(), ref, rtol=0, atol=2e-4)
    if masked:
        assert np.all(got64.numpy()[~mask] == 0)


def test_converged_row_sums_and_saturation(rng):
    s = normal(rng, (4, 64), tf.float64)
    y = coor_descent(s, n_iters=50, k=8.0, eps=1.0).numpy()
    np.testing.assert_allclose(y.sum(-1), 8.0, atol=1e-9)
    assert y.max() <= 1.0 + 1e-12 and y.min() > 0


def test_reduced_precision_inputs_compute_in_float32(rng):
    """16-bit s: computed in float32, returned in s's dtype (as the original), both paths alike: within one
    rounding of the output dtype of the float64 iteration (16-bit arithmetic over 20 iterations would be far off)."""
    s = normal(rng, (3, 32), tf.float32)
    for dtype, rounding in ((tf.float16, 2.0**-11), (tf.bfloat16, 2.0**-8)):
        x = tf.cast(s, dtype)
        ref = ref_cd(f64(x), 20, 5.0, eps=0.1)
        for fused in (False, True):
            y = coor_descent(x, n_iters=20, k=5.0, eps=0.1, fused=fused)
            assert y.dtype == dtype
            np.testing.assert_allclose(f64(y), ref, rtol=rounding, atol=2e-4)


@pytest.mark.parametrize("schedule, masked", [("router", True), ("converged", False), ("decay", True)])
def test_gradients_match_finite_differences(rng, schedule, masked):
    n_iters, eps, eps_init, decay = SCHEDULES[schedule]
    eps = max(eps, 0.3)  # a smooth enough map for central differences (the iteration is the same)
    kw = dict(n_iters=n_iters, eps=eps, eps_init=eps_init, eps_decay=decay)
    shape = (2, 2, 7)
    s = f64(normal(rng, shape, tf.float64))
    k = rng.uniform(1.5, 3.0, shape[:-1])
    mask = _mask(rng, shape) if masked else None
    cot = f64(normal(rng, shape, tf.float64))
    s_t, k_t = tf.constant(s), tf.constant(k)
    with tf.GradientTape() as tape:
        tape.watch([s_t, k_t])
        y = coor_descent(s_t, k=k_t, mask=mask, **kw)
        loss = tf.reduce_sum(y * cot)
    ds, dk = tape.gradient(loss, [s_t, k_t])
    fd_s = finite_difference(lambda x: ref_cd(x, k=k, mask=mask, **kw), s, cot)
    fd_k = np.zeros_like(k)
    for i in np.ndindex(k.shape):  # d loss / d k[i] (k of one row moves that row only)
        kp, km = k.copy(), k.copy()
        kp[i] += 1e-6
        km[i] -= 1e-6
        fd_k[i] = np.sum(cot * (ref_cd(s, k=kp, mask=mask, **kw) - ref_cd(s, k=km, mask=mask, **kw))) / 2e-6
    np.testing.assert_allclose(ds.numpy(), fd_s, atol=1e-6 * max(1, np.abs(fd_s).max()))
    np.testing.assert_allclose(dk.numpy(), fd_k, atol=1e-6 * max(1, np.abs(fd_k).max()))
    if masked:
        assert np.all(ds.numpy()[~mask] == 0)


def test_masked_entries_are_never_read_and_full_masks_give_zeros(rng):
    s = normal(rng, (3, 12), tf.float64).numpy()
    mask = _mask(rng, s.shape)
    mask[2] = False  # a fully masked row
    poisoned = np.where(mask, s, np.nan)
    s_t = tf.constant(poisoned)
    with tf.GradientTape() as tape:
        tape.watch(s_t)
        y = coor_descent(s_t, n_iters=20, k=3.0, eps=0.03, eps_init=4.0, eps_decay=0.7, mask=mask)
        loss = tf.reduce_sum(y * np.arange(1.0, 13.0))
    g = tape.gradient(loss, s_t).numpy()
    clean = coor_descent(tf.constant(s), n_iters=20, k=3.0, eps=0.03, eps_init=4.0, eps_decay=0.7, mask=mask)
    np.testing.assert_array_equal(y.numpy(), clean.numpy())
    assert np.all(y.numpy()[2] == 0) and np.all(np.isfinite(g)) and np.all(g[~mask] == 0)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(k=9.0, n_iters=5), "k"),
        (dict(k=0.0, n_iters=5), "k"),
        (dict(k=-1.0, n_iters=5), "k"),
        (dict(k=tf.constant([2.0, 10.0]), n_iters=5), "k"),
        (dict(k=tf.constant([2.0, 3.0, 4.0]), n_iters=5), "k"),
        (dict(k=2.0, n_iters=0), "n_iters"),
        (dict(k=2.0, n_iters=5, eps=0.0), "eps"),
        (dict(k=2.0, n_iters=5, mask=np.ones((2, 7), bool)), "mask"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, name):
    with pytest.raises((ValueError, TypeError), match=name):
        coor_descent(tf.ones([2, 8]), **kwargs)


# ---- topk ----------------------------------------------------------------------------------------------------


def test_topk_values_indices_gates_and_gradient(rng):
    x = f64(normal(rng, (3, 16), tf.float64))
    k, kw = 4, dict(n_iters=20, eps=0.5)
    x_t = tf.constant(x)
    w = f64(normal(rng, (3, k), tf.float64))
    with tf.GradientTape() as tape:
        tape.watch(x_t)
        out = topk(x_t, k, **kw)
        loss = tf.reduce_sum(out.values * w)
    idx = np.argsort(-x, axis=-1)[:, :k]
    np.testing.assert_array_equal(out.indices.numpy(), idx)
    np.testing.assert_allclose(out.values.numpy(), np.take_along_axis(x, idx, -1), rtol=1e-15)
    c = ref_cd(x, k=min(k * 9 / 8, 16), **kw)
    np.testing.assert_allclose(out.coor_descent_values.numpy(), np.take_along_axis(c, idx, -1), atol=1e-12)
    np.testing.assert_allclose(out.gates.numpy(), 1.0, rtol=0, atol=1e-15)
    # d/dx of sum(w · x[idx] · g[idx]) with g = c + const: w at the selected entries, plus x[idx]·w through c.
    u = np.zeros_like(x)
    np.put_along_axis(u, idx, w * np.take_along_axis(x, idx, -1), -1)
    expected = finite_difference(lambda z: ref_cd(z, k=min(k * 9 / 8, 16), **kw), x, u)
    direct = np.zeros_like(x)
    np.put_along_axis(direct, idx, w, -1)
    np.testing.assert_allclose(tape.gradient(loss, x_t).numpy(), expected + direct, atol=1e-6)


def test_topk_mask_and_non_differentiable(rng):
    x = normal(rng, (2, 10))
    mask = np.ones((2, 10), bool)
    mask[:, :5] = False
    top = tf.math.top_k(tf.where(mask, x, -np.inf), 3).indices.numpy()
    np.testing.assert_array_equal(topk(x, 3, mask=mask).indices.numpy(), top)
    plain = topk(x, 3, non_differentiable=True)
    assert plain.coor_descent_values is None and plain.gates is None
    np.testing.assert_array_equal(plain.values.numpy(), tf.math.top_k(x, 3).values.numpy())
    for bad, name in ((dict(k=11), "k"), (dict(k=0), "k"), (dict(k=2, coor_descent_k_ratio=0.5), "ratio")):
        with pytest.raises(ValueError, match=name):
            topk(x, **bad)
