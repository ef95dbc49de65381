"""``recomputable``: recompute a function's forward pass during the backward pass.

Works as both originals used it:

    @recomputable('attention_impl')        # sparse_attention's decorator factory
    def attention_impl(q, k, v, heads, attn_mode): ...

    @recomputable                          # blocksparse's plain decorator
    def transformer_block(x, scope, train): ...

    y = attention_impl(q, k, v, 4, 'all', recompute=True)

With ``recompute=True`` the activations inside the function are not kept for the gradient: they
are computed again from the inputs when the gradient is needed (``tf.recompute_grad``), eagerly,
inside ``tf.function`` and under ``tf.distribute``. Tensor positional arguments are
differentiated; other positional arguments and all keyword arguments are treated as constants.
Unlike sparse_attention, ``recompute`` defaults to False instead of being required.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import numpy as np
import tensorflow as tf


def _is_tensor_like(value: Any) -> bool:
    return tf.is_tensor(value) or isinstance(value, (tf.Variable, np.ndarray))


def _make_recomputable(fn: Callable) -> Callable:
    @functools.wraps(fn)
    def wrapper(*args, recompute: bool = False, **kwargs):
        if not recompute:
            return fn(*args, **kwargs)
        tensor_positions = [i for i, arg in enumerate(args) if _is_tensor_like(arg)]

        def call_with(*tensors):
            full = list(args)
            for position, tensor in zip(tensor_positions, tensors):
                full[position] = tensor
            return fn(*full, **kwargs)

        return tf.recompute_grad(call_with)(*(args[i] for i in tensor_positions))

    return wrapper


def recomputable(name_or_fn: str | Callable) -> Callable:
    """Decorator (``@recomputable``) or decorator factory (``@recomputable('name')``)."""
    if callable(name_or_fn):
        return _make_recomputable(name_or_fn)
    return _make_recomputable
