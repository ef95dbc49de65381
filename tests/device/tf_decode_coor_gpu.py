"""The TF GPU kernels of KV-cache decoding (the fused op's ``decode`` attr) and of the fused coordinate descent
against their CPU kernels, in one process on the device machine (TensorFlow from tools/tf-on-device, the op
library built with CUDA); the tf-level twin of tests/device/fused_decode.py and coor_descent_harness.py.

Decoding: ``bsattn.decoding.decode_attention`` steps (Tq = 1 and Tq = 5, at positions inside a block, at a block
start and at the last row) over a cache whose unwritten rows hold NaN, tensor-core shapes (D = 64, bs = 32,
float16/bfloat16) and SIMT ones (D = 24, bs = 8), causal / local / fixed per-head tables, grouped heads, key
padding and a ``[1, H, Tq, T]`` bias; each step is also compared with the same rows of the full (non-decode) op on
the GPU. Coordinate descent: ``coor_descent(fused=True)`` forward and gradients w.r.t. ``s`` and a per-row ``k``
tensor, with and without a mask, the router's eps schedule and a constant one, ``[rows, n]`` and ``[b, r, n]``.
Same tolerances as tf_fused_gpu.py (relative to the CPU's largest magnitude; NaN/inf at the same places).

    source /tmp/tf/env.sh && python3 tests/device/tf_decode_coor_gpu.py
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import tensorflow as tf

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from tf_fused_gpu import TOL, compare  # noqa: E402

from bsattn import patterns  # noqa: E402
from bsattn.colt5 import coor_descent  # noqa: E402
from bsattn.decoding import decode_attention, decode_tables  # noqa: E402
from bsattn.fused_attention import fused_attention  # noqa: E402


GPU = os.environ.get("TF_TEST_DEVICE", "/GPU:0")  # "/CPU:0": a dry run of this script where there is no GPU


def decode_cases(rng):
    """(name, tables, heads, kv_heads, d, inputs dict, [(position, tq)])."""
    t_max = 128
    steps = [(0, 1), (37, 1), (64, 1), (90, 5), (t_max - 1, 1)]
    for name, pattern, bs, d, heads, kvh in (
        ("mma causal", patterns.Causal(), 32, 64, 4, 4),
        ("mma local gqa 4/2", patterns.Local(64), 32, 64, 4, 2),
        ("simt fixed per-head", patterns.Fixed(32, 4, 1, 4, 8), 8, 24, 4, 4),
        ("simt causal mqa", patterns.Causal(), 8, 24, 4, 1),
    ):
        tables = decode_tables(pattern, t_max, bs)
        x = {n: rng.uniform(-1, 1, (2, t_max, h * d)) for n, h in (("q", heads), ("k", kvh), ("v", kvh))}
        x["kpm"] = rng.random((2, t_max)) < 0.85
        x["kpm"][:, 0] = True
        x["bias"] = rng.normal(0, 1, (1, heads, t_max, t_max))
        yield name, tables, heads, kvh, d, x, steps


def decode_step(device, x, tables, heads, kvh, dtype, pos, tq, nan_after: bool) -> np.ndarray:
    """One step at rows [pos, pos + tq): the cache holds NaN at rows >= pos + tq when nan_after."""
    with tf.device(device):
        k, v = (x[n].copy() for n in ("k", "v"))
        if nan_after:
            k[:, pos + tq:] = np.nan
            v[:, pos + tq:] = np.nan
        cast = lambda a: tf.cast(tf.constant(a, tf.float64), dtype)  # noqa: E731
        out = decode_attention(cast(x["q"][:, pos:pos + tq]), cast(k), cast(v), tf.constant(pos, tf.int32), tables,
                               heads, kv_heads=kvh, key_padding_mask=tf.constant(x["kpm"]),
                               bias=cast(x["bias"][:, :, pos:pos + tq]))
        return np.asarray(tf.cast(out, tf.float64))


def full_rows(device, x, tables, heads, kvh, dtype, pos, tq) -> np.ndarray:
    """The same rows of the full op (every query row, no decode attr)."""
    with tf.device(device):
        cast = lambda a: tf.cast(tf.constant(a, tf.float64), dtype)  # noqa: E731
        out = fused_attention(cast(x["q"]), cast(x["k"]), cast(x["v"]), tables, heads, kv_heads=kvh,
                              key_padding_mask=tf.constant(x["kpm"]), bias=cast(x["bias"]))
        return np.asarray(tf.cast(out, tf.float64))[:, pos:pos + tq]


def coor_cases(rng):
    """(name, s, k (float or array), mask or None, schedule kwargs)."""
    router = dict(n_iters=20, eps=0.03, eps_init=4.0, eps_decay=0.7)
    s2 = rng.normal(0, 1, (8, 512))
    s3 = rng.normal(0, 1, (2, 3, 1000))
    mask3 = rng.random((2, 3, 1000)) < 0.7
    yield "rows x n, router schedule, k = n/8", s2, 64.0, None, router
    yield "rows x n, 50 iters eps 1, per-row k", s2, rng.uniform(8, 100, (8,)), None, dict(n_iters=50, eps=1.0)
    yield "b x r x n, mask, per-row k, router", s3, rng.uniform(20, 200, (2, 3)), mask3, router


def coor_run(device, s, k, mask, sched, dtype) -> list[np.ndarray]:
    """y and the gradients w.r.t. s (and k when it is a tensor) for a random upstream gradient."""
    with tf.device(device):
        st = tf.cast(tf.constant(s, tf.float64), dtype)
        kt = tf.constant(k, tf.float32) if isinstance(k, np.ndarray) else k
        dy = tf.cast(tf.constant(np.random.default_rng(1).normal(0, 1, s.shape)), dtype)
        watched = [st] + ([kt] if isinstance(k, np.ndarray) else [])
        with tf.GradientTape() as tape:
            tape.watch(watched)
            y = coor_descent(st, k=kt, mask=None if mask is None else tf.constant(mask), fused=True, **sched)
        grads = tape.gradient(y, watched, output_gradients=dy)
        return [np.asarray(tf.cast(t, tf.float64)) for t in (y, *grads)]


def report(ok: bool, text: str) -> int:
    print(f"{'ok  ' if ok else 'FAIL'} {text}", flush=True)
    return int(not ok)


def main() -> None:
    if GPU.startswith("/GPU") and not tf.config.list_physical_devices("GPU"):
        sys.exit("no GPU")
    tf.config.set_soft_device_placement(False)  # an op without a GPU kernel fails instead of running on the CPU
    rng = np.random.default_rng(0)
    failed = total = 0
    for name, tables, heads, kvh, d, x, steps in decode_cases(rng):
        for dtype, tol in TOL.items():
            for pos, tq in steps:
                cpu = decode_step("/CPU:0", x, tables, heads, kvh, dtype, pos, tq, nan_after=True)
                gpu = decode_step(GPU, x, tables, heads, kvh, dtype, pos, tq, nan_after=True)
                full = full_rows(GPU, x, tables, heads, kvh, dtype, pos, tq)
                diff, = compare([gpu], [cpu], dtype).values()
                diff_full, = compare([gpu], [full], dtype).values()
                total += 1
                failed += report(diff <= tol and diff_full <= tol and np.isfinite(gpu).all(),
                                 f"decode {name:22s} {dtype.name:9s} p={pos:3d} Tq={tq}  gpu-cpu {diff:.1e}  "
                                 f"gpu-full {diff_full:.1e}")
    for name, s, k, mask, sched in coor_cases(rng):
        for dtype, tol in TOL.items():
            cpu = coor_run("/CPU:0", s, k, mask, sched, dtype)
            gpu = coor_run(GPU, s, k, mask, sched, dtype)
            diffs = compare(gpu, cpu, dtype)
            shown = " ".join(f"{n} {diffs[m]:.1e}" for n, m in zip(("y", "ds", "dk"), diffs))
            total += 1
            failed += report(all(v <= tol for v in diffs.values()), f"coor {name:40s} {dtype.name:9s} {shown}")
    print(f"{total - failed} of {total} GPU == CPU")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
