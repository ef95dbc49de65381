"""The fused coordinate descent of CoLT5 routing: one custom op per pass (``BsattnCoorDescent`` and its gradient).

``fused_coor_descent`` computes exactly the iteration of CoLT5-attention's ``coor_descent`` (an entropy-regularised
top-k of every row of ``s`` by dual coordinate ascent) in one op: one row per work item (a CPU thread, a CUDA
block), every iteration on the row while it stays in cache. The backward is exact: it replays the iterations in
reverse, recomputing each softmax from ``s`` and the logsumexp the forward stored (one scalar per row and iteration;
memory O(rows·n), never O(n_iters·rows·n)), and matches the float64 autograd of the unrolled loop, also w.r.t. ``k``
when ``k`` is a tensor. The math and its reverse-mode derivation: ``ops/cc/kernels/coor_descent_math.h``.

The plain-TensorFlow unrolled loop (``bsattn.colt5.coor_descent``) is the reference and the XLA path; custom ops do
not compile under XLA, so this function refuses to run there.
"""

from __future__ import annotations

import numbers

import tensorflow as tf

from bsattn import _checks as checks
from bsattn._loader import load_ops
from bsattn.gather_attention import in_xla_context

_DTYPES = (tf.float32, tf.float16, tf.bfloat16, tf.float64)


def eps_schedule(n_iters: int, eps: float, eps_init: float | None = None, eps_decay: float = 1.0) -> list[float]:
    """The eps of every iteration and of the output, as the original computes them (Python floats):
    ``[eps_1, ..., eps_{n_iters}, eps_final]``, ``eps_1 = max(eps_init or eps, eps)``,
    ``eps_{t+1} = max(eps_t * eps_decay, eps)``; ``n_iters + 1`` values."""
    current = max(eps if eps_init is None else eps_init, eps)
    out = []
    for _ in range(n_iters + 1):
        out.append(current)
        current = max(current * eps_decay, eps)
    return out


def _real(name: str, value, allow_none: bool = False) -> float | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    value = float(value)
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def fused_coor_descent(
    s: tf.Tensor,
    *,
    n_iters: int,
    k: float | tf.Tensor,
    eps: float = 0.1,
    eps_init: float | None = None,
    eps_decay: float = 1.0,
    mask: tf.Tensor | None = None,
) -> tf.Tensor:
    """Coordinate-descent top-k scores ``[..., n] -> [..., n]`` (the contract of CoLT5's ``coor_descent``).

    Per row: ``a = 0, b = -s``; ``n_iters`` times ``a = eps_t (log k - logsumexp((s + b) / eps_t))``,
    ``b = -relu(s + a)``, ``eps_{t+1} = max(eps_t * eps_decay, eps)``; returns
    ``y = exp((s + a + b) / eps_final) = min(1, exp((s + a) / eps_final))`` with ``sum(y) -> k`` as it converges.

    Args:
      s: ``[..., n]`` scores, float32, float16, bfloat16 (computed in float32) or float64 (computed in float64).
      n_iters: iterations, >= 1.
      k: how many entries each row keeps: a number (every row), or a tensor ``[]`` or ``[...]`` (``s.shape[:-1]``,
        one per row), differentiable; ``0 < k <= n``. A row with fewer unmasked entries than k saturates them all
        at 1, as the unrolled reference does (a padded row of a router). A fully masked row gives 0 (and zero
        gradients) whatever its k.
      eps: the final (smallest) entropy weight, > 0.
      eps_init: the first iteration's eps (eps-scaling; the CoLT5 router uses 4 with ``eps_decay=0.7``);
        ``None`` = ``eps``.
      eps_decay: eps shrinks by this factor per iteration, never below ``eps``.
      mask: bool, broadcastable to ``s``; True = a real entry. Masked entries take no part and give 0.
    Returns:
      ``y [..., n]`` in ``s``'s dtype; differentiable w.r.t. ``s`` (0 where masked) and ``k`` (a tensor).
    """
    s = checks.float_tensor("s", s)
    if s.dtype not in _DTYPES:
        raise TypeError(f"s must be float32, float16, bfloat16 or float64, got {s.dtype.name}")
    if s.shape.rank == 0:
        raise ValueError("s must have rank >= 1 ([..., n]), got a scalar")
    if isinstance(n_iters, bool) or not isinstance(n_iters, numbers.Integral) or n_iters < 1:
        raise ValueError(f"n_iters must be a positive integer, got {n_iters!r}")
    eps = _real("eps", eps)
    if eps <= 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    eps_init = _real("eps_init", eps_init, allow_none=True)
    eps_decay = _real("eps_decay", eps_decay)
    k_dtype = tf.float64 if s.dtype == tf.float64 else tf.float32
    if not isinstance(k, numbers.Real):  # a tensor, variable or array: one value, or one per row
        try:
            k_t = tf.cast(k, k_dtype)
        except (TypeError, ValueError, tf.errors.OpError) as e:
            raise TypeError(f"k must be a number or a float tensor [] or s.shape[:-1], got {k!r}: {e}") from None
    else:
        k_value = _real("k", k)
        if k_value <= 0:
            raise ValueError(f"k must be > 0, got {k_value}")
        n = s.shape[-1]
        if n is not None and k_value > n:
            raise ValueError(f"k must be <= n = {n} (the last dimension of s), got {k_value}")
        k_t = tf.constant(k_value, k_dtype)
    schedule = tf.constant(eps_schedule(int(n_iters), eps, eps_init, eps_decay), k_dtype)
    if mask is not None:
        mask = tf.convert_to_tensor(mask)
        if mask.dtype != tf.bool:
            raise TypeError(f"mask must be a bool tensor, got {mask.dtype.name}")
        try:
            mask = tf.broadcast_to(mask, tf.shape(s))
        except (tf.errors.InvalidArgumentError, ValueError) as e:
            raise ValueError(f"mask of shape {mask.shape} does not broadcast to s's shape {s.shape}: {e}") from None
    if in_xla_context():
        raise NotImplementedError(
            "fused_coor_descent is a custom op and cannot compile under XLA (jit_compile=True); "
            "use the unfused coor_descent (fused=False) there"
        )
    raw = load_ops()
    attrs = {"n_iters": int(n_iters), "has_mask": mask is not None}
    mask_t = mask if mask is not None else tf.zeros([0], tf.bool)

    @tf.custom_gradient
    def forward(s, k_t):
        y, lse = raw.bsattn_coor_descent(s, k_t, schedule, mask_t, **attrs)

        def grad(dy):
            ds, dk = raw.bsattn_coor_descent_grad(s, k_t, schedule, mask_t, lse, dy, **attrs)
            return ds, dk

        return y, grad

    return forward(s, k_t)
