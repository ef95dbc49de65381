"""The enwik8 example across devices and processes: ``--context_parallel`` over logical CPUs, and
``--strategy=multi_worker`` with 2 worker processes on 127.0.0.1 (data parallel, resumed from the chief's
checkpoint, and context parallel across the workers). Every run is tiny and every subprocess has a timeout.

The reference is one process on one device at the same global batch; dropout is off, so the losses agree to
float rounding.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "2"}
TIMEOUT = 240  # seconds per subprocess (the machine may be shared; a run takes ~10-30 s)

# A tiny model: 'fixed' with stride 32 at T = 128 (4 shards of 2 blocks at N = 4), or strided (local + strided heads).
SETTINGS = {
    "fixed": dict(n_layer=1, n_state=32, n_head=2, n_timesteps=128, n_batch=2, local_attn_ctx=32, blocksize=16,
                  attn_mode="fixed"),
    "strided": dict(n_layer=1, n_state=32, n_head=2, n_timesteps=256, n_batch=2, local_attn_ctx=16, blocksize=16,
                    attn_mode="strided"),
}  # fmt: skip
COMMON = dict(n_steps=4, warmup_iters=1, lr=3e-3, resid_pdrop=0.0, embed_pdrop=0.0, eval_every=0, ckpt_every=2,
              log_every=2, final_eval=False, sample_bytes=0)  # fmt: skip


def run_script(script: str, *args: str, env: dict | None = None) -> dict:
    proc = subprocess.run([sys.executable, "-c", script, *args], cwd=REPO, env=env or ENV, capture_output=True,
                          text=True, timeout=TIMEOUT, check=False)  # fmt: skip
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-4000:]
    return json.loads(lines[-1][len("RESULT ") :])


CONTEXT_PARALLEL_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from examples.enwik8 import data as data_lib, train as train_lib
    from examples.enwik8.config import Config

    settings, common, n = json.loads(sys.argv[2]), json.loads(sys.argv[3]), int(sys.argv[4])
    train_lib.configure_devices(n)
    corpus = data_lib.load_bytes(None)[:200_000]
    # One MirroredStrategy per process: two over the same devices would share collective keys.
    strategies = {1: train_lib.make_strategy("default"), n: train_lib.make_strategy("default", n)}
    out = {}
    for mode, model in settings.items():
        for cp in (1, n):
            cfg = Config(**model, **common, context_parallel=cp, model_dir=f"{sys.argv[1]}/{mode}-{cp}")
            trainer = train_lib.Trainer(cfg, data_lib.split(corpus), strategies[cp], log=lambda *a: None)
            out[f"{mode}/{cp}"] = {"replicas": trainer.strategy.num_replicas_in_sync, "losses": trainer.train(),
                                   "embed": trainer.model.embed.numpy().tolist(),
                                   "valid": trainer.evaluate("valid", 1024)[0]}
    print("RESULT " + json.dumps(out))
    """
)


@pytest.mark.slow
def test_context_parallel_training_matches_one_device(tmp_path):
    """``--context_parallel=4`` (4 logical CPUs, one sequence split in 4): the loss curve, the trained weights and
    the evaluation of one device, for 'fixed' and for 'strided' (local + strided heads)."""
    out = run_script(CONTEXT_PARALLEL_SCRIPT, str(tmp_path), json.dumps(SETTINGS), json.dumps(COMMON), "4")
    for mode in SETTINGS:
        one, split = out[f"{mode}/1"], out[f"{mode}/4"]
        assert one["replicas"] == 1 and split["replicas"] == 4
        np.testing.assert_allclose(split["losses"], one["losses"], rtol=1e-5)
        np.testing.assert_allclose(split["embed"], one["embed"], rtol=1e-4, atol=1e-6)
        assert split["valid"] == pytest.approx(one["valid"], rel=1e-5)


def test_context_parallel_settings_are_checked():
    from examples.enwik8.config import Config, SettingsError

    with pytest.raises(SettingsError, match="multiple of context_parallel \\* blocksize"):
        Config(**SETTINGS["fixed"], context_parallel=3).validate()
    with pytest.raises(SettingsError, match="--attention=sparse"):
        Config(**{**SETTINGS["fixed"], "attn_mode": "all"}, attention="dense", context_parallel=2).validate()
    with pytest.raises(SettingsError, match="context_parallel must be >= 1"):
        Config(**SETTINGS["fixed"], context_parallel=0).validate()
