"""Cross-check against the original package (memory-efficient-attention-pytorch 0.1.6, torch CPU): the same
inputs through the original's functions and ours, forward and the gradients of q and attn_bias.

Inputs: b = 2, h = 2, n = 45 (i == j: where bsattn's causal alignment and the original's agree), d = 16, a key
mask, causal, a [h, n, n] bias, buckets 16 / 32; float64, except the original's flash attention, which runs in
float32 (its running statistics are float32 buffers that a float64 -max overflows).

    python benchmarks/memory_efficient_vs_original.py [--torch-python /tmp/torchenv/bin/python]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

NAMES = ("mea", "flash", "unstable", "attention")


def original(path: str) -> None:
    """Runs in the torch interpreter: reads ``path/in.npz``, writes ``path/orig.npz``."""
    import torch
    from memory_efficient_attention_pytorch import memory_efficient_attention
    from memory_efficient_attention_pytorch.flash_attention import (
        FlashAttentionFunction,
    )
    from memory_efficient_attention_pytorch.memory_efficient_attention import attention
    from memory_efficient_attention_pytorch.memory_efficient_cosine_sim_attention import (
        numerically_unstable_memory_efficient_attention,
    )

    d = np.load(f"{path}/in.npz")
    mask = torch.tensor(d["mask"])
    res = {}

    def run(name, fn, dtype=torch.float64):
        q, k, v, bias = (torch.tensor(d[n], dtype=dtype, requires_grad=True) for n in ("q", "k", "v", "bias"))
        out = fn(q, k, v, bias)
        (out * torch.tensor(d["dout"], dtype=dtype)).sum().backward()
        res[name] = out.detach().double().numpy()
        res[f"{name}_dq"] = q.grad.double().numpy()
        if bias.grad is not None:
            res[f"{name}_dbias"] = bias.grad.double().numpy()

    run("mea", lambda q, k, v, b: memory_efficient_attention(q, k, v, mask, True, b, 16, 32))
    run("flash", lambda q, k, v, b: FlashAttentionFunction.apply(q, k, v, mask, True, 16, 32), torch.float32)
    run("unstable", lambda q, k, v, b: numerically_unstable_memory_efficient_attention(
        0.3 * q, 0.3 * k, v, mask, True, b, 16, 32))  # fmt: skip
    run("attention", lambda q, k, v, b: attention(q, k, v, mask=mask, causal=True, attn_bias=b))
    np.savez(f"{path}/orig.npz", **res)


def ours(d: dict, engine: str | None) -> dict:
    import tensorflow as tf

    import bsattn

    t = {n: tf.constant(d[n], tf.float64) for n in ("q", "k", "v", "bias", "dout")}
    q, k, v, bias, mask = t["q"], t["k"], t["v"], t["bias"], d["mask"]
    fns = {
        "mea": lambda: bsattn.memory_efficient_attention(q, k, v, mask, True, bias, 16, 32, engine=engine),
        "flash": lambda: bsattn.flash_attention(q, k, v, mask, True, 16, 32, engine=engine),
        "unstable": lambda: bsattn.numerically_unstable_memory_efficient_attention(
            0.3 * q, 0.3 * k, v, mask, True, bias, 16, 32, engine=engine),
        "attention": lambda: bsattn.attention(q, k, v, mask, True, bias),
    }  # fmt: skip
    res = {}
    for name, fn in fns.items():
        with tf.GradientTape() as tape:
            tape.watch([q, bias])
            out = fn()
        dq, dbias = tape.gradient(out, [q, bias], output_gradients=t["dout"])
        res[name], res[f"{name}_dq"] = out.numpy(), dq.numpy()
        if dbias is not None:
            res[f"{name}_dbias"] = dbias.numpy()
    return res


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--torch-python", default=os.environ.get("BSATTN_TORCH_PYTHON", "/tmp/torchenv/bin/python"))
    parser.add_argument("--original", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.original:
        original(args.original)
        return
    rng = np.random.default_rng(0)
    b, h, n, dim = 2, 2, 45, 16
    d = {name: rng.standard_normal((b, h, n, dim)) for name in ("q", "k", "v", "dout")}
    d["bias"] = rng.standard_normal((h, n, n))
    d["mask"] = rng.random((b, n)) < 0.8
    d["mask"][:, 0] = True
    with tempfile.TemporaryDirectory() as tmp:
        np.savez(f"{tmp}/in.npz", **d)
        proc = subprocess.run([args.torch_python, __file__, "--original", tmp], capture_output=True, text=True,
                              check=False)  # fmt: skip
        if proc.returncode:
            sys.exit(f"the original did not run with {args.torch_python}:\n{proc.stderr[-2000:]}")
        orig = dict(np.load(f"{tmp}/orig.npz"))
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    print("max |ours - original| (float64; the original's flash attention in float32)")
    for engine in ("fused", "chunked"):
        res = ours(d, engine)
        for name in NAMES if engine == "fused" else NAMES[:3]:
            parts = [f"{key.partition('_')[2] or 'out'} {np.abs(res[key] - orig[key]).max():.1e}"
                     for key in (name, f"{name}_dq", f"{name}_dbias") if key in orig]  # fmt: skip
            label = name if name == "attention" else f"{name} ({engine})"
            print(f"  {label:20s} " + "  ".join(parts))


if __name__ == "__main__":
    main()
