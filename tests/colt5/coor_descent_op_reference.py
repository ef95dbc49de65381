"""float64 NumPy references of CoLT5's coordinate descent and of its reverse pass (no TensorFlow: the device
harness uses them too). ``ref_forward`` is the original's ``coor_descent`` (peers.md §3.1) op for op;
``ref_backward`` the reverse mode derived in ops/cc/kernels/coor_descent_math.h, with every intermediate kept."""

from __future__ import annotations

import numpy as np

MAX64 = np.finfo(np.float64).max


def ref_forward(s, k, n_iters, eps, eps_init=None, eps_decay=1.0, mask=None):
    """The original's iteration in float64 NumPy: ``s [..., n]``, ``k`` a number or ``[...]``; returns
    ``(y [..., n], trace)`` where ``trace`` holds what the reverse pass needs. Fully masked rows give 0."""
    s = np.asarray(s, np.float64)
    mask = np.ones(s.shape, bool) if mask is None else np.broadcast_to(mask, s.shape)
    log_k = np.log(np.maximum(np.broadcast_to(np.asarray(k, np.float64), s.shape[:-1]), 1e-20))[..., None]
    full = ~mask.any(-1, keepdims=True)
    s = np.where(mask, s, -MAX64)
    a, b = np.zeros_like(log_k), -s
    e = max(eps if eps_init is None else eps_init, eps)
    trace = []
    with np.errstate(over="ignore", invalid="ignore"):
        for _ in range(n_iters):
            sb = np.where(mask, (s + b) / e, -MAX64)
            m = sb.max(-1, keepdims=True)
            p = np.exp(sb - m)
            lse = m + np.log(p.sum(-1, keepdims=True))
            trace.append((e, b, p / p.sum(-1, keepdims=True)))
            a = e * (log_k - lse)
            b = -np.maximum(s + a, 0)
            e = max(e * eps_decay, eps)
        y = np.where(mask & ~full, np.exp((s + a + b) / e), 0.0)
    return y, dict(s=s, mask=mask & ~full, a=a, e_final=e, trace=trace)


def ref_backward(dy, k, forward_trace):
    """The reverse pass of ``ref_forward`` (the derivation of ops/cc/kernels/coor_descent_math.h, unrolled
    with every intermediate kept): ``dy [..., n] -> (ds [..., n], dk [...])``."""
    t = forward_trace
    s, mask, a, e_f = t["s"], t["mask"], t["a"], t["e_final"]
    k = np.broadcast_to(np.asarray(k, np.float64), s.shape[:-1])[..., None]
    with np.errstate(over="ignore", invalid="ignore"):
        y = np.where(mask, np.exp(np.minimum(s + a, 0) / e_f), 0.0)
        ds = np.where(mask & (s + a <= 0), dy * y / e_f, 0.0)
        da = ds.sum(-1, keepdims=True)
        dlog_k = np.zeros_like(da)
        for i in range(len(t["trace"]) - 1, -1, -1):
            e, b, p = t["trace"][i]
            dlog_k += da * e
            if i == 0:  # s + b_0 = 0: the first iteration does not depend on s
                break
            pos = mask & (b < 0)  # b = -relu(s + a_prev) < 0 exactly where s + a_prev > 0
            ds -= np.where(mask & ~pos, da * p, 0.0)
            da = da * np.where(pos, p, 0.0).sum(-1, keepdims=True)
    dk = np.where(k >= 1e-20, dlog_k / k, 0.0)
    return np.where(mask, ds, 0.0), dk[..., 0]
