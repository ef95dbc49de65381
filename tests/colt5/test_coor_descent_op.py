"""The fused coordinate-descent op (``bsattn.colt5.coor_descent_op.fused_coor_descent``) against float64 references.

References (``coor_descent_op_reference``, NumPy only, shared with tests/device/coor_descent_harness.py):
``ref_forward`` is CoLT5-attention's ``coor_descent`` (peers.md §3.1) op for op in float64;
``ref_backward`` its hand-written reverse pass, itself checked by central finite differences; the gradients of
the op are also compared with TensorFlow's float64 autograd of the unrolled loop (``unrolled_tf``).
Criteria (conftest's, see ``tolerance``): float64 1e-10 relative; float32 and the 16-bit dtypes within 2x (3x for
gradients) of what the unrolled TensorFlow loop in float32 achieves against the float64 reference, plus a floor of
a quarter ulp and of the problem's float32 conditioning.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from conftest import EPS

from coor_descent_op_reference import ref_backward, ref_forward

from bsattn.colt5.coor_descent import coor_descent
from bsattn.colt5.coor_descent_args import eps_schedule
from bsattn.colt5.coor_descent_op import fused_coor_descent

DTYPES = (tf.float64, tf.float32, tf.float16, tf.bfloat16)

# (name, shape, k (a number or "per-row"), n_iters, eps, eps_init, eps_decay, masked)
CASES = {
    "rows_default": ((6, 40), 5, 20, 0.1, None, 1.0, False),
    "brn_router_defaults": ((2, 3, 33), "per-row", 20, 0.03, 4.0, 0.7, False),
    "converged_50_eps1": ((3, 64), 8, 50, 1.0, None, 1.0, False),
    "masked_per_row_k": ((5, 37), "per-row", 12, 0.2, 1.0, 0.8, True),
}


# ---- references ---------------------------------------------------------------------------------------------


def unrolled_tf(s, k, n_iters, eps, eps_init=None, eps_decay=1.0, mask=None):
    """The original's loop in TensorFlow ops (autograd through every iteration), in ``s``'s dtype."""
    mask_value = s.dtype.max
    k = tf.cast(k, s.dtype)
    log_k = tf.math.log(tf.maximum(k, 1e-20))[..., None] if k.shape.rank else tf.math.log(tf.maximum(k, 1e-20))
    if mask is not None:
        s = tf.where(mask, s, -mask_value)
    a, b = 0.0, -s
    e = max(eps if eps_init is None else eps_init, eps)
    for _ in range(n_iters):
        sb = (s + b) / e
        if mask is not None:
            sb = tf.where(mask, sb, -mask_value)
        a = e * (log_k - tf.reduce_logsumexp(sb, axis=-1, keepdims=True))
        b = -tf.nn.relu(s + a)
        e = max(e * eps_decay, eps)
    y = tf.exp((s + a + b) / e)
    return tf.where(mask, y, 0.0) if mask is not None else y


# ---- inputs -------------------------------------------------------------------------------------------------


def make_case(rng, name, dtype):
    shape, k, n_iters, eps, eps_init, eps_decay, masked = CASES[name]
    s64 = tf.cast(tf.constant(rng.standard_normal(shape) * 2.0, tf.float64), dtype)  # exact values of s in dtype
    mask = None
    if masked:
        mask = rng.random(shape) < 0.8
        mask[..., :6] = True  # at least 6 unmasked per row
    if k == "per-row":
        k = tf.constant(rng.uniform(1.5, 5.5, shape[:-1]), tf.float64 if dtype == tf.float64 else tf.float32)
    return s64, k, dict(n_iters=n_iters, eps=eps, eps_init=eps_init, eps_decay=eps_decay), mask


def f64(x):
    return tf.cast(x, tf.float64).numpy()


def tolerance(dtype, baseline_err, ref_max, factor, s, kw):
    """float64: 1e-10 relative. Else ``factor`` x the float32 baseline's error plus a floor: a quarter ulp of the
    dtype, and the conditioning of the problem in float32 (y = exp((s + a) / eps_final) turns a rounding of
    a ~ |s| into a relative error |s| / eps_final of y; which rounding errors a float32 run makes is luck)."""
    if dtype == tf.float64:
        return 1e-10 * max(1.0, ref_max)
    eps_final = eps_schedule(kw["n_iters"], kw["eps"], kw["eps_init"], kw["eps_decay"])[-1]
    condition = np.abs(f64(s)).max() / eps_final
    return factor * baseline_err + (2 * EPS[tf.float32] * condition + 0.25 * EPS[dtype]) * max(1.0, ref_max)


def k_values(k):
    return f64(k) if tf.is_tensor(k) else k


# ---- the reference itself ------------------------------------------------------------------------------------


def test_reference_backward_matches_finite_differences(rng):
    shape, n_iters, eps, eps_init, decay = (3, 9), 6, 0.3, 1.5, 0.8
    s = rng.standard_normal(shape)
    k = rng.uniform(1.5, 3.0, shape[0])
    mask = rng.random(shape) < 0.85
    mask[:, :4] = True
    w = rng.standard_normal(shape)
    _, trace = ref_forward(s, k, n_iters, eps, eps_init, decay, mask)
    ds, dk = ref_backward(w, k, trace)

    def loss(s_, k_):
        return float((ref_forward(s_, k_, n_iters, eps, eps_init, decay, mask)[0] * w).sum())

    h = 1e-6
    fd_s = np.zeros(shape)
    for idx in np.ndindex(*shape):
        d = np.zeros(shape)
        d[idx] = h
        fd_s[idx] = (loss(s + d, k) - loss(s - d, k)) / (2 * h)
    fd_k = np.array([(loss(s, k + h * np.eye(3)[r]) - loss(s, k - h * np.eye(3)[r])) / (2 * h) for r in range(3)])
    np.testing.assert_allclose(ds, fd_s, atol=1e-7)
    np.testing.assert_allclose(dk, fd_k, atol=1e-7)


def test_reference_matches_unrolled_tf(rng):
    s64, k, kw, mask = make_case(rng, "masked_per_row_k", tf.float64)
    y_ref, _ = ref_forward(f64(s64), k_values(k), mask=mask, **kw)
    np.testing.assert_allclose(unrolled_tf(s64, k, mask=mask, **kw).numpy(), y_ref, atol=1e-12)


# ---- the op -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
def test_forward(rng, name, dtype):
    s, k, kw, mask = make_case(rng, name, dtype)
    y_ref, _ = ref_forward(f64(s), k_values(k), mask=mask, **kw)
    y = fused_coor_descent(s, k=k, mask=mask, **kw)
    assert y.dtype == dtype and y.shape == s.shape
    s32 = tf.cast(s, tf.float32) if dtype != tf.float64 else s
    baseline = f64(tf.cast(unrolled_tf(s32, k, mask=mask, **kw), dtype))
    err = np.abs(f64(y) - y_ref).max()
    assert err <= tolerance(dtype, np.abs(baseline - y_ref).max(), np.abs(y_ref).max(), 2, s, kw), err
    if mask is not None:
        assert np.all(f64(y)[~mask] == 0)


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
def test_gradients(rng, name, dtype):
    s, k, kw, mask = make_case(rng, name, dtype)
    w = tf.constant(rng.standard_normal(s.shape), dtype)

    def grads(fn, s_, k_):
        with tf.GradientTape() as tape:
            tape.watch(s_)
            if tf.is_tensor(k_):
                tape.watch(k_)
            y = fn(s_, k=k_, mask=mask, **kw)
            loss = tf.reduce_sum(tf.cast(y, tf.float64) * tf.cast(w, tf.float64))
        return tape.gradient(loss, [s_, k_] if tf.is_tensor(k_) else [s_])

    k64 = tf.cast(k, tf.float64) if tf.is_tensor(k) else k
    ref = [g.numpy() for g in grads(unrolled_tf, tf.cast(s, tf.float64), k64)]
    ours = [f64(g) for g in grads(fused_coor_descent, s, k)]
    _, trace = ref_forward(f64(s), k_values(k), mask=mask, **kw)
    hand = ref_backward(f64(w), k_values(k), trace)
    np.testing.assert_allclose(ref[0], hand[0], atol=1e-9 * max(1, np.abs(ref[0]).max()))
    if dtype == tf.float64:
        baselines = [None] * len(ref)
    else:
        k32 = tf.cast(k, tf.float32) if tf.is_tensor(k) else k
        baselines = grads(lambda s_, **a: tf.cast(unrolled_tf(s_, **a), dtype), tf.cast(s, tf.float32), k32)
        baselines = [f64(tf.cast(b, dtype)) if i == 0 else f64(b) for i, b in enumerate(baselines)]
    for i, (o, r) in enumerate(zip(ours, ref)):
        base_err = 0.0 if baselines[i] is None else np.abs(baselines[i] - r).max()
        err = np.abs(o - r).max()
        assert err <= tolerance(dtype, base_err, np.abs(r).max(), 3, s, kw), (["ds", "dk"][i], err, base_err)
    if mask is not None:
        assert np.all(ours[0][~mask] == 0)


# Rows longer than the backward's 1024-entry blocks and not a multiple of the vector lanes; schedules whose equal
# eps let iterations share exponentials (coor_descent_math.cc): the router's (the floor from iteration 15 on), a
# constant eps under which the threshold moves by ~50 eps (past the 30-eps window: the shared exponentials are
# recomputed, the backward's groups split), and a constant eps = 0.5 (one group throughout).
LONG_SCHEDULES = {
    "router_floor_midway": dict(n_iters=20, eps=0.03, eps_init=4.0, eps_decay=0.7),
    "constant_eps_drifting": dict(n_iters=40, eps=0.01, eps_init=None, eps_decay=1.0),
    "constant_eps_decay_1": dict(n_iters=15, eps=0.5, eps_init=None, eps_decay=1.0),
}


@pytest.mark.parametrize("schedule", sorted(LONG_SCHEDULES))
@pytest.mark.parametrize("dtype", (tf.float64, tf.float32), ids=lambda d: d.name)
def test_long_rows_shared_exponentials(rng, schedule, dtype):
    kw = LONG_SCHEDULES[schedule]
    shape = (3, 2500)
    s = tf.cast(tf.constant(rng.standard_normal(shape)), dtype)
    mask = rng.random(shape) < 0.9
    mask[1] = True  # one row without masked entries
    k = tf.constant(rng.uniform(200.0, 400.0, shape[0]), dtype)
    w = tf.constant(rng.standard_normal(shape), dtype)
    with tf.GradientTape() as tape:
        tape.watch([s, k])
        y = fused_coor_descent(s, k=k, mask=mask, **kw)
    ds, dk = tape.gradient(y, [s, k], output_gradients=w)
    y_ref, trace = ref_forward(f64(s), f64(k), mask=mask, **kw)
    ds_ref, dk_ref = ref_backward(f64(w), f64(k), trace)
    if dtype == tf.float32:  # the float32 unrolled loop's errors set the scale, as in the tests above
        with tf.GradientTape() as tape:
            tape.watch([s, k])
            y_base = unrolled_tf(s, k, mask=mask, **kw)
        base = [f64(y_base), *[f64(g) for g in tape.gradient(y_base, [s, k], output_gradients=w)]]
    for i, (ours, ref) in enumerate([(y, y_ref), (ds, ds_ref), (dk, dk_ref)]):
        base_err = 0.0 if dtype == tf.float64 else np.abs(base[i] - ref).max()
        err = np.abs(f64(ours) - ref).max()
        assert err <= tolerance(dtype, base_err, np.abs(ref).max(), 2 if i == 0 else 3, s, kw), (i, err, base_err)
    assert np.all(f64(y)[~mask] == 0) and np.all(f64(ds)[~mask] == 0)


def test_converged_row_sums_are_k(rng):
    s = tf.constant(rng.standard_normal((4, 512)), tf.float64)
    y = fused_coor_descent(s, n_iters=50, k=64, eps=1.0).numpy()
    np.testing.assert_allclose(y.sum(-1), 64.0, rtol=1e-9)


def test_fully_masked_row_is_zero_without_nan(rng):
    s = tf.constant(rng.standard_normal((3, 16)), tf.float32)
    mask = np.ones((3, 16), bool)
    mask[1] = False
    k = tf.constant([2.0, 3.0, 4.0])
    with tf.GradientTape() as tape:
        tape.watch([s, k])
        y = fused_coor_descent(s, n_iters=10, k=k, eps=0.5, mask=mask)
        loss = tf.reduce_sum(y * tf.range(16, dtype=tf.float32))
    ds, dk = tape.gradient(loss, [s, k])
    assert np.all(y.numpy()[1] == 0) and np.all(np.isfinite(y.numpy()))
    assert np.all(ds.numpy()[1] == 0) and dk.numpy()[1] == 0 and np.all(np.isfinite(ds.numpy()))
    y_ref, _ = ref_forward(f64(s), [2.0, 3.0, 4.0], 10, 0.5, mask=mask)
    np.testing.assert_allclose(y.numpy(), y_ref, atol=1e-5)


def test_scalar_k_tensor_gradient_is_summed_over_rows(rng):
    s = tf.constant(rng.standard_normal((4, 20)), tf.float64)
    k = tf.constant(3.0, tf.float64)
    w = tf.constant(rng.standard_normal((4, 20)), tf.float64)
    for fn in (fused_coor_descent, unrolled_tf):
        with tf.GradientTape() as tape:
            tape.watch(k)
            loss = tf.reduce_sum(fn(s, n_iters=15, k=k, eps=0.2) * w)
        if fn is fused_coor_descent:
            ours = tape.gradient(loss, k).numpy()
        else:
            np.testing.assert_allclose(ours, tape.gradient(loss, k).numpy(), rtol=1e-10)


def test_graph_mode_and_leading_dims(rng):
    s = tf.constant(rng.standard_normal((2, 2, 3, 24)), tf.float32)
    fn = tf.function(lambda x: fused_coor_descent(x, n_iters=8, k=4, eps=0.3),
                     input_signature=[tf.TensorSpec([None, None, None, 24], tf.float32)])
    y_ref, _ = ref_forward(f64(s), 4, 8, 0.3)
    np.testing.assert_allclose(fn(s).numpy(), y_ref, atol=1e-5)


def test_eps_schedule_is_the_originals():
    assert eps_schedule(3, 0.03, 4.0, 0.7) == [4.0, 4.0 * 0.7, 4.0 * 0.7 * 0.7, 4.0 * 0.7 * 0.7 * 0.7]
    assert eps_schedule(2, 0.1) == [0.1, 0.1, 0.1]
    assert eps_schedule(2, 0.5, 0.1) == [0.5, 0.5, 0.5]  # eps_init below eps: max(eps_init, eps)


# ---- bad input ----------------------------------------------------------------------------------------------


# Python-side checks: one function (coor_descent_args.check_args) for the fused and the unrolled paths, so both
# reject the same arguments with the same messages.
@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(k=11), ValueError, r"k must be in \(0, n=10\]"),
        (dict(k=0), ValueError, r"k must be in \(0, n=10\]"),
        (dict(k=-1.5), ValueError, r"k must be in \(0, n=10\]"),
        (dict(k=2, n_iters=0), ValueError, "n_iters must be a positive integer"),
        (dict(k=2, eps=0.0), ValueError, "eps must be a positive finite number"),
        (dict(k=2, eps_decay=0.0), ValueError, "eps_decay must be a positive finite number"),
        (dict(k=2, eps_init=-1.0), ValueError, "eps_init must be a positive finite number"),
        (dict(k=2, mask=np.ones((3, 9), bool)), ValueError, "mask of shape"),
        (dict(k=2, mask=np.ones((4, 10), np.float32)), TypeError, "mask must be a bool"),
        (dict(k=tf.constant([1.0, 2.0])), ValueError, "k must be a number or have one value per row"),
        (dict(k="3"), TypeError, "k must be a real number or tensor"),
        (dict(k=tf.constant([1.0, 0.0, 2.0, 1.0])), ValueError, r"k must be in \(0, n=10\] for every row"),
        (dict(k=tf.constant([1.0, 11.0, 2.0, 1.0])), ValueError, r"k must be in \(0, n=10\] for every row"),
    ],
)
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unrolled"])
def test_bad_input(rng, kwargs, error, match, fused):
    s = tf.constant(rng.standard_normal((4, 10)), tf.float32)
    kwargs = dict(dict(n_iters=5), **kwargs)
    with pytest.raises(error, match=match):
        coor_descent(s, fused=fused, **kwargs)


# The op's own checks of per-row k values, which Python cannot see in a graph (k a tf.function argument).
@pytest.mark.parametrize(
    "k, match",
    [
        ([1.0, 0.0, 2.0, 1.0], r"finite and > 0.*k\[1\]"),
        ([1.0, 11.0, 2.0, 1.0], "k must be <= n = 10"),
        ([1.0, 2.0, 3.0, 4.0, 5.0], "k must be a scalar or have shape"),
    ],
)
def test_bad_k_values_in_a_graph(rng, k, match):
    s = tf.constant(rng.standard_normal((4, 10)), tf.float32)
    fn = tf.function(lambda s, k: fused_coor_descent(s, n_iters=5, k=k), input_signature=[
        tf.TensorSpec([4, 10], tf.float32), tf.TensorSpec([None], tf.float32)])
    with pytest.raises(tf.errors.InvalidArgumentError, match=match):
        fn(s, tf.constant(k))


def test_k_above_unmasked_count_saturates_as_the_unrolled_loop(rng):
    """A row with fewer unmasked entries than k (a padded row of a router): every unmasked entry goes to 1, the
    op equal to the unrolled reference, forward and gradients (float64)."""
    s = tf.constant(rng.standard_normal((3, 10)), tf.float64)
    mask = np.ones((3, 10), bool)
    mask[2, 3:] = False
    k = tf.constant([4.0, 4.0, 4.0], tf.float64)
    dy = tf.constant(rng.standard_normal((3, 10)), tf.float64)
    results = []
    for fused in (True, False):
        with tf.GradientTape() as tape:
            tape.watch([s, k])
            y = coor_descent(s, n_iters=20, k=k, mask=mask, fused=fused)
            loss = tf.reduce_sum(y * dy)
        results.append([y.numpy(), *[g.numpy() for g in tape.gradient(loss, [s, k])]])
    np.testing.assert_allclose(results[0][0][2, :3], 1.0, atol=1e-6)
    for ours, ref in zip(*results):
        np.testing.assert_allclose(ours, ref, rtol=1e-10, atol=1e-12)


def test_xla_is_refused_by_the_op_and_coor_descent_runs_the_unrolled_loop_there(rng):
    s = tf.constant(rng.standard_normal((2, 8)), tf.float32)
    with pytest.raises(NotImplementedError, match="XLA"):
        tf.function(lambda x: fused_coor_descent(x, n_iters=3, k=2), jit_compile=True)(s)
    under_xla = tf.function(lambda x: coor_descent(x, n_iters=3, k=2, fused=True), jit_compile=True)(s)
    np.testing.assert_allclose(under_xla.numpy(), coor_descent(s, n_iters=3, k=2, fused=True).numpy(), atol=1e-6)


@pytest.mark.parametrize("op", ["BsattnCoorDescent", "BsattnCoorDescentGrad"])
def test_kernels_registered(op):
    # CPU: float32, float16, bfloat16, float64; GPU (a CUDA build only): float32, float16, bfloat16.
    from tensorflow.python.framework import kernels

    from bsattn import _loader

    _loader.load_ops()
    devices = [k.device_type for k in kernels.get_registered_kernels_for_op(op).kernel]
    assert devices.count("CPU") == 4
    assert devices.count("GPU") == (3 if _loader.build_info()["cuda"] else 0)


def test_raw_op_checks_name_the_argument(rng):
    from bsattn._loader import load_ops

    raw = load_ops()
    s = tf.constant(rng.standard_normal((2, 6)), tf.float32)
    k, no_mask = tf.constant(2.0), tf.zeros([0], tf.bool)
    schedule = tf.constant([0.5, 0.5, 0.5, 0.5])
    with pytest.raises((tf.errors.InvalidArgumentError, ValueError), match=r"eps \(the schedule\) must be"):
        raw.bsattn_coor_descent(s, k, schedule[:3], no_mask, n_iters=3)
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"eps must be finite and > 0.*\[2\] = 0"):
        raw.bsattn_coor_descent(s, k, tf.constant([0.5, 0.5, 0.0, 0.5]), no_mask, n_iters=3)
    with pytest.raises((tf.errors.InvalidArgumentError, ValueError), match="n_iters must be"):
        raw.bsattn_coor_descent(s, k, schedule[:1], no_mask, n_iters=0)
    with pytest.raises(tf.errors.InvalidArgumentError, match="mask must have the shape of s"):
        raw.bsattn_coor_descent(s, k, schedule, tf.ones([2, 5], tf.bool), n_iters=3, has_mask=True)
    y, lse = raw.bsattn_coor_descent(s, k, schedule, no_mask, n_iters=3)
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"lse must be \[..., n_iters\]"):
        raw.bsattn_coor_descent_grad(s, k, schedule, no_mask, lse[:, :2], y, n_iters=3)
    with pytest.raises(tf.errors.InvalidArgumentError, match="dy must have the shape of s"):
        raw.bsattn_coor_descent_grad(s, k, schedule, no_mask, lse, y[:, :5], n_iters=3)


_ISA_SCRIPT = """
import json
import numpy as np, tensorflow as tf
from coor_descent_op_reference import ref_backward, ref_forward
from bsattn.colt5.coor_descent import coor_descent
from bsattn.colt5.coor_descent_op import fused_coor_descent
rng = np.random.default_rng(0)
errors = []
cases = [((3, 37), dict(n_iters=30, eps=1.0)), ((2, 45), dict(n_iters=12, eps=0.2, eps_init=1.0, eps_decay=0.8)),
         ((2, 2100), dict(n_iters=20, eps=0.1, eps_init=4.0, eps_decay=0.7))]  # the last: several blocks, a floor
