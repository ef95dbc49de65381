"""Dense vs sparse attention in the enwik8 example: bits per byte and step time at equal steps.

Trains the same model (same initialisation, same windows, same steps) on the built-in corpus with
- ``dense``:   ``--attention=dense --attn_mode=all`` (TensorFlow's dense causal attention, the baseline),
- ``fixed``:   ``--attention=sparse --attn_mode=fixed`` (the paper's merged fixed pattern, stride l, c = block),
- ``strided``: ``--attention=sparse --attn_mode=strided`` (half the heads local, half strided, stride sqrt(T)),
- ``colt5``:   ``--block=colt5`` (bsattn.colt5's routed autoregressive attention + routed feed-forward; the
  ``--colt5_*`` options set its windows and heavy-token counts),
then reports valid/test bits per byte, the median step time and the fraction of the T x T scores each
computes. Each variant runs in its own process. Prints a table, writes a JSON and a PNG of the training
curves (``--out``, default outside the repository, see outputs.py; the README's figures are
benchmarks/results/enwik8_compare.json and docs/img/enwik8_compare.png, written only on purpose).

    python benchmarks/enwik8_compare.py                            # T=2048, 300 steps each (README: time)
    python benchmarks/enwik8_compare.py --steps 20 --n_timesteps 1024 --eval_bytes 16384   # a smoke run
    python benchmarks/enwik8_compare.py --plot benchmarks/results/enwik8_compare.json --png docs/img/enwik8_compare.png
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from outputs import default_out

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's bsattn and examples, whatever is installed
COLT5_ARGS = ("colt5_light_window", "colt5_heavy_window", "colt5_heavy_tokens_q", "colt5_heavy_tokens_kv",
              "colt5_heavy_ff_tokens")  # fmt: skip
VARIANTS = ("dense", "fixed", "strided", "sparse_all", "colt5")


def variant_settings(variant: str, args) -> dict:
    """The Config fields of a variant (everything else is shared)."""
    if variant == "dense":
        return {"attention": "dense", "attn_mode": "all", "local_attn_ctx": args.fixed_stride}
    if variant == "sparse_all":
        return {"attention": "sparse", "attn_mode": "all", "local_attn_ctx": args.fixed_stride}
    if variant == "colt5":
        return {"block": "colt5", "attention": "sparse", "attn_mode": "all", "local_attn_ctx": args.fixed_stride,
                **{k: getattr(args, k) for k in COLT5_ARGS}}  # fmt: skip
    if variant == "fixed":
        return {"attention": "sparse", "attn_mode": "fixed", "local_attn_ctx": args.fixed_stride}
    stride = args.strided_stride or max(args.blocksize, 2 ** round(math.log2(math.sqrt(args.n_timesteps))))
    return {"attention": "sparse", "attn_mode": "strided", "local_attn_ctx": stride, "strided_heads": "split"}


def colt5_score_fraction(cfg) -> float:
    """CoLT5: (light pairs, from the start of the previous window up to the token, + heavy pairs, routed queries x
    (routed keys + the null key) per heavy window after the first) / T²; the light op computes whole blocks of the
    pattern, counted here as the pairs the pattern keeps."""
    from bsattn.patterns import WindowLookAround

    t, light_w = cfg.n_timesteps, cfg.colt5_light_window
    heavy_w = cfg.colt5_heavy_window or light_w
    light = int(WindowLookAround(light_w, 1, 0, causal=True).token_mask(t).sum())
    windows = -(-t // heavy_w)
    keys = min(cfg.colt5_heavy_tokens_kv, windows * heavy_w) + 1
    heavy = (windows - 1) * min(cfg.colt5_heavy_tokens_q, heavy_w) * keys
    return (light + heavy) / t**2


def score_fraction(cfg) -> float:
    """Fraction of the T x T scores an attention computes: 1 for dense TF, active blocks / all blocks otherwise."""
    import bsattn
    from examples.enwik8.model import block_modes

    if cfg.block == "colt5":
        return colt5_score_fraction(cfg)
    if cfg.attention == "dense":
        return 1.0
    fractions = []
    for mode, heads in block_modes(cfg)[0]:
        ctx = None if mode == "all" else cfg.local_attn_ctx
        bst = bsattn.get_blocksparse_obj(cfg.n_timesteps, heads, mode, cfg.blocksize, ctx, cfg.num_verts, cfg.vertsize)
        fractions.append((bst.blocks / (bst.ctx_blks_q * bst.ctx_blks_k), heads))
    return sum(f * h for f, h in fractions) / sum(h for _, h in fractions)


def _default_engine() -> str:
    """The engine ``blocksparse_attention_impl`` uses by default ('unfused' where it has no choice)."""
    import inspect

    import bsattn

    parameter = inspect.signature(inspect.unwrap(bsattn.blocksparse_attention_impl)).parameters.get("engine")
    return parameter.default if parameter is not None else "unfused"


def run_variant(variant: str, args) -> dict:
    """Train and evaluate one variant in this process; returns its row."""
    from examples.enwik8 import data as data_lib
    from examples.enwik8 import train as train_lib
    from examples.enwik8.config import Config

    with tempfile.TemporaryDirectory(prefix="enwik8_compare_") as model_dir:
        cfg = Config(
            n_timesteps=args.n_timesteps,
            n_batch=args.n_batch,
            n_layer=args.n_layer,
            n_state=args.n_state,
            n_head=args.n_head,
            blocksize=args.blocksize,
            n_steps=args.steps,
            warmup_iters=args.warmup,
            lr=args.lr,
            resid_pdrop=0.0,
            embed_pdrop=0.0,
            eval_every=0,
            ckpt_every=0,
            log_every=max(1, args.steps // 10),
            eval_batch=args.eval_batch,
            seed=args.seed,
            model_dir=model_dir,
            **variant_settings(variant, args),
        )
        corpus = data_lib.load_bytes(None)
        trainer = train_lib.Trainer(
            cfg, data_lib.split(corpus), log=lambda line: print(f"[{variant}] {line}", flush=True)
        )
        losses = trainer.train()
        steady = trainer.step_seconds[2:] or trainer.step_seconds
        import tensorflow as tf

        import bsattn

        row = {
            "variant": variant,
            "versions": {
                "tensorflow": tf.__version__,
                "bsattn": bsattn.__version__,
                "sparse_engine": _default_engine(),
            },
            "attention": cfg.attention,
            "attn_mode": cfg.attn_mode,
            "local_attn_ctx": cfg.local_attn_ctx if cfg.attn_mode != "all" else None,
            "score_fraction": score_fraction(cfg),
            "block": cfg.block,
            **({k: getattr(cfg, k) for k in COLT5_ARGS} if cfg.block == "colt5" else {}),
            "params": trainer.model.n_params(),
            "step_s_median": statistics.median(steady),
            "step_s_mean": statistics.fmean(steady),
            "bytes_per_s": cfg.n_batch * cfg.n_timesteps / statistics.median(steady),
            "train_loss_last10": statistics.fmean(losses[-10:]) / math.log(2),
            "loss_curve_bpb": [statistics.fmean(losses[i : i + 10]) / math.log(2) for i in range(0, len(losses), 10)],
        }
        for split in ("valid", "test"):
            bpb, count = trainer.evaluate(split, args.eval_bytes)
            row[f"{split}_bpb"], row[f"{split}_bytes"] = bpb, count
    return row


def fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_table(rows: list[dict], args) -> None:
    base = next((r for r in rows if r["variant"] == "dense" and "error" not in r), None)
    header = (
        f"{'variant':<10} {'attention':<22} {'scores':>7} | {'step (s)':>8} {'speed-up':>8} {'kB/s':>6} |"
        f" {'valid bpb':>9} {'vs dense':>8} {'test bpb':>8} {'vs dense':>8}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        if "error" in r:
            print(f"{r['variant']:<10} error: {r['error']}")
            continue
        pattern = f"{r['attention']} {r['attn_mode']}" + (f" l={r['local_attn_ctx']}" if r["local_attn_ctx"] else "")
        if r.get("block") == "colt5":
            pattern = "colt5 w={colt5_light_window} q={colt5_heavy_tokens_q} kv={colt5_heavy_tokens_kv}".format(**r)
        speed = base["step_s_median"] / r["step_s_median"] if base else None
        rel = {s: (r[f"{s}_bpb"] / base[f"{s}_bpb"] - 1) * 100 if base else None for s in ("valid", "test")}
        print(
            f"{r['variant']:<10} {pattern:<22} {r['score_fraction']:>7.3f} | {r['step_s_median']:>8.3f}"
            f" {fmt(speed, '7.2f')}x {r['bytes_per_s'] / 1e3:>6.2f} | {r['valid_bpb']:>9.4f} {fmt(rel['valid'], '+7.2f')}%"
            f" {r['test_bpb']:>8.4f} {fmt(rel['test'], '+7.2f')}%"
        )


def plot_curves(rows: list[dict], meta: dict, png: str) -> Path:
    """The training bits per byte of every variant (means of 10 steps) against the step → the PNG's path."""
    from png_plot import line_plot

    series = []
    for r in rows:
        if "error" not in r:
            steps = [10 * (i + 1) for i in range(len(r["loss_curve_bpb"]))]  # each point: the mean of 10 steps
            series.append((f"{r['variant']} {r['valid_bpb']:.3f}", steps, r["loss_curve_bpb"]))
    title = f"enwik8 example, T={meta['n_timesteps']}: train bits per byte (legend: valid)"
    return line_plot(png, series, title=title, x_label="step", y_label="bpb")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=["dense", "fixed", "strided"], choices=VARIANTS)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--n_timesteps", type=int, default=2048)
    parser.add_argument("--n_batch", type=int, default=2)
    parser.add_argument("--n_layer", type=int, default=2)
    parser.add_argument("--n_state", type=int, default=128)
    parser.add_argument("--n_head", type=int, default=2)
    parser.add_argument("--blocksize", type=int, default=32)
    parser.add_argument("--fixed_stride", type=int, default=128, help="l of 'fixed' (the paper's 128)")
    parser.add_argument("--strided_stride", type=int, default=0, help="l of 'strided' (0: sqrt(T) as a power of 2)")
    parser.add_argument("--colt5_light_window", type=int, default=128)
    parser.add_argument("--colt5_heavy_window", type=int, default=0, help="0: the light window")
    parser.add_argument("--colt5_heavy_tokens_q", type=int, default=32, help="routed queries per heavy window")
    parser.add_argument("--colt5_heavy_tokens_kv", type=int, default=128, help="routed keys from earlier windows")
    parser.add_argument("--colt5_heavy_ff_tokens", type=int, default=32, help="heavy-MLP tokens per light window")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval_bytes", type=int, default=0, help="bytes of valid and test to evaluate (0: all)")
    parser.add_argument("--eval_batch", type=int, default=4)
    parser.add_argument("--out", default=default_out("enwik8_compare.json"), help="results JSON")
    parser.add_argument("--png", help="training curves (default: --out with .png)")
    parser.add_argument("--plot", metavar="JSON", help="only draw the curves of this results JSON into --png")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    png = args.png or str(Path(args.out).with_suffix(".png"))
    if args.worker:
        print("ROW " + json.dumps(run_variant(args.worker, args)), flush=True)
        return
    if args.plot:
        results = json.loads(Path(args.plot).read_text())
        print(f"wrote {plot_curves(results['rows'], results['meta'], png)}")
        return

    passthrough = [
        a for a in sys.argv[1:] if not a.startswith(("--variants", "--png")) and a not in (*args.variants, args.png)
    ]
    rows = []
    for variant in args.variants:
        proc = subprocess.run(
            [sys.executable, __file__, f"--worker={variant}", *passthrough],
            cwd=REPO,
            capture_output=True,
            check=False,
            text=True,
            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
        )
        for line in proc.stdout.splitlines():
            if not line.startswith("ROW "):
                print(line, flush=True)
        found = [json.loads(line[4:]) for line in proc.stdout.splitlines() if line.startswith("ROW ")]
        if proc.returncode or not found:
            tail = proc.stderr.strip().splitlines()[-1:] or [f"exit {proc.returncode}"]
            rows.append({"variant": variant, "error": tail[0]})
        else:
            rows.append(found[0])
    versions = next((r["versions"] for r in rows if "versions" in r), {})
    print()
    print(
        f"enwik8 example on the built-in corpus: T={args.n_timesteps}, batch {args.n_batch}, {args.steps} steps, "
        f"{args.n_layer} layers, d={args.n_state}, {args.n_head} heads, block {args.blocksize}, float32, "
        f"sparse engine {versions.get('sparse_engine', '?')}"
    )
    print_table(rows, args)
    meta = {
        "command": " ".join(["python benchmarks/enwik8_compare.py", *sys.argv[1:]]),
        "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%dT%H:%MZ", time.gmtime()),
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()],  # the machine may be shared
        **versions,
        **{k: v for k, v in vars(args).items() if k not in ("worker", "out")},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"\nwrote {args.out} and {plot_curves(rows, meta, png)}")


if __name__ == "__main__":
    main()
