"""bfloat16 products of the fused CPU op at each ISA level this CPU has ($BSATTN_CPU_ISA, cpu_bf16.h).

Each level runs in its own process (the level is chosen once per process): every block size (8: the float32
products, bs not a multiple of 16; 16-128: the bfloat16 products) with head dims 64, 48 and 16, a per-head
bias and either key padding or dropout (both at once: see the note in benchmarks/cpu_notes.md), forward and gradients against the float64 reference, within 2x (3x for gradients)
of dense TF's own bfloat16 error (conftest.assert_close_rel). The levels must also really differ: the
bfloat16 products give other bits than the float32 ones wherever they serve the shape, the same bits where not.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.ops

CASES = [(8, 32), (16, 64), (64, 64), (128, 64), (64, 16), (32, 48)]

_SCRIPT = """
import hashlib, json, sys
import numpy as np, tensorflow as tf
from test_fused_attention import H, check, dense_tf, make_inputs, run_fused, run_reference
from bsattn import patterns
from bsattn.fused_tables import fused_tables_for_pattern
digests = {}
for case, (bs, d) in enumerate(json.loads(sys.argv[1])):
    rng = np.random.default_rng(bs * 1000 + d)
    n = max(2 * bs, 64)
    tables = fused_tables_for_pattern(patterns.Causal() | patterns.Local(bs), n, n, bs)
    x = make_inputs(rng, tables, tf.bfloat16, d=d, kpm=case % 2 == 0, bias_heads=H)
    args = {"dropout_rate": 0.0 if case % 2 == 0 else 0.2, "seed": 3}
    got = run_fused(x, tables, H, **args)
    dense = dense_tf(x, tables, H, tf.bfloat16, 1 / np.sqrt(d), **args)
    check(got, run_reference(x, tables, H, **args), tf.bfloat16, dense)
    parts = [got[0], *got[2]]
    digests[f"{bs}x{d}"] = hashlib.sha1(b"".join(tf.bitcast(t, tf.uint16).numpy().tobytes() for t in parts)).hexdigest()
print(json.dumps(digests))
"""


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return set(line.split(":", 1)[-1].split())


def _run_level(isa: str) -> dict:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", BSATTN_CPU_ISA=isa)
    proc = subprocess.run([sys.executable, "-c", _SCRIPT, json.dumps(CASES)], env=env, capture_output=True, text=True,
                          cwd=Path(__file__).parent, timeout=600, check=False)  # fmt: skip
    assert proc.returncode == 0, f"BSATTN_CPU_ISA={isa}:\n{proc.stderr[-3000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_bf16_levels_against_reference():
    """avx512bf16 (vdpbf16ps) and avx512 (the float32 products) both within the bound at every block size."""
    flags = _cpu_flags()
    if "avx512f" not in flags:
        pytest.skip("no AVX-512 on this CPU: the bfloat16 products (AVX512-BF16) cannot run here")
    if "avx512_bf16" not in flags:
        pytest.skip("no AVX512-BF16 on this CPU: only the float32 products run (checked by test_fused_attention)")
    bf16, f32 = _run_level("avx512bf16"), _run_level("avx512")
    for bs, d in CASES:
        key = f"{bs}x{d}"
        served = bs % 16 == 0 and d % 16 == 0
        assert (bf16[key] != f32[key]) == served, (key, "the bfloat16 products must run exactly where they serve")

