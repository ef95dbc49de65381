"""CPU benchmark of the fused block-sparse attention op (float32, inside tf.function).

Three parts, every case in a fresh process (2 TF intra-op threads, 1 inter-op; torch 2 threads):

  (a) dense causal attention: the fused op (Causal pattern) against PyTorch's CPU flash attention,
      ``scaled_dot_product_attention(..., is_causal=True)``, forward and forward+backward.
      GFLOP/s = 4·D·(attended pairs)·B·H / time for the forward, x3.5 for forward+backward (the
      FlashAttention convention: the backward counts 2.5 forwards). "useful" counts the T(T+1)/2 causal
      pairs for both; "computed" counts the fused op's active blocks (bs² pairs each).
      Target: fused / torch >= 1.0 (the ratio of times).
  (b) ``blocksparse_attention_impl`` (fused engine) against dense ``attention_impl`` for the 'fixed' and
      'strided' modes: speed-up against 1 / density (active / all blocks). Target: speed-up >= 0.8 / density.
      'strided' runs one op reading the permuted order in place (``strided_period``); its rows also time the
      previous path (``strided_transpose`` of q, k, v, the op, the inverse transpose), interleaved with it.
  (c) peak resident memory (ru_maxrss) of fused forward+backward of 'fixed' and 'strided', with the
      memory after importing TensorFlow and making the inputs ("base"). Target: linear in T, < 2 GB
      at T = 65536 with H = 4, D = 64.
  (d) bfloat16: the fused op (dense causal and 'fixed' tables) in bfloat16 at each CPU level
      (``BSATTN_CPU_ISA``: avx512bf16 = vdpbf16ps products, avx512 = the float32 products of the widened
      inputs) against the fused op in float32 and torch's ``scaled_dot_product_attention(is_causal=True)``
      in bfloat16 (dense causal for both tables: torch has no block-sparse kernel), forward and
      forward+backward. GF/s over the computed blocks (bs² pairs each), x3.5 for forward+backward.
      Targets: bf16 >= 4x fused float32 and >= 2x torch bf16. torch runs in ``--torch-python``.

    python benchmarks/cpu_attention.py              # the full measurement (quiet machine: ~15 min)
    python benchmarks/cpu_attention.py --quick      # small sizes: checks that everything runs
    python benchmarks/cpu_attention.py --parts a    # one part
    python benchmarks/cpu_attention.py --parts b --lengths 4096

Prints three tables and writes a JSON (``--out``; default outside the repository, see outputs.py).
torch is a benchmark-only dependency (``pip install torch==2.13.0``); without it part (a) reports the
fused op alone.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from outputs import default_out

FULL = {"a": [2048, 4096, 8192], "b": [4096, 8192, 16384], "c": [16384, 65536], "d": [4096, 8192]}
QUICK = {"a": [512, 1024], "b": [1024, 2048], "c": [2048, 8192], "d": [512, 1024]}
BF16_LEVELS = ("avx512bf16", "avx512")  # the BSATTN_CPU_ISA values of part (d)'s bfloat16 rows
MODES = ("fixed", "strided")


# ---- workers (one case each, in a fresh process) ---------------------------------------------------------


def _setup_tf(threads: int):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    return tf


def mode_kwargs(mode: str, n_ctx: int, blocksize: int) -> dict:
    """'strided': a stride near sqrt(T) (capped so that T / stride is a whole number of blocks);
    'fixed': chunks of 4 blocks, the last block of each chunk summarised (num_verts = vertsize = 1)."""
    if mode == "strided":
        stride = max(16, 2 ** round(math.log2(math.sqrt(n_ctx))))
        return {"local_attn_ctx": min(stride, n_ctx // blocksize)}
    return {"local_attn_ctx": 4 * blocksize, "num_verts": 1, "vertsize": 1}


def timed(fn, repeats: int) -> dict:
    """Wall seconds of ``fn()`` after a warm-up call (which also traces): median and min."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return {"median": statistics.median(times), "min": min(times)}


