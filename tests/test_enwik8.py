"""Tests of the enwik8 example (examples/enwik8): data, model, training, resuming, tf.distribute.

Everything runs on tiny models (d=32, T=64) so the file takes well under a minute on 2 cores. The
100,000,000-byte files are sparse files in tmp_path, never stored in the repository.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from examples.enwik8 import data as data_lib
from examples.enwik8 import evaluate as eval_lib
from examples.enwik8 import train as train_lib
from examples.enwik8.config import Config, SettingsError
from examples.enwik8.model import SparseTransformer, token_losses

# Bytes at the split boundaries of a 100,000,000-byte file: (offset, value).
MARKERS = [
    (0, 1),
    (89_999_999, 2),
    (90_000_000, 3),
    (94_999_999, 4),
    (95_000_000, 5),
    (99_999_999, 6),
]


def tiny(tmp_path: Path | None = None, **overrides) -> Config:
    """A model small enough for a unit test: 1 block of width 32, T=64, 'fixed' with stride 32, block 16."""
    settings = dict(
        n_layer=1,
        n_state=32,
        n_head=2,
        n_timesteps=64,
        n_batch=4,
        local_attn_ctx=32,
        blocksize=16,
        n_steps=8,
        warmup_iters=2,
        lr=3e-3,
        eval_every=0,
        ckpt_every=4,
        log_every=4,
        eval_batch=8,
        final_eval=False,
        sample_bytes=0,
        model_dir=str(tmp_path or "/nonexistent"),
    )
    settings.update(overrides)
    return Config(**settings)


@pytest.fixture(scope="module")
def corpus() -> np.ndarray:
    """The first 400 kB of the built-in corpus (train 360 kB, valid and test 20 kB each)."""
    return data_lib.load_bytes(None)[:400_000]


def quiet(*_args) -> None:
    pass


# ---- data ----------------------------------------------------------------------------------------------------


def _enwik8_shaped(path: Path) -> Path:
    """A sparse 100,000,000-byte file of zeros with ``MARKERS`` at the split boundaries."""
    with open(path, "wb") as f:
        f.truncate(data_lib.ENWIK8_BYTES)
        for offset, value in MARKERS:
            f.seek(offset)
            f.write(bytes([value]))
    return path


def _check_enwik8_split(data: np.ndarray) -> None:
    assert data.size == data_lib.ENWIK8_BYTES
    train, valid, test = data_lib.split(data)
    assert (train.size, valid.size, test.size) == (90_000_000, 5_000_000, 5_000_000)
    assert (train[0], train[-1], valid[0], valid[-1], test[0], test[-1]) == (1, 2, 3, 4, 5, 6)
    assert int(train.sum()) + int(valid.sum()) + int(test.sum()) == 21


def test_enwik8_split_raw(tmp_path):
    path = _enwik8_shaped(tmp_path / "enwik8")
    data = data_lib.load_bytes(str(path))
    _check_enwik8_split(data)
    assert data_lib.describe(data, str(path)).startswith("enwik8")
    _check_enwik8_split(data_lib.load_bytes(str(tmp_path)))  # a directory holding enwik8


def test_enwik8_split_zip(tmp_path):
    raw = _enwik8_shaped(tmp_path / "enwik8")
    with zipfile.ZipFile(tmp_path / "enwik8.zip", "w", zipfile.ZIP_DEFLATED, compresslevel=1) as archive:
        archive.write(raw, "enwik8")
    raw.unlink()
    _check_enwik8_split(data_lib.load_bytes(str(tmp_path / "enwik8.zip")))


def test_split_sizes_of_other_lengths():
    for n in (1000, 1001, 5_000_000, 123_457):
        sizes = data_lib.split_sizes(n)
        assert sum(sizes) == n and sizes[0] == n * 9 // 10 and sizes[1] == n // 20


def test_builtin_corpus_is_deterministic():
    first, second = data_lib.builtin_corpus(), data_lib.builtin_corpus()
    assert first == second and len(first) == data_lib.BUILTIN_BYTES
    assert first.startswith(b"\n# ---- pydoc_data/topics.py ----\n")
    files = [p.as_posix() for p in data_lib.builtin_files()]
    assert not any("site-packages" in p or "_sysconfigdata" in p or "/test/" in p for p in files)
    train, valid, test = data_lib.load_splits(None)
    assert (train.size, valid.size, test.size) == (4_500_000, 250_000, 250_000)
    if sys.version.split()[0] == "3.11.7":  # the digest the README quotes for this release
        assert hashlib.sha256(first).hexdigest().startswith("e677fa4802a204b3")


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        data_lib.load_bytes(str(tmp_path / "enwik9"))
    with pytest.raises(FileNotFoundError, match="directory without 'enwik8'"):
        data_lib.load_bytes(str(tmp_path))
    (tmp_path / "short").write_bytes(b"tiny")
    with pytest.raises(ValueError, match="too small"):
        data_lib.load_bytes(str(tmp_path / "short"))


def test_corrupt_zip_is_a_clear_error(tmp_path):
    good = tmp_path / "good.zip"
    with zipfile.ZipFile(good, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("enwik8", bytes(range(256)) * 64)
    blob = good.read_bytes()
    truncated = tmp_path / "truncated.zip"
    truncated.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ValueError, match="corrupt or unreadable zip"):
        data_lib.load_bytes(str(truncated))
    flipped = bytearray(blob)
    flipped[60] ^= 0xFF  # inside the compressed data of the only member: a CRC or inflate error
    (tmp_path / "flipped.zip").write_bytes(bytes(flipped))
    with pytest.raises(ValueError, match="corrupt or unreadable zip"):
        data_lib.load_bytes(str(tmp_path / "flipped.zip"))
    (tmp_path / "fake.zip").write_bytes(b"not a zip at all" * 100)
    with pytest.raises(ValueError, match="corrupt or unreadable zip"):
        data_lib.load_bytes(str(tmp_path / "fake.zip"))


def test_cli_reports_a_bad_data_path(tmp_path, capsys):
    from absl import flags

    from examples.enwik8 import config as config_lib

    if "n_layer" not in flags.FLAGS:
        config_lib.define_flags()
    for bad, message in [
        (tmp_path / "missing.zip", "no such file"),
        (tmp_path / "broken.zip", "corrupt or unreadable zip"),
    ]:
        if bad.name == "broken.zip":
            bad.write_bytes(b"PK\x03\x04" + bytes(100))
        flags.FLAGS.unparse_flags()
        flags.FLAGS(["train", f"--data_path={bad}", f"--model_dir={tmp_path / 'run'}"])
        with pytest.raises(SystemExit, match=f"error: .*{message}"):
            train_lib.main([])
    flags.FLAGS.unparse_flags()


def test_training_windows_follow_seed_and_step(corpus):
    train = corpus[:10_000]
    full = list(data_lib.train_dataset(train, 16, 4, seed=7).take(5))
    resumed = list(data_lib.train_dataset(train, 16, 4, seed=7, start_step=3).take(2))
    for a, b in zip(full[3:], resumed):
        np.testing.assert_array_equal(a["x"], b["x"])
    batch = full[0]
    np.testing.assert_array_equal(batch["x"][:, 1:], batch["y"][:, :-1])
    assert batch["x"].shape == (4, 16) and set(batch["step"].numpy()) == {0}
    other_seed = next(iter(data_lib.train_dataset(train, 16, 4, seed=8)))
    assert not np.array_equal(other_seed["x"], batch["x"])
    # Two workers with two replicas each: their per-replica batches put together are the global batch.
    parts = []
    for worker in range(2):
        ctx = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=worker, num_replicas_in_sync=4)
        parts += [b["x"] for b in data_lib.train_dataset(train, 16, 8, seed=7, input_context=ctx).take(2)]
    whole = next(iter(data_lib.train_dataset(train, 16, 8, seed=7)))
    np.testing.assert_array_equal(np.concatenate(parts), whole["x"])


def test_eval_windows_are_sequential_and_disjoint():
    split = np.arange(1000, dtype=np.int64).astype(np.uint8)
    x, y = data_lib.eval_windows(split, 64)
    assert x.shape == y.shape == (999 // 64, 64)
    np.testing.assert_array_equal(x.reshape(-1), split[: x.size])
    np.testing.assert_array_equal(y.reshape(-1), split[1 : x.size + 1])
    assert data_lib.eval_windows(split, 64, max_bytes=200)[0].shape == (3, 64)


# ---- model -------------------------------------------------------------------------------------------------------


def _loss_and_grads(model: SparseTransformer, x: tf.Tensor, seed) -> tuple[tf.Tensor, list[tf.Tensor]]:
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(token_losses(model(x, seed), x))
    return loss, [tf.convert_to_tensor(g) for g in tape.gradient(loss, model.trainable_variables)]


@pytest.mark.parametrize("mode", ["fixed", "strided"])
def test_engines_and_recompute_agree(mode):
    """Sparse vs dense attention give the same model; recompute gives the same gradients (dropout included)."""
    extra = {"local_attn_ctx": 16, "n_timesteps": 256} if mode == "strided" else {}
    x = tf.constant(np.random.default_rng(0).integers(0, 256, (2, extra.get("n_timesteps", 64))), tf.int32)
    seed = tf.constant([3, 4], tf.int64)
    results = {}
    for name, overrides in {"sparse": {}, "dense": {"attention": "dense"}, "recompute": {"recompute": True}}.items():
        model = SparseTransformer(tiny(n_layer=2, attn_mode=mode, resid_pdrop=0.1, **extra, **overrides))
        model.head.w.assign(tf.random.stateless_normal(model.head.w.shape, [1, 2]))  # gradients reach every layer
        results[name] = _loss_and_grads(model, x, seed)
    for name in ("dense", "recompute"):
        np.testing.assert_allclose(results[name][0], results["sparse"][0], rtol=1e-6)
        for ours, base in zip(results[name][1], results["sparse"][1]):
            np.testing.assert_allclose(ours, base, rtol=1e-4, atol=1e-6)


def test_untrained_model_is_uniform_and_samples(corpus):
    model = SparseTransformer(tiny())  # output weights start at 0: every byte has probability 1/256
    bpb, count = eval_lib.bits_per_byte(model, corpus[:1000], n_batch=8)
    assert count == (999 // 64) * 64 and bpb == pytest.approx(8.0, abs=1e-6)
    model.head.w.assign(tf.random.stateless_normal(model.head.w.shape, [1, 2]))
    first = eval_lib.sample(model, b"def ", 10, temperature=1.0, seed=5)
    assert len(first) == 10 and first == eval_lib.sample(model, b"def ", 10, temperature=1.0, seed=5)
    greedy = eval_lib.sample(model, bytes(100), 3, temperature=0.0)  # a context longer than T slides
    assert len(greedy) == 3


@pytest.mark.parametrize("mode,extra", [("fixed", {}), ("strided", dict(n_timesteps=256, local_attn_ctx=16)),
                                        ("local", dict(precision="mixed_bfloat16")), ("all", dict(pos_embd="dense")),
                                        ("fixed", dict(attention="dense")), ("all", dict(attention="memory_efficient"))],
                         ids=["fixed", "strided", "local_bf16", "all_dense_positions", "dense_engine",
                              "memory_efficient"])  # fmt: skip
def test_decode_with_cache_equals_the_window(mode, extra):
    """The cached logits of every step are the full window's at that row; one trace for all the steps."""
    from examples.enwik8.decode import KVCache, decode

    model = SparseTransformer(tiny(attn_mode=mode, n_layer=2, **extra))
    model.head.w.assign(tf.random.stateless_normal(model.head.w.shape, [1, 2]))
    t = model.cfg.n_timesteps
    tokens = tf.random.stateless_uniform([2, t], [3, 4], 0, 256, tf.int32)
    full = model(tokens).numpy()
    cache = KVCache(model, 2)
    window = tf.concat([tokens[:, :20], tf.zeros([2, t - 20], tf.int32)], 1)  # the rest: never read
    np.testing.assert_allclose(decode(model, window, 0, cache)[:, :20], full[:, :20], rtol=1e-5, atol=1e-5)
    step = tf.function(lambda x, p: decode(model, x, p, cache), autograph=False)
    # mixed bfloat16: the full forward's products run in bf16 on CPUs with AVX512-BF16, a decoding step's in float32
    # (memory-bound: nothing to gain), so the logits agree to bf16 rounding of the activations, ~1% of their range.
    rtol, atol = (2e-2, 1e-2 * float(np.abs(full).max())) if extra.get("precision") else (1e-5, 1e-5)
    for p in range(20, min(t, 100)):  # every row written in turn
        np.testing.assert_allclose(step(tokens[:, p : p + 1], tf.constant(p))[:, 0], full[:, p], rtol=rtol, atol=atol)
    assert step.experimental_get_tracing_count() == 1


