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

# A tiny model: 'fixed' with stride 32 at T = 128 (4 shards of 2 blocks at N = 4), or strided (local + strided heads,
# each block recomputed in the backward pass: the exchange runs again there).
SETTINGS = {
    "fixed": dict(n_layer=1, n_state=32, n_head=2, n_timesteps=128, n_batch=2, local_attn_ctx=32, blocksize=16,
                  attn_mode="fixed"),
    "strided": dict(n_layer=1, n_state=32, n_head=2, n_timesteps=256, n_batch=2, local_attn_ctx=16, blocksize=16,
                    attn_mode="strided", recompute=True),
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
    the evaluation of one device, for 'fixed' and for 'strided' (local + strided heads, with --recompute)."""
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


# ---- multi-worker: 2 processes on 127.0.0.1 ----------------------------------------------------------------------

WORKER_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from examples.enwik8 import data as data_lib, train as train_lib
    from examples.enwik8.config import Config

    settings, until = json.loads(sys.argv[1]), int(sys.argv[2])
    corpus = data_lib.load_bytes(None)[:200_000]
    results = train_lib.run(Config(**settings), corpus, until_step=until or None)
    trainer = results["trainer"]
    print("RESULT " + json.dumps({"losses": results["losses"], "start_step": results["start_step"],
                                  "chief": trainer.chief, "replicas": trainer.strategy.num_replicas_in_sync,
                                  "ckpt_dir": str(trainer.manager.directory)}))
    """
)


def free_ports(n: int) -> list[int]:
    """``n`` ports free on 127.0.0.1 now (the OS picks them); skips the test if nothing can bind there."""
    sockets = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    except OSError as err:
        pytest.skip(f"cannot bind a port on 127.0.0.1 here ({err}): multi-worker needs local TCP ports")
    finally:
        for s in sockets:
            s.close()


def run_workers(settings: dict, until_step: int = 0) -> list[dict]:
    """Two worker processes (``TF_CONFIG`` on 127.0.0.1, worker 0 the chief) running ``train.run``; their results."""
    ports = free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    procs = []
    for index in range(2):
        env = {**ENV, "TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})}
        cmd = [sys.executable, "-c", WORKER_SCRIPT, json.dumps(settings), str(until_step)]
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=TIMEOUT))
    finally:
        for proc in procs:  # a worker whose peer died waits for it: end both
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    results = []
    for proc, (stdout, stderr) in zip(procs, outputs):
        lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
        assert proc.returncode == 0 and lines, stderr[-4000:]
        results.append(json.loads(lines[-1][len("RESULT ") :]))
    return results


def one_process_losses(tmp_path: Path, settings: dict) -> list[float]:
    from examples.enwik8 import data as data_lib
    from examples.enwik8 import train as train_lib
    from examples.enwik8.config import Config

    corpus = data_lib.load_bytes(None)[:200_000]
    cfg = Config(**settings, model_dir=str(tmp_path / "one"))
    return train_lib.Trainer(cfg, data_lib.split(corpus), log=lambda *a: None).train()


@pytest.mark.slow
def test_two_workers_match_one_process_write_checkpoints_on_the_chief_and_resume_context_parallel(tmp_path):
    """2 worker processes on 127.0.0.1, the losses of one process at the same global batch (2):

    - steps 1-2 data parallel (1 sequence per worker), a checkpoint at step 2 written by the chief only (the
      other worker's copy goes to a temporary directory, emptied after each save);
    - a fresh pair of processes resumes from the chief's checkpoint for steps 3-4 with ``--context_parallel=2``
      (not a setting of the run's identity: the same run, split differently), each worker holding half of
      both sequences.
    """
    settings = {**SETTINGS["fixed"], **COMMON, "strategy": "multi_worker", "model_dir": str(tmp_path / "mw")}
    reference = one_process_losses(tmp_path, {k: v for k, v in settings.items() if k not in ("strategy", "model_dir")})
    first = run_workers(settings, until_step=2)
    ckpts = tmp_path / "mw" / "checkpoints"
    assert [r["chief"] for r in first] == [True, False] and all(r["replicas"] == 2 for r in first)
    assert first[0]["ckpt_dir"] == str(ckpts) and not first[1]["ckpt_dir"].startswith(str(tmp_path))
    assert not list(Path(first[1]["ckpt_dir"]).iterdir())
    assert sorted(p.name for p in ckpts.glob("*.index")) == ["ckpt-2.index"]
    second = run_workers({**settings, "context_parallel": 2})
    assert [r["start_step"] for r in second] == [2, 2]
    assert sorted(p.name for p in ckpts.glob("*.index")) == ["ckpt-2.index", "ckpt-4.index"]
    for worker in range(2):
        np.testing.assert_allclose(first[worker]["losses"], reference[:2], rtol=1e-5)
        np.testing.assert_allclose(second[worker]["losses"], reference[2:], rtol=1e-5)