for shape, kw in cases:
    s, w = rng.standard_normal(shape), rng.standard_normal(shape)
    mask = rng.random(shape) < 0.8
    mask[:, :6] = True
    st = tf.constant(s, tf.float32)
    s = st.numpy().astype(np.float64)
    with tf.GradientTape() as tape:
        tape.watch(st)
        y = fused_coor_descent(st, k=3.5, mask=mask, **kw)
    ds = tape.gradient(y, st, output_gradients=tf.constant(w, tf.float32))
    y_ref, trace = ref_forward(s, 3.5, mask=mask, **kw)
    ds_ref, _ = ref_backward(w.astype(np.float32).astype(np.float64), 3.5, trace)
    errors += [float(np.abs(y.numpy() - y_ref).max()), float(np.abs(ds.numpy() - ds_ref).max() / np.abs(ds_ref).max())]
print(json.dumps(errors))
"""


def test_lower_isa_levels():
    """The AVX2 and baseline instances of the row passes (this CPU runs AVX-512) are as accurate."""
    here = Path(__file__).resolve().parent
    path = os.pathsep.join([str(here.parents[1]), str(here), os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=path)
    procs = {
        isa: subprocess.Popen([sys.executable, "-c", _ISA_SCRIPT], env=dict(env, BSATTN_CPU_ISA=isa),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=here)
        for isa in ("avx2", "baseline")
    }  # fmt: skip
    for isa, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr[-2000:]
        errors = json.loads(stdout.strip().splitlines()[-1])
        assert max(errors) < 2e-5, (isa, errors)
