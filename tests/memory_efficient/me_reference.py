"""Float64 NumPy references of memory-efficient attention (written from the semantics in the README, not from
bsattn's code): forward and the analytic gradients, for ``[b, h, i, d]`` tensors."""

from __future__ import annotations

import numpy as np


def keep_mask(b: int, h: int, n_q: int, n_k: int, mask=None, causal: bool = False) -> np.ndarray:
    """bool ``[b, h, i, j]``: a ``[b, j]`` mask masks keys; any other mask broadcasts; causal is bottom-right."""
    keep = np.ones((b, h, n_q, n_k), dtype=bool)
    if mask is not None:
        mask = np.asarray(mask, dtype=bool)
        keep &= mask[:, None, None, :] if mask.ndim == 2 else mask
    if causal:
        keep &= np.arange(n_k)[None, :] <= np.arange(n_q)[:, None] + (n_k - n_q)
    return keep


def attention(q, k, v, keep, bias=None, scale=None, z=None, dout=None, eps=0.0, stable=True):
    """``out`` and, given ``dout``, ``(out, dq, dk, dv, dbias [b, h, i, j])``; ``z``: dropout keep scale
    ``[b, h, i, j]`` (0 or 1/(1-rate)); ``eps`` as the original: ``out = Σ e v / (Σ e + eps)`` with
    ``e = exp(s - max)`` (``exp(s)`` if not ``stable``). A row with no kept key gives 0."""
    q, k, v = (np.asarray(t, dtype=np.float64) for t in (q, k, v))
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = scale * q @ np.swapaxes(k, -1, -2)
    if bias is not None:
        s = s + np.asarray(bias, dtype=np.float64)
    s = np.where(keep, s, -np.inf)
    m = np.max(s, -1, keepdims=True)
    m = np.where(np.isfinite(m) & stable, m, 0.0)
    e = np.where(keep, np.exp(s - m), 0.0)
    p = e / (e.sum(-1, keepdims=True) + eps + (~keep.any(-1, keepdims=True)))  # +1 where nothing is kept
    pz = p if z is None else p * z
    out = pz @ v
    if dout is None:
        return out
    dout = np.asarray(dout, dtype=np.float64)
    dv = np.swapaxes(pz, -1, -2) @ dout
    dp = dout @ np.swapaxes(v, -1, -2)
    if z is not None:
        dp = dp * z
    ds = p * (dp - np.sum(dout * out, -1, keepdims=True))
    dq = scale * ds @ k
    dk = scale * np.swapaxes(ds, -1, -2) @ q
    return out, dq, dk, dv, ds


def reduce_to(x: np.ndarray, shape) -> np.ndarray:
    """Sum ``x`` over the dimensions a tensor of ``shape`` broadcasts over (the gradient of a broadcast)."""
    full = (1,) * (x.ndim - len(shape)) + tuple(shape)
    axes = tuple(a for a, n in enumerate(full) if n == 1 and x.shape[a] != 1)
    return np.sum(x, axis=axes, keepdims=True).reshape(shape)
