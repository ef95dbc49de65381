"""Context parallelism on logical CPUs: bytes exchanged, peak memory per device and step time vs N.

    python benchmarks/context_parallel.py                 # T = 32768, N = 1, 2, 4; table + JSON
    python benchmarks/context_parallel.py --n_ctx 4096    # quicker
    python benchmarks/context_parallel.py --out benchmarks/results/context_parallel.json   # the committed one

For each N (a subprocess with N logical CPU devices: they must be configured before TensorFlow starts) and each
pattern ('local' and 'fixed', sparse_attention's modes), B = 1, H heads of size D, float32, forward + backward:

- bytes: ``ContextParallelPlan.exchange_bytes`` of the forward all-gather (``received``: what the replicas
  receive, summed; ``required``: what their rows need from other shards, the lower bound; ``all_kv``: an
  all-gather of all of K and V), and the backward's all-reduce of the gathered buffer's gradient (TensorFlow's
  all-gather gradient) per replica;
- peak MB per device: each replica's work alone on one device (its shard of q, k, v, the output gradient and
  the gathered buffer it would receive, then ``shard_attention`` forward + backward): the allocator's peak
  during the call above what was allocated before it (``tf.config.experimental.get_memory_info``), plus the
  bytes of those inputs, the largest over the replicas; logical CPUs share one allocator, so
  measuring the real N-replica step would give the sum of all devices;
- step seconds: the real N-replica step (MirroredStrategy over the N logical CPUs, the all-gather included),
  the fastest of ``--repeats``. Logical CPUs share the machine's cores, so this shows the overhead of the split
  (more, smaller op calls and the exchange) and not a speed-up; on N GPUs each device does 1/N of the work.

Writes ``--out`` (default outside the repository: ``benchmarks/outputs.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from outputs import default_out

ROOT = Path(__file__).resolve().parents[1]
MODES = {"local": ("local", 512), "fixed": ("fixed", 1024)}  # name -> (attn_mode, local_attn_ctx)


def worker(n: int, n_ctx: int, heads: int, head_dim: int, block: int, repeats: int) -> dict:
    import numpy as np
    import tensorflow as tf

    if n > 1:
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * n)
    from bsattn import patterns
    from bsattn.context_parallel import context_parallel_plan, shard_attention
    from bsattn.fused_attention import fused_attention
    from bsattn.fused_tables import fused_tables_for_pattern
    from bsattn.sparse_attention import blocksparse_attention_impl

    devices = [d.name for d in tf.config.list_logical_devices("CPU")]
    strategy = tf.distribute.MirroredStrategy(devices) if n > 1 else tf.distribute.get_strategy()
    width, length = heads * head_dim, n_ctx // n
    rng = np.random.default_rng(0)
    scale = 1.0 / np.sqrt(head_dim)
    results = {}
    for name, (mode, ctx) in MODES.items():
        pattern = patterns.mode_pattern(mode, n_ctx, heads, ctx, blocksize=block)
        tables = fused_tables_for_pattern(pattern, n_ctx, n_ctx, block)
        row = {"n": n, "pattern": f"{mode} {ctx}", "T": n_ctx, "block": block}

        def const(shape):
            return tf.constant(rng.uniform(0.05, 1, shape) * rng.choice([-1, 1], shape), tf.float32)

        # Peak memory of one device: each replica's work alone on CPU:0.
        peaks = []
        for shard in range(n):
            with tf.device("/CPU:0"):
                q, k, v, g = (const([1, length, width]) for _ in range(4))
                if n == 1:
                    gathered, attend = None, lambda q, k, v, _: fused_attention(q, k, v, tables, heads, scale=scale)
                else:
                    plan = context_parallel_plan(tables, n)
                    tokens = sum(plan.send_tokens(s) for s in range(n))
                    gathered = const([1, tokens, 2 * width])

                    def attend(q, k, v, buf, plan=plan, shard=shard):
                        return shard_attention(q, k, v, buf, plan, shard, heads, scale)

                @tf.function(autograph=False)
                def fwd_bwd(q, k, v, g, buf):
                    with tf.GradientTape() as tape:
                        watched = [q, k, v] + ([buf] if buf is not None else [])
                        tape.watch(watched)
                        loss = tf.reduce_sum(attend(q, k, v, buf) * g)
                    return tape.gradient(loss, watched, unconnected_gradients=tf.UnconnectedGradients.ZERO)

                fwd_bwd(q, k, v, g, gathered)  # trace and warm up
                tf.config.experimental.reset_memory_stats("CPU:0")
                before = tf.config.experimental.get_memory_info("CPU:0")["current"]
                [t.numpy() for t in fwd_bwd(q, k, v, g, gathered)]
                held = sum(int(np.prod(t.shape)) * 4 for t in (q, k, v, g, gathered) if t is not None)
                peaks.append((tf.config.experimental.get_memory_info("CPU:0")["peak"] - before + held) / 2**20)
        row["peak_mb_per_device"] = max(peaks)

        # Step time: the real N-replica step.
        full = [const([1, n_ctx, width]) for _ in range(4)]
        if n == 1:
            inputs = full
        else:
            inputs = [strategy.experimental_distribute_values_from_function(
                lambda c, x=x: x[:, c.replica_id_in_sync_group * length:(c.replica_id_in_sync_group + 1) * length])
                for x in full]  # fmt: skip

        @tf.function(autograph=False)
        def step(*args):
            def fn(q, k, v, g):
                with tf.GradientTape() as tape:
                    tape.watch([q, k, v])
                    out = blocksparse_attention_impl(q, k, v, heads, mode, ctx, block,
                                                     context_parallel=strategy if n > 1 else None)  # fmt: skip
                    loss = tf.reduce_sum(out * g)
                return tape.gradient(loss, [q, k, v])

            return strategy.run(fn, args=args)

        step(*inputs)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            tf.nest.map_structure(lambda t: t.numpy(), [strategy.experimental_local_results(r) for r in step(*inputs)])
            times.append(time.perf_counter() - start)
        row["step_seconds"] = min(times)
        if n > 1:
            plan = context_parallel_plan(tables, n)
            row.update(plan.exchange_bytes(1, width, 4))
            tokens = sum(plan.send_tokens(s) for s in range(n))
            row["backward_allreduce_per_replica"] = tokens * 2 * width * 4
        else:
            row.update(sent=0, received=0, required=0, all_kv=0, backward_allreduce_per_replica=0)
        results[name] = row
    return results


def mb(x: float) -> str:
    return f"{x / 2**20:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n_ctx", type=int, default=32768)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--head_dim", type=int, default=32)
    parser.add_argument("--block", type=int, default=64)
    parser.add_argument("--replicas", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--worker", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument(
        "--out", default=default_out("context_parallel.json"), help="results JSON (default outside the repository)"
    )
    args = parser.parse_args()
    sizes = (args.n_ctx, args.heads, args.head_dim, args.block, args.repeats)
    if args.worker:
        print("RESULT " + json.dumps(worker(args.worker, *sizes)))
        return
    rows = []
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "2"}
    for n in args.replicas:
        cmd = [sys.executable, __file__, "--worker", str(n), "--n_ctx", str(args.n_ctx), "--heads", str(args.heads),
               "--head_dim", str(args.head_dim), "--block", str(args.block),
               "--repeats", str(args.repeats)]  # fmt: skip
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode or not lines:
            raise SystemExit(f"N={n} failed:\n{proc.stderr[-3000:]}")
        rows.extend(json.loads(lines[0][len("RESULT ") :]).values())
    rows.sort(key=lambda r: (r["pattern"], r["n"]))
    print(f"T={args.n_ctx}, B=1, H={args.heads}, D={args.head_dim}, block {args.block}, float32, forward+backward; "
          "MB of K+V (all replicas summed) for the forward all-gather")  # fmt: skip
    header = ("pattern", "N", "peak MB/device", "step s", "received MB", "required MB", "all-K/V MB",
              "bwd all-reduce MB/replica")  # fmt: skip
    print(" | ".join(header))
    print(" | ".join("---" for _ in header))
    for r in rows:
        print(" | ".join([r["pattern"], str(r["n"]), f"{r['peak_mb_per_device']:.1f}", f"{r['step_seconds']:.3f}",
                          mb(r["received"]), mb(r["required"]), mb(r["all_kv"]),
                          mb(r["backward_allreduce_per_replica"])]))  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "worker")}
    Path(args.out).write_text(json.dumps({"settings": settings, "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
