"""Tables as TensorFlow constants, made once per tables object while executing eagerly.

The ops take their tables in host memory on every device (the GPU kernels keep device copies of them, made
once: ``ops/cc/kernels/gpu_launch.h``), so eager constants are made on the CPU: a GPU-placed int32 constant
would be copied back to the host on every call."""

from __future__ import annotations

import threading
import weakref
from typing import Callable, TypeVar

import tensorflow as tf

from bsattn.tables import check_int32_table

Tensors = TypeVar("Tensors")

# Eager constants live as long as their tables object (the table builders cache the recent ones).
_cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_lock = threading.Lock()


def table_constants(tables: object, make: Callable[[], Tensors]) -> Tensors:
    """``make()`` (the tables' tensors), cached per ``tables`` outside graphs; a graph being traced
    gets its own constants, since eager ones would be captured as inputs on every call."""
    if not tf.executing_eagerly():
        return make()  # int32 constants of a GPU graph live in host memory already
    with _lock:
        tensors = _cache.get(tables)
        if tensors is None:
            with tf.device("/CPU:0"):
                tensors = _cache[tables] = make()
        return tensors


def host_scalar(value: object, dtype: tf.DType) -> tf.Tensor:
    """``value`` cast to ``dtype`` on the CPU: a scalar op input that the kernels read in host memory (a GPU
    tensor there would be copied back, waiting for the GPU, on every call)."""
    with tf.device("/CPU:0"):
        return tf.cast(value, dtype)



def int32_table(array: object, name: str) -> tf.Tensor:
    """``array`` as an int32 constant, checked by ``tables.check_int32_table`` (never truncated or wrapped)."""
    return tf.constant(check_int32_table(array, name))
