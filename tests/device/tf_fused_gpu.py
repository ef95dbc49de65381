"""The TF GPU kernels of the fused op (ops/cc/kernels/fused_attention_gpu_ops.cc) against its CPU kernels, in one
process on the device machine (TensorFlow from /work/shared/tools/tf-on-device, the op library built with CUDA).

Every case runs the same inputs through ``fused_attention`` (forward, lse, and dq, dk, dv, dbias by GradientTape)
once under ``/GPU:0`` and once under ``/CPU:0`` and compares: NaN/±inf at the same places, the finite values within
1e-4 (float32), 5e-3 (float16) or 4e-2 (bfloat16) of the CPU's largest magnitude. Cases: bias ``[B|1, H|1, Tq, Tk]``
(all four broadcasts, and the rank-3 form) with key padding and dropout, tensor-core shapes (D = 64, bs = 32) and
SIMT ones (D = 24, bs = 8, per-head layouts), NaN/Inf in k, v and bias at padded keys and under a -inf bias column,
an attended NaN value, batch 0, Tq != Tk, grouped heads with segment ids (NaN in a key-only segment),
raw ops with Tq = 0 or Tk = 0 and segment ids, two tables of one shape in turn (the GPU kernels' table cache must
never serve one for the other), eagerly and under ``tf.function``. The raw ops with ``strided_period`` (tensor-core
and SIMT shapes, key padding, dropout, dlse, grouped heads with segment ids) on the GPU against the CPU, and on the
GPU against the op without it on permuted inputs, un-permuted (forward bit for bit). The raw ops with ``head_major``
(q, k, v, dout as [B, H, T, D]: tensor-core shapes with grouped heads, segment ids, key padding, bias, dropout, dlse;
SIMT shapes with per-head layouts; with strided_period too) on the GPU against the CPU, and against the GPU's op in
the default layout on the same values (out, lse, dk, dv, dbias bit for bit; dq within the tolerance: its atomic
sums vary in order). Then the unfused ops (nt, masked softmax, nn
and their gradients: tn, softmax grad) through ``blocksparse_attention_impl(engine='unfused')`` and the fused
engine for every ``attn_mode``, and last, under ``tf.config.experimental.enable_op_determinism()``, the fused
gradient twice on the GPU: the same bits.

    source /tmp/tf/env.sh && python3 tests/device/tf_fused_gpu.py
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import tensorflow as tf

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from bsattn import patterns
from bsattn._loader import load_ops
from bsattn.fused_attention import fused_attention
from bsattn.fused_tables import build_fused_tables, fused_tables_for_pattern
from bsattn.sparse_attention import blocksparse_attention_impl

TOL = {tf.float32: 1e-4, tf.float16: 5e-3, tf.bfloat16: 4e-2}
NAMES = ("out", "lse", "dq", "dk", "dv", "dbias")


def run(device: str, x: dict, tables, heads: int, dtype, dropout_rate: float, graph: bool = False) -> list[np.ndarray]:
    """out, lse and the gradients (dbias when there is a bias) of one call placed on `device` (in a tf.function
    with graph: the inputs are its arguments, since Grappler would fold a graph of constants on the CPU)."""
    inputs = _inputs(device, x, dtype)
    fn = lambda *t: _run(device, x, tables, heads, dropout_rate, *t)  # noqa: E731
    return [np.asarray(tf.cast(t, tf.float64)) for t in (tf.function(fn) if graph else fn)(*inputs)]


def _inputs(device: str, x: dict, dtype) -> list[tf.Tensor]:
    """q, k, v, dout (and bias) of `x` as eager tensors on `device`."""
    with tf.device(device):
        names = ("q", "k", "v", "dout") + (("bias",) if x["bias"] is not None else ())
        return [tf.cast(tf.constant(x[n], tf.float64), dtype) for n in names]


def _run(device: str, x: dict, tables, heads: int, dropout_rate: float, q, k, v, dout, bias=None) -> list[tf.Tensor]:
    with tf.device(device):
        watched = [q, k, v] + ([bias] if bias is not None else [])
        with tf.GradientTape() as tape:
            tape.watch(watched)
            out, lse = fused_attention(q, k, v, tables, heads, key_padding_mask=x["kpm"], bias=bias,
                                       dropout_rate=dropout_rate, seed=7, return_lse=True,
                                       kv_heads=x.get("kv_heads"), q_segment_ids=x.get("q_ids"),
                                       k_segment_ids=x.get("k_ids"))
        grads = tape.gradient(out, watched, output_gradients=dout)
        return [out, lse, *grads]


def compare(gpu: list[np.ndarray], cpu: list[np.ndarray], dtype) -> dict[str, float]:
    """Per output: the relative difference of the finite values, inf where the non-finite patterns differ."""
    result = {}
    for name, g, c in zip(NAMES, gpu, cpu):
        same = all(np.array_equal(f(g), f(c)) for f in (np.isnan, np.isposinf, np.isneginf))
        finite = np.isfinite(c)
        diff = np.abs(g[finite] - c[finite]).max(initial=0.0) / max(np.abs(c[finite]).max(initial=0.0), 1e-30)
        result[name] = float(diff) if same else float("inf")
    return result


def make(rng, tables, heads: int, d: int, batch: int = 2, bias_shape=None, kpm: bool = True,
         kv_heads: int | None = None, segments: bool = False) -> dict:
    tq, tk = tables.n_q, tables.n_k
    kvh = kv_heads or heads
    x = {n: rng.uniform(-1, 1, (batch, t, h * d))
         for n, t, h in (("q", tq, heads), ("k", tk, kvh), ("v", tk, kvh), ("dout", tq, heads))}
    x["kv_heads"] = kv_heads
    if segments:  # packed sequences: sorted ids, one key segment (2) that no query has, with NaN k, v there
        x["q_ids"] = np.sort(rng.integers(0, 2, (batch, tq)), axis=1).astype(np.int32)
        x["k_ids"] = np.sort(rng.integers(0, 3, (batch, tk)), axis=1).astype(np.int32)
        x["k"][x["k_ids"] == 2] = np.nan
        x["v"][x["k_ids"] == 2] = np.nan
    x["kpm"] = rng.random((batch, tk)) < 0.8 if kpm else None
    if kpm and batch:
        x["kpm"][:, 3] = False
    x["bias"] = None if bias_shape is None else rng.normal(0, 1, (*bias_shape, tq, tk))
    return x


def cases(rng):
    """(name, x, tables, heads, dropout_rate)."""
    causal32 = fused_tables_for_pattern(patterns.Causal(), 128, 128, 32)
    per_head8 = fused_tables_for_pattern(patterns.Fixed(32, 4, 1, 4, 8), 64, 64, 8)
    for bb, hb in ((2, 2), (1, 2), (2, 1), (1, 1)):
        yield f"mma bias[{bb},{hb}] kpm dropout", make(rng, causal32, 2, 64, bias_shape=(bb, hb)), causal32, 2, 0.1
        yield f"simt bias[{bb},{hb}] per-head kpm", make(rng, per_head8, 4, 24, bias_shape=(bb, 4 if hb == 2 else 1)), \
            per_head8, 4, 0.0
    yield "rank-3 bias", make(rng, causal32, 2, 64, bias_shape=(2,)), causal32, 2, 0.0
    x = make(rng, causal32, 2, 64, bias_shape=(2, 1))
    padded = np.argwhere(~x["kpm"])
    x["v"][padded[:, 0], padded[:, 1]] = np.nan
    x["k"][padded[:, 0], padded[:, 1]] = np.inf
    x["bias"][padded[:, 0], :, :, padded[:, 1]] = np.nan
    x["bias"][0, :, :, 40] = -np.inf
    x["v"][0, 40] = np.nan
    x["k"][0, 40] = np.nan
    yield "NaN/Inf at padded keys and a -inf bias column", x, causal32, 2, 0.0
    x = make(rng, causal32, 2, 64, bias_shape=(1, 2))
    x["v"][1, 70, :5] = np.nan  # attended by rows >= 70 of batch entry 1: they turn NaN on both devices
    yield "attended NaN value", x, causal32, 2, 0.0
    yield "batch 0", make(rng, causal32, 2, 64, batch=0, bias_shape=(1, 2), kpm=False), causal32, 2, 0.0
    yield "gqa 4 on 2 + segment ids (NaN in a key-only segment)", \
        make(rng, causal32, 4, 64, bias_shape=(1, 4), kv_heads=2, segments=True), causal32, 4, 0.1
    yield "simt mqa + segment ids", make(rng, per_head8, 4, 24, kv_heads=1, segments=True), per_head8, 4, 0.0
    cross = random_tables(rng, 32, 3, 5, 2)
    yield "Tq != Tk, per-head layouts", make(rng, cross, 2, 64, bias_shape=(1, 2)), cross, 2, 0.1
    # Two tables of one shape (same row_ptr, different blocks and masks), in turn: the cache keys on contents.
    diagonal = np.eye(4, dtype=bool)[None]
    for name, layout in (("diagonal", diagonal), ("anti-diagonal", diagonal[:, ::-1]), ("diagonal again", diagonal)):
        tril = lambda h, qb, kb: np.tril(np.ones((len(qb), 32, 32), bool))  # noqa: E731
        same_shape = build_fused_tables(layout, 32, np.zeros_like(layout), tril)
        yield f"same-shape tables: {name}", make(rng, same_shape, 2, 64, kpm=False), same_shape, 2, 0.0


def zero_length_with_segments(rng, tq: int, tk: int, device: str = "/GPU:0", heads: int = 2, d: int = 32,
                              bs: int = 16) -> bool:
    """The raw ops on `device` with Tq = 0 or Tk = 0 and segment ids (TF hands the kernel a NULL pointer for the
    empty side): output 0, lse -inf, gradients 0, as on the CPU."""
    ops = load_ops()
    with tf.device(device):
        q, k, v = (tf.constant(rng.standard_normal((1, t, heads * d)), tf.float32) for t in (tq, tk, tk))
        x = dict(q=q, k=k, v=v, row_ptr=np.zeros((1, tq // bs + 1), np.int32), row_entries=np.zeros((0, 2), np.int32),
                 masks=np.zeros((0, bs, 1), np.int32), key_padding_mask=tf.zeros([0], tf.bool), bias=tf.zeros([0]),
                 q_segment_ids=tf.zeros([1, tq], tf.int32), k_segment_ids=tf.zeros([1, tk], tf.int32),
                 seed=tf.constant(0, tf.int64), heads=heads, block_size=bs, scale=0.5, has_segment_ids=True)
        out, lse = ops.bsattn_fused_attention(**x, q_offset=tf.constant(0, tf.int32))  # the forward only
        grads = ops.bsattn_fused_attention_grad(**dict(
            x, out=out, lse=lse, dout=tf.ones_like(out), dlse=tf.zeros([0]), col_ptr=np.zeros((1, tk // bs + 1), np.int32),
            col_entries=np.zeros((0, 2), np.int32)))
    return (out.shape == (1, tq, heads * d) and lse.shape == (1, heads, tq) and not out.numpy().any()
            and bool(np.isneginf(lse.numpy()).all()) and all(not g.numpy().any() for g in grads[:3]))


def raw_ops(device: str, x: dict, tables, heads: int, dtype, period: int = 0,
            head_major: bool = False) -> list[np.ndarray]:
    """out, lse, dq, dk, dv (and dbias when x has a bias) of the raw ops on `device` with strided_period = period
    (token-order inputs x [B, T, H*D]); head_major: q, k, v, dout handed over as [B, H, T, D], out, dq, dk, dv
    transposed back to [B, T, H*D]."""
    ops = load_ops()
    d = x["q"].shape[2] // heads
    to_op = lambda a, h: a.reshape(*a.shape[:2], h, d).transpose(0, 2, 1, 3) if head_major else a  # noqa: E731
    back = lambda a: a.transpose(0, 2, 1, 3).reshape(a.shape[0], a.shape[2], -1) if head_major else a  # noqa: E731
    with tf.device(device):
        kvh = x.get("kv_heads") or heads
        q, k, v, dout = (tf.cast(tf.constant(to_op(x[n], h), tf.float64), dtype)
                         for n, h in (("q", heads), ("k", kvh), ("v", kvh), ("dout", heads)))
        seg = x.get("q_ids") is not None
        has_bias = x.get("bias") is not None
        common = dict(
            row_ptr=tables.row_ptr, row_entries=tables.row_entries, masks=tables.masks,
            key_padding_mask=tf.constant(x["kpm"]),
            bias=tf.cast(tf.constant(x["bias"], tf.float64), dtype) if has_bias else tf.zeros([0, 0, 0, 0], dtype),
            q_segment_ids=x["q_ids"] if seg else tf.zeros([0, 0], tf.int32),
            k_segment_ids=x["k_ids"] if seg else tf.zeros([0, 0], tf.int32), seed=tf.constant(11, tf.int64),
            heads=heads, kv_heads=x.get("kv_heads") or 0, block_size=tables.block_size,
            scale=float(1 / np.sqrt(d)), dropout_rate=x["rate"], has_key_padding_mask=True, has_bias=has_bias,
            has_segment_ids=seg, strided_period=period, head_major=head_major)
        out, lse = ops.bsattn_fused_attention(q=q, k=k, v=v, q_offset=tf.constant(0, tf.int32), **common)
        grads = ops.bsattn_fused_attention_grad(
            q=q, k=k, v=v, out=out, lse=lse, dout=dout, dlse=tf.constant(x["dlse"], tf.float32), col_ptr=tables.col_ptr,
            col_entries=tables.col_entries, has_dlse=True, **common)
    result = [np.asarray(tf.cast(t, tf.float64)) for t in (out, lse, *grads[:3])]
    result = [back(result[0]), result[1], *(back(g) for g in result[2:])]
    return result + ([np.asarray(tf.cast(grads[3], tf.float64))] if has_bias else [])


def strided_cases(rng):
    """(name, x, tables, heads, period): token-order inputs of the raw ops with strided_period."""
    for name, bs, d, heads, kv_heads, period, rate, seg in (("mma", 32, 64, 4, 2, 4, 0.1, True),
                                                             ("simt", 16, 24, 2, 0, 3, 0.0, False)):
        t = period * 2 * bs  # two blocks per residue class
        tables = fused_tables_for_pattern(patterns.Strided(period), t, t, bs) if name == "mma" else \
            random_tables(rng, bs, t // bs, t // bs, heads)
        x = make(rng, tables, heads, d, kv_heads=kv_heads or None, segments=seg)
        x["rate"] = rate
        x["dlse"] = rng.normal(0, 0.5, (2, heads, t)).astype(np.float32)
        yield f"raw ops strided_period={period} {name}", x, tables, heads, period


def check_strided(rng) -> tuple[int, int]:
    """strided_cases on the GPU against the CPU (the same op), and against the GPU's op without strided_period on
    the permuted inputs, mapped back (the forward bit for bit, the gradients within the tolerance)
    → (total, failed)."""
    total = failed = 0
    for name, x, tables, heads, period in strided_cases(rng):
        perm = patterns.strided_permutation(tables.n_q, period)
        inv = np.argsort(perm)
        xp = dict(x, dlse=x["dlse"][:, :, perm], **{n: None if x.get(n) is None else x[n][:, perm]
                                                   for n in ("q", "k", "v", "dout", "kpm", "q_ids", "k_ids")})
        for dtype, tol in TOL.items():
            gpu = raw_ops("/GPU:0", x, tables, heads, dtype, period)
            cpu = raw_ops("/CPU:0", x, tables, heads, dtype, period)
            permuted = raw_ops("/GPU:0", xp, tables, heads, dtype, 0)
            permuted = [p[:, :, inv] if i == 1 else p[:, inv] for i, p in enumerate(permuted)]
            diffs = dict(zip(("out", "lse", "dq", "dk", "dv"), compare(gpu, cpu, dtype).values()))
            vs_permuted = dict(zip(("out", "lse", "dq", "dk", "dv"), compare(gpu, permuted, dtype).values()))
            bits = all(np.array_equal(a, b, equal_nan=True) for a, b in zip(gpu[:2], permuted[:2]))
            ok = all(v <= tol for v in (*diffs.values(), *vs_permuted.values())) and bits
            total += 1
            failed += not ok
            shown = " ".join(f"{k} {v:.1e}" for k, v in diffs.items())
            print(f"{'ok  ' if ok else 'FAIL'} {name:45s} {dtype.name:9s} vs CPU {shown}; vs permuted "
                  f"{max(vs_permuted.values()):.1e}, forward bits {'equal' if bits else 'DIFFER'}", flush=True)
    return total, failed


def head_major_cases(rng):
    """(name, x, tables, heads, period): token-order inputs of the raw ops with head_major."""
    causal32 = fused_tables_for_pattern(patterns.Causal(), 128, 128, 32)
    x = make(rng, causal32, 4, 64, bias_shape=(2, 4), kv_heads=2, segments=True)
    yield "raw ops head_major mma gqa bias segments", dict(x, rate=0.1), causal32, 4, 0
    cross = random_tables(rng, 16, 3, 5, 2)
    yield "raw ops head_major simt Tq != Tk", dict(make(rng, cross, 2, 24, bias_shape=(1, 2)), rate=0.0), cross, 2, 0
    strided = fused_tables_for_pattern(patterns.Strided(4), 256, 256, 32)
    x = dict(make(rng, strided, 4, 64, kv_heads=2), rate=0.1)
    yield "raw ops head_major strided_period=4 mma", x, strided, 4, 4


def check_head_major(rng) -> tuple[int, int]:
    """head_major_cases on the GPU against the CPU (the same op), and against the GPU's op in the default layout on
    the same values (out, lse, dk, dv, dbias bit for bit; dq within the tolerance) → (total, failed)."""
    total = failed = 0
    for name, x, tables, heads, period in head_major_cases(rng):
        x["dlse"] = rng.normal(0, 0.5, (2, heads, tables.n_q)).astype(np.float32)
        names = ("out", "lse", "dq", "dk", "dv", "dbias")[: 5 + (x["bias"] is not None)]
        for dtype, tol in TOL.items():
            gpu = raw_ops("/GPU:0", x, tables, heads, dtype, period, head_major=True)
            cpu = raw_ops("/CPU:0", x, tables, heads, dtype, period, head_major=True)
            plain = raw_ops("/GPU:0", x, tables, heads, dtype, period)
            diffs = dict(zip(names, compare(gpu, cpu, dtype).values()))
            vs_plain = dict(zip(names, compare(gpu, plain, dtype).values()))
            bits = all(np.array_equal(gpu[i], plain[i], equal_nan=True) for i in range(len(names)) if names[i] != "dq")
            ok = all(v <= tol for v in (*diffs.values(), *vs_plain.values())) and bits
            total += 1
            failed += not ok
            shown = " ".join(f"{k} {v:.1e}" for k, v in diffs.items())
            print(f"{'ok  ' if ok else 'FAIL'} {name:45s} {dtype.name:9s} vs CPU {shown}; vs default layout "
                  f"{max(vs_plain.values()):.1e}, bits (all but dq) {'equal' if bits else 'DIFFER'}", flush=True)
    return total, failed


def random_tables(rng, bs: int, n_qb: int, n_kb: int, layouts: int):
    """Random per-head layouts with partial blocks (every query-block row keeps its first key block)."""
    active = rng.random((layouts, n_qb, n_kb)) < 0.6
    active[:, :, 0] = True
    full = active & (rng.random(active.shape) < 0.5)
    return build_fused_tables(active, bs, full, lambda h, qb, kb: rng.random((len(qb), bs, bs)) < 0.7)


def unfused_cases():
    """(name, mode kwargs) of blocksparse_attention_impl: every attn_mode."""
    yield "all", {"attn_mode": "all"}
    yield "local", {"attn_mode": "local", "local_attn_ctx": 64}
    yield "strided", {"attn_mode": "strided", "local_attn_ctx": 4}
    yield "fixed", {"attn_mode": "fixed", "local_attn_ctx": 64, "num_verts": 2, "vertsize": 1}


# tf.function for the blocksparse_attention_impl cases too (doubles their time; the fused cases always run both).
IMPL_GRAPH = os.environ.get("TF_GPU_IMPL_GRAPH", "0") == "1"


def run_impl(device: str, x: dict, heads: int, dtype, engine: str, mode: dict, graph: bool) -> list[np.ndarray]:
    """blocksparse_attention_impl's output and dq, dk, dv on `device` (inputs as arguments, as in run)."""

    def fn(q, k, v, dout):
        with tf.device(device):
            with tf.GradientTape() as tape:
                tape.watch([q, k, v])
                out = blocksparse_attention_impl(q, k, v, heads, blocksize=32, engine=engine, **mode)
            return [out, *tape.gradient(out, [q, k, v], output_gradients=dout)]

    inputs = _inputs(device, dict(x, bias=None), dtype)
    return [np.asarray(tf.cast(t, tf.float64)) for t in (tf.function(fn) if graph else fn)(*inputs)]