def test_cached_sampling_gives_the_same_bytes():
    model = SparseTransformer(tiny(n_layer=2))
    model.head.w.assign(tf.random.stateless_normal(model.head.w.shape, [1, 2]))
    prompt = b"def main(argv):\n    "
    for kwargs in (dict(temperature=0.0, window_shift=16), dict(temperature=1.0, top_k=5, seed=3, window_shift=64)):
        cached = eval_lib.sample(model, prompt, 60, cache=True, **kwargs)  # the window moves past 64 bytes
        assert cached == eval_lib.sample(model, prompt, 60, cache=False, **kwargs) and len(cached) == 60
    logits = tf.random.stateless_normal([1, 256], [5, 6])
    top = set(tf.math.top_k(logits, 5).indices.numpy()[0].tolist())
    drawn = {int(eval_lib.pick(logits, 1.0, 5, tf.constant([i, 0], tf.int64))[0]) for i in range(40)}
    assert drawn <= top and len(drawn) > 1
    with pytest.raises(ValueError, match="top_k must be an integer in"):
        eval_lib.sample(model, prompt, 1, top_k=300)
    with pytest.raises(ValueError, match="window_shift must be an integer in"):
        eval_lib.sample(model, prompt, 1, window_shift=0)
    colt5 = SparseTransformer(tiny(block="colt5", colt5_light_window=16, colt5_heavy_tokens_q=4,
                                   colt5_heavy_tokens_kv=8, colt5_heavy_ff_tokens=4))  # fmt: skip
    assert len(eval_lib.sample(colt5, prompt, 2)) == 2  # no cache there: re-runs the window


