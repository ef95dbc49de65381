"""Tables as TensorFlow constants, made once per tables object while executing eagerly."""

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
        return make()
    with _lock:
        tensors = _cache.get(tables)
        if tensors is None:
            tensors = _cache[tables] = make()
        return tensors



def int32_table(array: object, name: str) -> tf.Tensor:
    """``array`` as an int32 constant, checked by ``tables.check_int32_table`` (never truncated or wrapped)."""
    return tf.constant(check_int32_table(array, name))
