"""KV-cache decoding, CPU: sampling from the enwik8 model with and without the cache, and the cost of one decoding
step against the position ``p``.

1. Sampling: the default enwik8 model (``examples.enwik8.config.Config()``: 4 blocks of width 128, 2 heads,
   ``fixed`` stride 128, blocks of 32; untrained, with a random output layer so that the bytes vary) at
   ``n_timesteps = T`` (4096), a prompt of ``T - n`` bytes of the built-in corpus, ``n`` (1,000) greedy bytes:
   ``sample(cache=True)`` (one prefill of the window with the normal fused op, then one decoding step per byte)
   against ``sample(cache=False)`` (the window re-run for every byte). Both must give the same bytes.
2. One decoding step of the attention alone (``blocksparse_decode_impl``, B = 1, H = 2, D = 64, T_max = T): median
   time against ``p`` for ``local`` (window 128: flat), ``fixed`` (window + summary columns: grows by one block
   per stride), ``strided`` and ``all`` (causal: linear in ``p``), through the op (``tf.function``) and through
   the TF path under XLA (``jit_compile``).

    nice python benchmarks/decode.py                     # T = 4096, 1,000 bytes (a few minutes on 2 cores)
    nice python benchmarks/decode.py --quick             # T = 512, 50 bytes: checks that it runs

Runs with 2 intra-op threads; prints tables and writes JSON (``--out``; default outside the repository, see
outputs.py) with the machine's load average before and after (the machine may be shared).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

from outputs import default_out

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def sampling(t: int, n_bytes: int) -> dict:
    import tensorflow as tf

    from examples.enwik8 import data as data_lib
    from examples.enwik8 import evaluate as eval_lib
    from examples.enwik8.config import Config
    from examples.enwik8.model import SparseTransformer

    cfg = Config(n_timesteps=t)
    model = SparseTransformer(cfg)
    model.head.w.assign(tf.random.stateless_normal(model.head.w.shape, [1, 2]))
    prompt = bytes(data_lib.load_bytes(None)[: t - n_bytes])
    result = {"T": t, "bytes": n_bytes, "prompt_bytes": len(prompt), "model": f"{cfg.n_layer}x{cfg.n_state}, "
              f"{cfg.n_head} heads, {cfg.attn_mode} stride {cfg.local_attn_ctx}, blocks of {cfg.blocksize}"}  # fmt: skip
    texts = {}
    for name, cache in (("cached", True), ("uncached", False)):
        eval_lib.sample(model, prompt[:64], 2, temperature=0.0, cache=cache)  # trace and warm up
        start = time.perf_counter()
        texts[name] = eval_lib.sample(model, prompt, n_bytes, temperature=0.0, cache=cache)
        result[f"{name}_s"] = time.perf_counter() - start
        print(f"  sampling {name}: {result[f'{name}_s']:.2f} s", flush=True)
    result["speedup"] = result["uncached_s"] / result["cached_s"]
    result["same_bytes"] = texts["cached"] == texts["uncached"]
    return result


def step_times(t: int, positions: list[int], repeats: int) -> list[dict]:
    import tensorflow as tf

    from bsattn import blocksparse_decode_impl

    heads, d, rows = 2, 64, []
    k, v = (tf.random.normal([1, t, heads * d]) for _ in range(2))
    q = tf.random.normal([1, 1, heads * d])
    for mode, kwargs in (("local", {"local_attn_ctx": 128}), ("fixed", {"local_attn_ctx": 128}),
                         ("strided", {"local_attn_ctx": t // 64}), ("all", {})):  # fmt: skip
        for path in ("op", "xla"):
            fn = tf.function(lambda q, k, v, p, mode=mode, kwargs=kwargs: blocksparse_decode_impl(
                q, k, v, p, heads, mode, blocksize=32, **kwargs), jit_compile=path == "xla", autograph=False)  # fmt: skip
            row = {"mode": mode, "path": path}
            for p in positions:
                p_t = tf.constant(p)
                fn(q, k, v, p_t).numpy()
                times = []
                for _ in range(repeats):
                    start = time.perf_counter()
                    fn(q, k, v, p_t).numpy()
                    times.append(time.perf_counter() - start)
                row[str(p)] = statistics.median(times) * 1e6
            assert fn.experimental_get_tracing_count() == 1
            rows.append(row)
            print("  " + " ".join(f"{key}={val:.0f}" if isinstance(val, float) else f"{key}={val}"
                                  for key, val in row.items()), flush=True)  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="T = 512, 50 bytes")
    parser.add_argument("--out", default=default_out("decode.json"))
    args = parser.parse_args()
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(2)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    t, n_bytes, repeats = (512, 50, 20) if args.quick else (4096, 1000, 50)
    positions = sorted({p for p in (128, 512, 1024, 2048, 3072, t - 1) if p < t})
    load_before = os.getloadavg()
    print(f"sampling: T={t}, {n_bytes} greedy bytes", flush=True)
    sample = sampling(t, n_bytes)
    print(f"decoding step, attention only: T_max={t}, B=1, H=2, D=64, microseconds at p", flush=True)
    steps = step_times(t, positions, repeats)
    result = {"sampling": sample, "step_us": steps, "positions": positions,
              "load_average_before": [round(x, 2) for x in load_before],
              "load_average_after": [round(x, 2) for x in os.getloadavg()]}  # fmt: skip

    print(f"\n| T = {t}, {n_bytes} bytes | with cache | re-running the window | speed-up | same bytes |")
    print("|---|---|---|---|---|")
    print(f"| {sample['model']} | {sample['cached_s']:.2f} s | {sample['uncached_s']:.2f} s | "
          f"{sample['speedup']:.1f}x | {sample['same_bytes']} |\n")  # fmt: skip
    print("| mode | path | " + " | ".join(f"p = {p}" for p in positions) + " |")
    print("|---|---|" + "---|" * len(positions))
    for row in steps:
        print(f"| {row['mode']} | {row['path']} | " + " | ".join(f"{row[str(p)]:.0f} µs" for p in positions) + " |")
    print(f"\nload average before {result['load_average_before']}, after {result['load_average_after']}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
