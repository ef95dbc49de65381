"""Eager table constants and host scalars live in host memory (the GPU kernels read them there)."""

import tensorflow as tf

from bsattn import patterns
from bsattn._table_constants import host_scalar
from bsattn.fused_attention import fused_table_tensors
from bsattn.fused_tables import fused_tables_for_pattern


def test_eager_tables_on_cpu_and_cached():
    tables = fused_tables_for_pattern(patterns.Causal(), 64, 64, 16)
    first = fused_table_tensors(tables)
    assert all("CPU" in t.device for t in first)
    assert fused_table_tensors(tables) is first  # made once per tables object


def test_host_scalar_on_cpu():
    seed = host_scalar(7, tf.int64)
    assert "CPU" in seed.device and seed.dtype == tf.int64 and int(seed) == 7