def main() -> None:
    gpus = tf.config.list_physical_devices("GPU")
    print("GPUs:", gpus)
    if not gpus:
        sys.exit("no GPU")
    # Without soft placement an op lacking a GPU kernel fails instead of silently running on the CPU.
    tf.config.set_soft_device_placement(False)
    rng = np.random.default_rng(0)
    failed = 0
    total = 0
    for name, x, tables, heads, rate in cases(rng):
        for dtype, tol in TOL.items():
            cpu = run("/CPU:0", x, tables, heads, dtype, rate)
            for graph in (False, True):
                total += 1
                diffs = compare(run("/GPU:0", x, tables, heads, dtype, rate, graph), cpu, dtype)
                ok = all(v <= tol for v in diffs.values())
                failed += not ok
                shown = " ".join(f"{k} {v:.1e}" for k, v in diffs.items())
                where = "tf.function" if graph else "eager"
                print(f"{'ok  ' if ok else 'FAIL'} {name:45s} {dtype.name:9s} {where:11s} {shown}", flush=True)
    x = make(rng, fused_tables_for_pattern(patterns.Causal(), 256, 256, 32), 2, 32, kpm=False)
    for mode_name, mode in unfused_cases():
        for engine in ("unfused", "fused"):
            for dtype, tol in TOL.items():
                cpu = run_impl("/CPU:0", x, 2, dtype, engine, mode, False)
                for graph in (False, True) if IMPL_GRAPH else (False,):
                    total += 1
                    gpu = run_impl("/GPU:0", x, 2, dtype, engine, mode, graph)
                    diffs = dict(zip(("out", "dq", "dk", "dv"), compare(gpu, cpu, dtype).values()))
                    ok = all(v <= tol for v in diffs.values())
                    failed += not ok
                    shown = " ".join(f"{k} {v:.1e}" for k, v in diffs.items())
                    where = "tf.function" if graph else "eager"
                    status = "ok  " if ok else "FAIL"
                    print(f"{status} impl {mode_name:8s} {engine:7s} {dtype.name:9s} {where:11s} {shown}", flush=True)
    for check in (check_strided, check_head_major):
        part_total, part_failed = check(rng)
        total += part_total
        failed += part_failed
    for tq, tk in ((0, 32), (32, 0)):
        total += 1
        ok = zero_length_with_segments(rng, tq, tk)
        failed += not ok
        print(f"{'ok  ' if ok else 'FAIL'} raw ops, Tq={tq} Tk={tk} with segment ids: zeros, lse -inf", flush=True)
    # Deterministic mode (TF's switch): the tensor-core gradient twice, bit for bit.
    tf.config.experimental.enable_op_determinism()
    causal32 = fused_tables_for_pattern(patterns.Causal(), 128, 128, 32)
    x = make(rng, causal32, 2, 64, bias_shape=(1, 2))
    for dtype in (tf.float16, tf.bfloat16):
        total += 1
        first, second = (_run("/GPU:0", x, causal32, 2, 0.0, *_inputs("/GPU:0", x, dtype)) for _ in range(2))
        same = all(np.array_equal(tf.bitcast(a, tf.int16).numpy(), tf.bitcast(b, tf.int16).numpy())
                   for a, b in zip(first[2:], second[2:]))
        failed += not same
        print(f"{'ok  ' if same else 'FAIL'} deterministic gradient, {dtype.name}: same bits twice", flush=True)
    print(f"{total - failed} of {total} GPU == CPU")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