def test_settings_are_checked():
    with pytest.raises(SettingsError, match="--n_state=30 must be a multiple of --n_head=4"):
        tiny(n_state=30, n_head=4).validate()
    with pytest.raises(SettingsError, match="strided needs n_timesteps / local_attn_ctx"):
        tiny(attn_mode="strided").validate()
    with pytest.raises(SettingsError, match="--attn_mode='sliding'"):
        tiny(attn_mode="sliding").validate()
    saved = dict(tiny().__dict__)
    with pytest.raises(SettingsError, match="--attention: 'sparse' -> 'dense'"):
        tiny(attention="dense").check_resumable(saved)
    tiny(n_steps=100, log_every=1).check_resumable(saved)  # bookkeeping may change


# ---- the command line: default run folders, --help, logs ----------------------------------------------------------

TINY_FLAGS = [
    "--n_layer=1",
    "--n_state=32",
    "--n_head=2",
    "--n_timesteps=64",
    "--local_attn_ctx=32",
    "--blocksize=16",
    "--n_steps=4",
    "--warmup_iters=1",
    "--eval_every=0",
    "--ckpt_every=2",
    "--log_every=2",
    "--final_eval=false",
    "--sample_bytes=0",
]


def _parse(argv: list[str]):
    from absl import flags

    from examples.enwik8 import config as config_lib

    if "n_layer" not in flags.FLAGS:
        config_lib.define_flags()
    flags.FLAGS.unparse_flags()
    config_lib.parse_flags(["train", *argv])
    return config_lib.from_flags()


