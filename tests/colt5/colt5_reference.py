"""Float64 NumPy references for the CoLT5 tests, written from the original's algorithms (the README's CoLT5
section), not from bsattn's code."""

from __future__ import annotations

import numpy as np

MAX64 = np.finfo(np.float64).max


def coor_descent(s, n_iters, k, eps=0.1, eps_init=None, eps_decay=1.0, mask=None):
    """The original's iteration in float64, with its ``-finfo.max`` fill: ``s [..., n]`` → ``y [..., n]``."""
    s = np.array(s, dtype=np.float64)
    k = np.asarray(k, dtype=np.float64)
    log_k = np.log(np.maximum(k, 1e-20))
    log_k = log_k[..., None] if log_k.ndim else log_k
    if mask is not None:
        s = np.where(mask, s, -MAX64)
    a, b = 0.0, -s
    e = max(eps if eps_init is None else eps_init, eps)
    for _ in range(n_iters):
        with np.errstate(over="ignore"):
            sb = (s + b) / e
        if mask is not None:
            sb = np.where(mask, sb, -MAX64)
        m = sb.max(-1, keepdims=True)
        lse = m + np.log(np.exp(sb - m).sum(-1, keepdims=True))
        a = e * (log_k - lse)
        b = -np.maximum(s + a, 0.0)
        e = max(e * eps_decay, eps)
    with np.errstate(over="ignore"):
        y = np.exp((s + a + b) / e)
    return np.where(mask, y, 0.0) if mask is not None else y


def finite_difference(f, x, cotangent, h=1e-6):
    """``d sum(cotangent · f(x)) / dx`` by central differences (float64)."""
    x = np.array(x, dtype=np.float64)
    grad = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        xp, xm = x.copy(), x.copy()
        xp[i] += h
        xm[i] -= h
        grad[i] = np.sum(cotangent * (f(xp) - f(xm))) / (2 * h)
    return grad


def rms_norm(x, gamma):
    x = np.asarray(x, np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12) * np.sqrt(x.shape[-1]) * gamma


def layer_norm(x, gamma, beta, eps=1e-5):
    x = np.asarray(x, np.float64)
    mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * gamma + beta


def gelu(x):
    from math import erf

    return 0.5 * x * (1.0 + np.vectorize(erf)(x / np.sqrt(2.0)))


def feed_forward(x, gamma, w1, b1, w2, b2):
    return gelu(rms_norm(x, gamma) @ w1 + b1) @ w2 + b2


def softmax_attention(q, k, v, keep):
    """``q [b, h, i, d]``, ``k, v [b, h, j, d]``, keep bool broadcast to ``[b, h, i, j]``; no kept key → 0."""
    s = q @ np.swapaxes(k, -1, -2) * q.shape[-1] ** -0.5
    s = np.where(keep, s, -np.inf)
    m = np.max(s, -1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    e = np.where(keep, np.exp(s - m), 0.0)
    return e / np.maximum(e.sum(-1, keepdims=True), 1e-300) @ v


def heads(t, h):
    b, n, hd = t.shape
    return t.reshape(b, n, h, hd // h).transpose(0, 2, 1, 3)


def merge(t):
    b, h, n, d = t.shape
    return t.transpose(0, 2, 1, 3).reshape(b, n, h * d)