def timed_interleaved(fns: dict, repeats: int) -> dict:
    """``timed`` for several functions, their repeats interleaved (a, b, a, b, ...), so that a shared machine's
    load disturbs them alike: name -> {"median", "min"}."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: {"median": statistics.median(t), "min": min(t)} for name, t in times.items()}


def tf_runners(tf, attend, inputs):
    @tf.function
    def forward():
        return tf.reduce_sum(attend(*inputs))

    @tf.function
    def forward_backward():
        with tf.GradientTape() as tape:
            tape.watch(inputs)
            loss = tf.reduce_sum(attend(*inputs))
        return tape.gradient(loss, inputs)

    return (lambda: forward().numpy()), (lambda: [g.numpy() for g in forward_backward()])


def worker(kind: str, n_ctx: int, mode: str, args) -> dict:
    """kind: 'fused' (a: causal fused op), 'torch' (a), 'sparse' / 'dense' (b: the two attention impls),
    'memory' (c: peak RSS of one fused forward+backward)."""
    if kind == "torch":  # mode: "all" (float32) or "bfloat16"
        import torch

        torch.set_num_threads(args.threads)
        dtype = torch.bfloat16 if mode == "bfloat16" else torch.float32
        q, k, v = (torch.rand(args.batch, args.heads, n_ctx, args.head_dim, dtype=dtype, requires_grad=True)
                   for _ in range(3))  # fmt: skip

        def forward():
            with torch.no_grad():
                torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)

        def forward_backward():
            torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()

        return {"fwd": timed(forward, args.repeats), "fwdbwd": timed(forward_backward, args.repeats)}

    tf = _setup_tf(args.threads)
    import numpy as np

    import bsattn
    from bsattn.fused_attention import fused_attention
    from bsattn.fused_tables import fused_tables_for_pattern

    heads = args.dense_heads if kind in ("sparse", "dense", "strided_paths") else args.heads
    rng = np.random.default_rng(0)
    shape = (args.batch, n_ctx, heads * args.head_dim)
    inputs = [tf.constant(rng.random(shape, dtype=np.float32) * 2 - 1) for _ in range(3)]  # no float64 temporaries
    if kind == "fused_dtypes":  # (d): mode = pattern; float32 and bfloat16 in one process, timed interleaved
        if mode == "causal":
            layout = bsattn.patterns.Causal()
        else:
            layout = bsattn.patterns.mode_pattern(mode, n_ctx, heads, blocksize=args.blocksize,
                                                  **mode_kwargs(mode, n_ctx, args.blocksize))  # fmt: skip
        tables = fused_tables_for_pattern(layout, n_ctx, n_ctx, args.blocksize)
        fns = {}
        for dtype in ("float32", "bfloat16"):
            cast = [tf.cast(x, dtype) for x in inputs]
            fwd, fwd_bwd = tf_runners(tf, lambda q, k, v: fused_attention(q, k, v, tables, heads), cast)
            fns[f"{dtype}_fwd"], fns[f"{dtype}_fwdbwd"] = fwd, fwd_bwd
        times = timed_interleaved(fns, args.repeats)
        result = {"blocks": int(tables.blocks_per_head.sum()) * heads // tables.lut_heads}
        for dtype in ("float32", "bfloat16"):
            result[dtype] = {part: times[f"{dtype}_{part}"] for part in ("fwd", "fwdbwd")}
        return result
    if kind == "strided_paths":  # (b): 'strided' in one op against the transposed path, timed interleaved
        from bsattn.sparse_attention import _strided_untranspose, strided_transpose

        kwargs = mode_kwargs("strided", n_ctx, args.blocksize)
        period, bs = kwargs["local_attn_ctx"], args.blocksize
        tables = fused_tables_for_pattern(bsattn.patterns.Strided(period), n_ctx, n_ctx, bs)

        def transposed(q, k, v):
            q, k, v = (strided_transpose(t, n_ctx, period, bs) for t in (q, k, v))
            return _strided_untranspose(fused_attention(q, k, v, tables, heads), n_ctx, period)

        def one_op(q, k, v):
            return bsattn.blocksparse_attention_impl(q, k, v, heads, "strided", blocksize=bs, **kwargs)

        fns = {}
        for name, attend in (("one_op", one_op), ("transposed", transposed)):
            fns[f"{name}_fwd"], fns[f"{name}_fwdbwd"] = tf_runners(tf, attend, inputs)
        times = timed_interleaved(fns, args.repeats)
        parts = ("fwd", "fwdbwd")
        return {name: {part: times[f"{name}_{part}"] for part in parts} for name in ("one_op", "transposed")}
    if kind == "fused":
        tables = fused_tables_for_pattern(bsattn.patterns.Causal(), n_ctx, n_ctx, args.blocksize)
        fwd, fwd_bwd = tf_runners(tf, lambda q, k, v: fused_attention(q, k, v, tables, heads), inputs)
        result = {"blocks": int(tables.blocks_per_head.sum()) * heads // tables.lut_heads}  # over all heads
        return dict(result, fwd=timed(fwd, args.repeats), fwdbwd=timed(fwd_bwd, args.repeats))

    kwargs = dict(mode_kwargs(mode, n_ctx, args.blocksize), blocksize=args.blocksize)
    impl = bsattn.blocksparse_attention_impl if kind in ("sparse", "memory") else bsattn.attention_impl
    fwd, fwd_bwd = tf_runners(tf, lambda q, k, v: impl(q, k, v, heads, mode, **kwargs), inputs)
    if kind == "memory":
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        start = time.perf_counter()
        fwd_bwd()
        return {"base_mb": base, "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "fwdbwd_first_s": time.perf_counter() - start}  # fmt: skip
    return {"fwd": timed(fwd, args.repeats), "fwdbwd": timed(fwd_bwd, args.repeats)}


def in_subprocess(kind: str, n_ctx: int, mode: str, args, python: str = sys.executable, env: dict | None = None) -> dict:
    """Runs ``worker`` in a fresh process (``python``, environment ``env``); a failure (e.g. out of memory) is
    reported, not fatal."""
    cmd = [python, __file__, "--worker", kind, str(n_ctx), mode, *args.passthrough]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        if proc.returncode in (-9, 137):
            return {"error": "out of memory (killed)"}
        return {"error": (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---- the three parts -----------------------------------------------------------------------------------------


def _rate(flops: float, result: dict, key: str, factor: float = 1.0, stat: str = "median"):
    t = result.get(key, {}).get(stat) if isinstance(result.get(key), dict) else None
    return None if not t else factor * flops / t / 1e9


def part_a(args) -> list[dict]:
    rows = []
    for n_ctx in args.lengths["a"]:
        fused = in_subprocess("fused", n_ctx, "all", args)
        torch_result = in_subprocess("torch", n_ctx, "all", args) if args.torch else {"error": "torch not installed"}
        per_pair = 4 * args.head_dim * args.batch * args.heads
        useful = per_pair * n_ctx * (n_ctx + 1) / 2
        row = {"T": n_ctx, "fused": fused, "torch": torch_result}
        for name, result in (("fused", fused), ("torch", torch_result)):
            row[f"{name}_fwd_gflops"] = _rate(useful, result, "fwd")
            row[f"{name}_fwdbwd_gflops"] = _rate(useful, result, "fwdbwd", 3.5)
        if "blocks" in fused:
            computed = 4 * args.head_dim * args.batch * fused["blocks"] * args.blocksize**2  # blocks: all heads
            row["fused_fwd_gflops_computed"] = _rate(computed, fused, "fwd")
            row["fused_fwdbwd_gflops_computed"] = _rate(computed, fused, "fwdbwd", 3.5)
        for part in ("fwd", "fwdbwd"):
            if row[f"fused_{part}_gflops"] and row[f"torch_{part}_gflops"]:
                row[f"ratio_{part}"] = row[f"fused_{part}_gflops"] / row[f"torch_{part}_gflops"]
        rows.append(row)
        print(f"done (a) T={n_ctx}", flush=True)
    return rows


def part_b(args) -> list[dict]:
    from bsattn import patterns
    from bsattn.fused_tables import fused_tables_for_pattern

    rows = []
    for n_ctx in args.lengths["b"]:
        for mode in MODES:
            kwargs = mode_kwargs(mode, n_ctx, args.blocksize)
            pattern = patterns.mode_pattern(mode, n_ctx, args.dense_heads, blocksize=args.blocksize, **kwargs)
            density = fused_tables_for_pattern(pattern, n_ctx, n_ctx, args.blocksize).density
            row = {"T": n_ctx, "mode": mode, **kwargs, "density": density}
            for kind in ("sparse", "dense"):
                row[kind] = in_subprocess(kind, n_ctx, mode, args)
            if mode == "strided":
                row["strided_paths"] = in_subprocess("strided_paths", n_ctx, mode, args)
            for part in ("fwd", "fwdbwd"):
                sparse, dense = row["sparse"].get(part), row["dense"].get(part)
                if sparse and dense:
                    row[f"speedup_{part}"] = dense["median"] / sparse["median"]
                    row[f"speedup_{part}_vs_target"] = row[f"speedup_{part}"] * density
            rows.append(row)
            print(f"done (b) T={n_ctx} {mode}", flush=True)
    return rows


def part_c(args) -> list[dict]:
    rows = []
    for mode in MODES:
        for n_ctx in args.lengths["c"]:
            rows.append({"T": n_ctx, "mode": mode, **in_subprocess("memory", n_ctx, mode, args)})
            print(f"done (c) T={n_ctx} {mode}", flush=True)
    return rows


def part_d(args) -> list[dict]:
    """One row per (T, pattern): fused float32, fused bfloat16 per level, torch bf16. Each level's process
    times float32 and bfloat16 interleaved (its own float32 column: the ratio compares runs under the same
    load); rates and ratios use the fastest repeat (the machine is shared: the least disturbed)."""
    rows = []
    torch_bf16 = {}
    for n_ctx in args.lengths["d"]:
        if args.torch_python:
            torch_bf16[n_ctx] = in_subprocess("torch", n_ctx, "bfloat16", args, python=args.torch_python)
        for pattern in ("causal", "fixed"):
            row = {"T": n_ctx, "pattern": pattern, "torch_bf16": torch_bf16.get(n_ctx, {"error": "no torch"})}
            for level in BF16_LEVELS:
                env = dict(os.environ, BSATTN_CPU_ISA=level)
                row[level] = in_subprocess("fused_dtypes", n_ctx, pattern, args, env=env)
            first = row[BF16_LEVELS[0]]
            computed = 4 * args.head_dim * args.batch * first.get("blocks", 0) * args.blocksize**2
            useful_causal = 4 * args.head_dim * args.batch * args.heads * n_ctx * (n_ctx + 1) / 2
            for part, factor in (("fwd", 1.0), ("fwdbwd", 3.5)):
                for level in BF16_LEVELS:
                    for dtype in ("float32", "bfloat16"):
                        row[f"{level}_{dtype}_{part}_gflops"] = _rate(computed, row[level].get(dtype, {}), part,
                                                                      factor, "min")  # fmt: skip
                row[f"torch_bf16_{part}_gflops"] = _rate(useful_causal, row["torch_bf16"], part, factor, "min")
                if "float32" in first:
                    best = first["bfloat16"][part]["min"]
                    row[f"bf16_over_float32_{part}"] = first["float32"][part]["min"] / best
                    if part in row["torch_bf16"]:  # times: torch's dense causal call against the fused op's
                        row[f"bf16_over_torch_{part}"] = row["torch_bf16"][part]["min"] / best
            rows.append(row)
            print(f"done (d) T={n_ctx} {pattern}", flush=True)
    return rows


# ---- output --------------------------------------------------------------------------------------------------


def fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def secs(result: dict, key: str, stat: str = "median") -> str:
    if "error" in result:
        return f"{result['error'][:10]:>9}"
    return fmt(result[key][stat], "8.4f") + "s"


def print_tables(results: dict, args) -> None:
    if "a" in results:
        print(f"\n(a) dense causal, B={args.batch} H={args.heads} D={args.head_dim} bs={args.blocksize}: "
              "GF/s over useful pairs (computed blocks for fused in brackets)")  # fmt: skip
        print(f"{'T':>6} | {'fused fwd':>9} {'GF/s':>14} | {'torch fwd':>9} {'GF/s':>6} | {'fused f+b':>9} {'GF/s':>14} |"
              f" {'torch f+b':>9} {'GF/s':>6} | {'ratio fwd':>9} {'f+b':>5}")  # fmt: skip
        for r in results["a"]:
            fused, tor = r["fused"], r["torch"]
            print(
                f"{r['T']:>6} | {secs(fused, 'fwd')} {fmt(r['fused_fwd_gflops'], '6.1f')} "
                f"[{fmt(r.get('fused_fwd_gflops_computed'), '5.1f')}] | {secs(tor, 'fwd')} {fmt(r['torch_fwd_gflops'], '6.1f')} |"
                f" {secs(fused, 'fwdbwd')} {fmt(r['fused_fwdbwd_gflops'], '6.1f')} "
                f"[{fmt(r.get('fused_fwdbwd_gflops_computed'), '5.1f')}] | {secs(tor, 'fwdbwd')}"
                f" {fmt(r['torch_fwdbwd_gflops'], '6.1f')} | {fmt(r.get('ratio_fwd'), '8.2f')}x"
                f" {fmt(r.get('ratio_fwdbwd'), '4.2f')}x"
            )
    if "b" in results:
        print(f"\n(b) blocksparse_attention_impl (fused) vs attention_impl (dense), B={args.batch} "
              f"H={args.dense_heads} D={args.head_dim} bs={args.blocksize}; target: speed-up x density >= 0.8")  # fmt: skip
        print(f"{'T':>6} {'mode':>8} {'L':>4} {'density':>8} {'1/dens':>7} | {'fused fwd':>9} {'dense fwd':>9}"
              f" {'speed-up':>8} {'x dens':>6} | {'fused f+b':>9} {'dense f+b':>9} {'speed-up':>8} {'x dens':>6}")  # fmt: skip
        for r in results["b"]:
            print(
                f"{r['T']:>6} {r['mode']:>8} {r['local_attn_ctx']:>4} {r['density']:>8.4f} {1 / r['density']:>7.1f} |"
                f" {secs(r['sparse'], 'fwd')} {secs(r['dense'], 'fwd')} {fmt(r.get('speedup_fwd'), '7.1f')}x"
                f" {fmt(r.get('speedup_fwd_vs_target'), '6.2f')} | {secs(r['sparse'], 'fwdbwd')}"
                f" {secs(r['dense'], 'fwdbwd')} {fmt(r.get('speedup_fwdbwd'), '7.1f')}x"
                f" {fmt(r.get('speedup_fwdbwd_vs_target'), '6.2f')}"
            )
        strided = [r for r in results["b"] if "strided_paths" in r]
        if strided:
            print("\n(b) 'strided': one op (strided_period) vs the transposed path, timed interleaved in one process")
            print(f"{'T':>6} {'L':>4} | {'one op fwd':>10} {'transp fwd':>10} {'ratio':>6} | {'one op f+b':>10}"
                  f" {'transp f+b':>10} {'ratio':>6}")  # fmt: skip
        for r in strided:
            paths = r["strided_paths"]
            if "error" in paths:
                print(f"{r['T']:>6} {r['local_attn_ctx']:>4} | {paths['error']}")
                continue
            cells = []
            for part in ("fwd", "fwdbwd"):
                new, old = paths["one_op"][part]["median"], paths["transposed"][part]["median"]
                cells.append(f"{new:>9.4f}s {old:>9.4f}s {old / new:>5.2f}x")
            print(f"{r['T']:>6} {r['local_attn_ctx']:>4} | {cells[0]} | {cells[1]}")
    if "c" in results:
        print(f"\n(c) peak RSS of fused forward+backward, B={args.batch} H={args.heads} D={args.head_dim} "
              f"bs={args.blocksize} (base: after importing TF and making the inputs)")  # fmt: skip
        print(f"{'T':>6} {'mode':>8} | {'base MB':>8} {'peak MB':>8} {'peak-base':>9} | {'first f+b':>9}")
        for r in results["c"]:
            if "error" in r:
                print(f"{r['T']:>6} {r['mode']:>8} | {r['error']}")
                continue
            print(f"{r['T']:>6} {r['mode']:>8} | {r['base_mb']:>8.0f} {r['peak_mb']:>8.0f}"
                  f" {r['peak_mb'] - r['base_mb']:>9.0f} | {r['fwdbwd_first_s']:>8.2f}s")  # fmt: skip


def print_part_d(rows: list[dict], args) -> None:
    print(f"\n(d) bfloat16, B={args.batch} H={args.heads} D={args.head_dim} bs={args.blocksize}: seconds (min of the"
          " repeats) and GF/s over computed blocks, per BSATTN_CPU_ISA level (float32 and bfloat16 timed interleaved"
          " in one process); torch = dense causal SDPA bf16 (GF/s over causal pairs); x f32 / x torch: the"
          f" {BF16_LEVELS[0]} bfloat16 speed-up over its float32 and over torch (targets 4x, 2x)")  # fmt: skip
    cols = [(level, dtype) for level in BF16_LEVELS for dtype in ("float32", "bfloat16")]
    for part in ("fwd", "fwdbwd"):
        head = " ".join(f"{level + (' f32' if dtype == 'float32' else ' bf16'):>20}" for level, dtype in cols)
        print(f"{part:>6} {'pattern':>7} | {head} | {'torch bf16':>20} | {'x f32':>6} {'x torch':>7}")
        for r in rows:
            cells = " ".join(f"{secs(r[level].get(dtype, r[level]), part, 'min')}"
                             f" {fmt(r[f'{level}_{dtype}_{part}_gflops'], '10.1f')}" for level, dtype in cols)  # fmt: skip
            tor = f"{secs(r['torch_bf16'], part, 'min')} {fmt(r[f'torch_bf16_{part}_gflops'], '10.1f')}"
            print(f"{r['T']:>6} {r['pattern']:>7} | {cells} | {tor} | {fmt(r.get(f'bf16_over_float32_{part}'), '5.2f')}x"
                  f" {fmt(r.get(f'bf16_over_torch_{part}'), '6.2f')}x")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", default=["a", "b", "c"], choices=["a", "b", "c", "d"])
    parser.add_argument("--torch-python", default=os.environ.get("BSATTN_TORCH_PYTHON", "/tmp/torchenv/bin/python"),
                        help="the python with torch for part (d)'s bfloat16 baseline (skipped when absent)")
    parser.add_argument("--quick", action="store_true", help="small sizes, one repeat: checks that it runs")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=4, help="heads of (a) and (c)")
    parser.add_argument("--dense-heads", type=int, default=2, help="heads of (b): the dense baseline must fit")
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--blocksize", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2, help="TF intra-op threads = torch threads")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--lengths", type=int, nargs="+", help="override the context lengths of every part")
    parser.add_argument(
        "--out", default=default_out("cpu_attention.json"), help="results JSON (default outside the repository)"
    )
    parser.add_argument("--worker", nargs=3, metavar=("KIND", "T", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.repeats = 1
    args.passthrough = [f"--batch={args.batch}", f"--heads={args.heads}", f"--dense-heads={args.dense_heads}",
                        f"--head-dim={args.head_dim}", f"--blocksize={args.blocksize}",
                        f"--threads={args.threads}", f"--repeats={args.repeats}"]  # fmt: skip
    if args.worker:
        kind, n_ctx, mode = args.worker
        print(json.dumps(worker(kind, int(n_ctx), mode, args)))
        return

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # also inherited by the workers
    lengths = QUICK if args.quick else FULL
    args.lengths = {part: args.lengths for part in lengths} if args.lengths else lengths
    try:
        import torch

        args.torch = torch.__version__
    except ImportError:
        args.torch = None
        print("torch is not installed (pip install torch==2.13.0): part (a) runs without the baseline")
    if not Path(args.torch_python).exists():
        args.torch_python = None
    results = {}
    for part, run in (("a", part_a), ("b", part_b), ("c", part_c), ("d", part_d)):
        if part in args.parts:
            results[part] = run(args)
    print_tables(results, args)
    if "d" in results:
        print_part_d(results["d"], args)

    from importlib.metadata import version

    meta = {
        "command": "python benchmarks/cpu_attention.py " + " ".join(sys.argv[1:]),
        "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "load_average": os.getloadavg(),
        "tensorflow": version("tensorflow"),
        "torch": args.torch,
        **{
            k: getattr(args, k)
            for k in ("batch", "heads", "dense_heads", "head_dim", "blocksize", "threads", "repeats")
        },
        "dtype": "float32 (d: bfloat16 too)",
        "torch_python": args.torch_python,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, **results}, indent=1))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