def _cli(capsys, argv: list[str]) -> str:
    """``python -m examples.enwik8.train ARGV`` in this process → what it printed."""
    from absl import flags

    _parse(argv)
    capsys.readouterr()
    try:
        train_lib.main([])
    finally:
        flags.FLAGS.unparse_flags()
    return capsys.readouterr().out


def _model_dir_line(out: str) -> str:
    return next(line for line in out.splitlines() if line.startswith("model_dir: "))


def test_cli_runs_with_other_settings_train_and_the_same_settings_resume(tmp_path, monkeypatch, capsys, corpus):
    """No --model_dir: each setting gets its own folder under $BSATTN_ENWIK8_RUNS, so the README's second
    command (other settings) trains instead of being refused, and the same command resumes its own run."""
    runs = tmp_path / "runs"
    monkeypatch.setenv("BSATTN_ENWIK8_RUNS", str(runs))
    data = tmp_path / "text.bin"
    data.write_bytes(corpus.tobytes())
    base = [f"--data_path={data}", *TINY_FLAGS]

    # A run killed after step 2 (its checkpoint written), then the same command: it resumes there.
    cfg = _parse(base)
    train_lib.run(cfg, corpus, until_step=2)
    first = _cli(capsys, base)
    assert str(runs / cfg.run_name()) in _model_dir_line(first) and "resuming" in _model_dir_line(first)
    assert f"resumed from {runs / cfg.run_name() / 'checkpoints' / 'ckpt-2'} at step 2" in first
    assert "trained steps 3..4" in first

    other = _cli(capsys, [*base, "--attention=dense"])  # other settings, no --model_dir: a fresh run
    assert "a new run" in _model_dir_line(other) and "trained steps 1..4" in other and "resumed" not in other
    dense_name = _parse([*base, "--attention=dense"]).run_name()
    assert sorted(p.name for p in runs.iterdir()) == sorted([cfg.run_name(), dense_name])
    assert (runs / dense_name / "checkpoints" / "ckpt-4.index").exists()

    again = _cli(capsys, base)  # the first settings once more: that finished run, nothing left to train
    assert "at step 4" in again and "trained steps" not in again

    # An explicit --model_dir keeps its old meaning, including the refusal of other settings.
    assert "trained steps 1..4" in _cli(capsys, [*base, f"--model_dir={tmp_path / 'mine'}"])
    with pytest.raises(SystemExit, match="--n_layer: 1 -> 2"):
        _cli(capsys, [*base, f"--model_dir={tmp_path / 'mine'}", "--n_layer=2"])


