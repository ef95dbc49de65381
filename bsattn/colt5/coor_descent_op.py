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

import tensorflow as tf

from bsattn._loader import load_ops
from bsattn.colt5.coor_descent_args import check_args, compute_dtype, eps_schedule
from bsattn.gather_attention import in_xla_context

_DTYPES = (tf.float32, tf.float16, tf.bfloat16, tf.float64)


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
    s, n_iters, k, eps, eps_init, eps_decay, mask = check_args(s, n_iters, k, eps, eps_init, eps_decay, mask)
    if s.dtype not in _DTYPES:
        raise TypeError(f"s must be float32, float16, bfloat16 or float64, got {s.dtype.name}")
    k_t = tf.cast(k, compute_dtype(s.dtype))
    schedule = tf.constant(eps_schedule(n_iters, eps, eps_init, eps_decay), k_t.dtype)
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
