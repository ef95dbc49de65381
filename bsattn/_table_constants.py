"""Tables as TensorFlow constants, made once per tables object while executing eagerly."""

from __future__ import annotations

import threading
import weakref
from typing import Callable, TypeVar

import tensorflow as tf

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