def test_run_names_follow_the_resume_settings():
    name = tiny().run_name()
    assert name.startswith("sparse-fixed-1x32-T64-") and name == tiny(log_every=1, eval_batch=2).run_name()
    for change in ({"n_layer": 2}, {"seed": 1}, {"lr": 1e-4}, {"n_steps": 9}, {"data_path": "enwik8.zip"}):
        assert tiny(**change).run_name() != name, change
    assert tiny(model_dir="").run_dir.endswith(name) and tiny(model_dir="/x/y").run_dir == "/x/y"


def test_cli_flag_errors_and_help_exit_codes(capsys):
    from absl import app

    app.define_help_flags()
    with pytest.raises(SystemExit) as stop:
        _parse(["--help"])
    assert stop.value.code == 0 and "--helpfull" in capsys.readouterr().out  # absl printed the help
    with pytest.raises(SystemExit, match="FATAL Flags parsing error.*n_layer"):  # a string: exit status 1
        _parse(["--n_layer=four"])


def test_entry_point_help_is_quiet_and_exits_0():
    """The real entry point: --help exits 0, explains resuming, and TensorFlow's load-time lines are gone."""
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    result = subprocess.run(
        [sys.executable, "-m", "examples.enwik8.train", "--help"],
        cwd=REPO,
        env={**env, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Resuming:" in result.stdout and "--model_dir" in result.stdout and "BSATTN_ENWIK8_RUNS" in result.stdout
    for noise in ("I0000", "All log messages before absl::InitializeLog", "cuInit"):
        assert noise not in result.stderr, result.stderr[-2000:]


def test_a_users_log_level_wins():
    code = (
        "import os, sys; import examples.enwik8; "
        "print(os.environ['TF_CPP_MIN_LOG_LEVEL'], 'tensorflow' in sys.modules)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "0"},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert result.stdout.split() == ["0", "False"]  # left alone: no quieting, no early TensorFlow import


# ---- training ----------------------------------------------------------------------------------------------------


def test_resume_repeats_the_uninterrupted_run(tmp_path, corpus):
    """Train 8 steps straight (checkpoints at 4 and 8); a fresh model and optimizer restored from the step-4
    checkpoint, as after a kill, train steps 5..8 with the same losses and end with the same weights."""
    splits = data_lib.split(corpus)
    cfg = tiny(tmp_path, resid_pdrop=0.1, embed_pdrop=0.1)
    straight = train_lib.Trainer(cfg, splits, log=quiet)
    expected = straight.train()
    assert len(expected) == 8
    resumed = train_lib.Trainer(cfg, splits, log=quiet)
    assert resumed.restore(str(tmp_path / "checkpoints" / "ckpt-4")) == 4
    assert int(resumed.optimizer.iterations.numpy()) == 4
    losses = resumed.train()
    np.testing.assert_allclose(losses, expected[4:], rtol=1e-6)
    for ours, base in zip(resumed.model.trainable_variables, straight.model.trainable_variables):
        np.testing.assert_allclose(ours.numpy(), base.numpy(), rtol=1e-5, atol=1e-7)


def test_run_trains_evaluates_and_resumes_at_the_end(tmp_path, corpus):
    """A tiny run: the loss falls, checkpoints, summaries, valid/test bits per byte and a sample appear."""
    cfg = tiny(
        tmp_path,
        n_steps=24,
        warmup_iters=4,
        resid_pdrop=0.0,
        embed_pdrop=0.0,
        final_eval=True,
        sample_bytes=8,
        eval_every=12,
        eval_bytes=256,
        ckpt_every=12,
    )
    results = train_lib.run(cfg, corpus)
    losses = results["losses"]
    assert results["step"] == 24 and len(losses) == 24
    assert losses[0] == pytest.approx(math.log(256), rel=1e-3)  # output weights start at 0
    assert np.mean(losses[-4:]) < losses[0] - 1.0, losses
    assert results["valid_bpb"] < 7.0 and results["test_bpb"] < 7.0 and len(results["sample"]) > 0
    assert (tmp_path / "config.json").exists()
    tags = set()
    for path in (tmp_path / "logs").iterdir():
        for record in tf.data.TFRecordDataset(str(path)):
            event = tf.compat.v1.Event.FromString(record.numpy())
            tags |= {v.tag for v in event.summary.value if v.metadata.plugin_data.plugin_name == "scalars"}
    assert {"train/loss", "train/bytes_per_second", "valid/bits_per_byte_prefix", "test/bits_per_byte"} <= tags
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("*.index")) == ["ckpt-12.index", "ckpt-24.index"]
    again = train_lib.run(tiny(tmp_path, n_steps=24, warmup_iters=4, resid_pdrop=0.0, embed_pdrop=0.0), corpus)
    assert again["start_step"] == 24 and again["losses"] == []  # finished: nothing left to train
    model, step = train_lib.restore_model(cfg)
    assert step == 24
    np.testing.assert_array_equal(model.embed.numpy(), results["trainer"].model.embed.numpy())


def test_mixed_precision(tmp_path, corpus):
    """bfloat16 compute (float32 variables) matches float32 roughly; float16 trains with loss scaling."""
    x = tf.constant(corpus[:128].reshape(2, 64).astype(np.int32))
    seed = tf.constant([1, 2], tf.int64)
    losses = {}
    for precision in ("float32", "mixed_bfloat16"):
        model = SparseTransformer(tiny(precision=precision))
        model.head.w.assign(tf.random.stateless_normal(model.head.w.shape, [1, 2]))
        losses[precision], grads = _loss_and_grads(model, x, seed)
        assert all(g.dtype == tf.float32 and np.isfinite(g.numpy()).all() for g in grads)
    assert float(losses["mixed_bfloat16"]) == pytest.approx(float(losses["float32"]), rel=0.02)
    trainer = train_lib.Trainer(
        tiny(tmp_path, precision="mixed_float16", n_steps=3, ckpt_every=0), data_lib.split(corpus), log=quiet
    )
    assert isinstance(trainer.optimizer, keras.optimizers.LossScaleOptimizer)
    steps = trainer.train()
    assert all(np.isfinite(steps)) and steps[-1] < steps[0]
    assert trainer.model.embed.dtype == tf.float32


MIRRORED_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    from examples.enwik8 import data as data_lib, train as train_lib
    from examples.enwik8.config import Config

    train_lib.configure_devices(2)
    corpus = data_lib.load_bytes(None)[:200_000]
    out = {}
    for name in ("default", "mirrored"):
        cfg = Config(n_layer=1, n_state=32, n_head=2, n_timesteps=64, n_batch=4, local_attn_ctx=32, blocksize=16,
                     n_steps=4, warmup_iters=1, lr=3e-3, resid_pdrop=0.0, embed_pdrop=0.0, eval_every=0,
                     ckpt_every=0, strategy=name, n_cpu_devices=2, model_dir=sys.argv[1] + "/" + name)
        trainer = train_lib.Trainer(cfg, data_lib.split(corpus), train_lib.make_strategy(name), log=lambda *a: None)
        losses = trainer.train()
        out[name] = {"replicas": trainer.strategy.num_replicas_in_sync, "losses": losses,
                     "embed": trainer.model.embed.numpy().tolist(),
                     "valid": trainer.evaluate("valid", 1024)[0]}
    print("RESULT " + json.dumps(out))
    """
)


@pytest.mark.slow
def test_mirrored_matches_default(tmp_path):
    """MirroredStrategy over 2 logical CPUs takes the same steps as one device (dropout off)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "2"}
    result = subprocess.run(
        [sys.executable, "-c", MIRRORED_SCRIPT, str(tmp_path)],
        cwd=REPO,
        env=env,
        capture_output=True,
        check=False,
        text=True,
        timeout=300,
    )
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    assert result.returncode == 0 and lines, result.stderr[-3000:]
    out = json.loads(lines[0][len("RESULT ") :])
    assert out["default"]["replicas"] == 1 and out["mirrored"]["replicas"] == 2
    np.testing.assert_allclose(out["mirrored"]["losses"], out["default"]["losses"], rtol=1e-5)
    np.testing.assert_allclose(out["mirrored"]["embed"], out["default"]["embed"], rtol=1e-4, atol=1e-6)
    assert out["mirrored"]["valid"] == pytest.approx(out["default"]["valid"], rel=1e-5)


# One process imports TensorFlow once (≈ 5 s here) and forks a child per run: a fork before any TF op has run
# starts a fresh TF runtime in the child, and a SIGKILL ends only that child. The driver prints each child's
# exit status and the last child's result.
_KILLING_DRIVER = """
import json, os, signal, sys, threading
sys.path.insert(0, {root!r})
import tensorflow as tf
from tensorflow.python.checkpoint import checkpoint_management
from examples.enwik8 import data as data_lib, train as train_lib
from examples.enwik8.config import Config

die = lambda *_: os.kill(os.getpid(), signal.SIGKILL)


def arm(mode, at):
    if mode == "in_save":  # during the save of step `at`: the data files are being written
        save = train_lib.Trainer.save
        def killing_save(self):
            if int(self.step.numpy()) == at:
                threading.Timer(0.002, die).start()
            return save(self)
        train_lib.Trainer.save = killing_save
    elif mode == "before_state":  # step `at`'s files written, the manager's state file not yet updated
        record = checkpoint_management.update_checkpoint_state_internal
        def killing_record(*args, **kwargs):
            if "ckpt-%d" % at in str(kwargs.get("model_checkpoint_path", args[1] if len(args) > 1 else "")):
                die()
            return record(*args, **kwargs)
        checkpoint_management.update_checkpoint_state_internal = killing_record


for mode, at in json.loads(sys.argv[1]):
    pid = os.fork()
    if pid == 0:
        arm(mode, at)
        results = train_lib.run(Config(**json.loads({settings!r})), data_lib.load_bytes(None)[:400_000])
        print("RESULT " + json.dumps({{"start": results["start_step"], "losses": [float(x) for x in results["losses"]]}}),
              flush=True)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    print("STATUS " + json.dumps([mode, os.waitstatus_to_exitcode(status)]), flush=True)
"""


def test_sigkill_at_any_moment_resumes_the_same_loss_curve(tmp_path, corpus):
    """A run killed (SIGKILL) in the middle of a checkpoint write, and between writing a checkpoint's files and
    recording it, resumes each time from the last complete checkpoint; the run that
    finally completes has exactly the losses of an uninterrupted run from there on."""
    settings = dict(tiny(tmp_path / "run").__dict__, ckpt_every=2, n_steps=8, resid_pdrop=0.1)
    expected = train_lib.Trainer(tiny(tmp_path / "straight", **{k: settings[k] for k in ("ckpt_every", "resid_pdrop")}),
                                 data_lib.split(corpus), log=quiet).train()
    assert len(expected) == 8
    script = _KILLING_DRIVER.format(root=str(Path(__file__).resolve().parents[1]), settings=json.dumps(settings))
    runs = [("in_save", 4), ("before_state", 6), ("none", 0)]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.run([sys.executable, "-c", script, json.dumps(runs)], capture_output=True, text=True, env=env,
                          check=False, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    statuses = [json.loads(line[len("STATUS "):]) for line in proc.stdout.splitlines() if line.startswith("STATUS ")]
    assert statuses == [["in_save", -9], ["before_state", -9], ["none", 0]], (statuses, proc.stderr[-2000:])
    result = json.loads(proc.stdout.split("RESULT ")[-1].splitlines()[0])
    # The last complete checkpoint before the kill at step 6's state update is ckpt-4 (or ckpt-6 had the kill come
    # after the state file): never a half-written one.
    assert result["start"] in (4, 6)
    np.testing.assert_allclose(result["losses"], expected[result["start"]:], rtol=1e-6)
