"""Bits per byte on a split, and sampling a continuation.

As a script, it restores the latest checkpoint of a run and reports valid/test bits per byte and a
sample (the settings are read from ``--model_dir/config.json``; without ``--model_dir``: the run trained
last under ``$BSATTN_ENWIK8_RUNS``, default ``/tmp/bsattn_enwik8``)::

    python -m examples.enwik8.evaluate --sample_prompt="def main("
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable

import numpy as np
import tensorflow as tf

from examples.enwik8 import data as data_lib
from examples.enwik8.model import SparseTransformer, token_losses

LN2 = math.log(2.0)


def make_eval_fn(model: SparseTransformer) -> Callable:
    """``f(x, y)`` -> the summed cross-entropy in nats (float64 scalar) of int32 ``[b, T]`` windows, no dropout."""

    @tf.function(autograph=False, reduce_retracing=True)
    def eval_fn(x, y):
        return tf.reduce_sum(tf.cast(token_losses(model(x), y), tf.float64))

    return eval_fn


def bits_per_byte(
    model: SparseTransformer,
    split: np.ndarray,
    n_batch: int,
    max_bytes: int = 0,
    eval_fn: Callable | None = None,
) -> tuple[float, int]:
    """``(bits per byte, bytes predicted)`` over the sequential, non-overlapping windows of ``split``.

    bits per byte = mean cross-entropy in nats / ln 2. ``max_bytes > 0`` evaluates only a prefix.
    """
    eval_fn = eval_fn or make_eval_fn(model)
    total, count = 0.0, 0
    for x, y in data_lib.eval_dataset(split, model.cfg.n_timesteps, n_batch, max_bytes):
        total += float(eval_fn(x, y))
        count += int(np.prod(y.shape))
    return total / count / LN2, count


def make_sampler(model: SparseTransformer, temperature: float) -> Callable:
    """``f(window [1, T] int32, position, seed [2] int64)`` -> the next byte after ``window[0, position]``."""

    @tf.function(autograph=False)
    def next_byte(window, position, seed):
        logits = model(window)[0, position]
        if temperature <= 0:
            return tf.argmax(logits, output_type=tf.int32)
        return tf.random.stateless_categorical(logits[None] / temperature, 1, seed, dtype=tf.int32)[0, 0]

    return next_byte


def sample(model: SparseTransformer, prompt: bytes, n_bytes: int, temperature: float = 0.8, seed: int = 0) -> bytes:
    """``n_bytes`` sampled after ``prompt`` (temperature 0: greedy). The model sees the last ``T`` bytes; a
    shorter context sits at the start of the window, the rest zeros (causal attention never reads them)."""
    n_timesteps = model.cfg.n_timesteps
    next_byte = make_sampler(model, temperature)
    context = list(prompt) or [ord("\n")]
    for i in range(n_bytes):
        window = context[-n_timesteps:]
        position = len(window) - 1
        window = np.array([window + [0] * (n_timesteps - len(window))], dtype=np.int32)
        context.append(int(next_byte(window, tf.constant(position), tf.constant([seed, i], tf.int64))))
    return bytes(context[len(prompt or b"\n") :])


def printable(text: bytes) -> str:
    return text.decode("utf-8", errors="replace")


def main(argv: list[str]) -> None:
    from absl import flags

    from examples.enwik8 import config as config_lib
    from examples.enwik8.train import restore_model

    del argv
    fl = flags.FLAGS
    model_dir = fl.model_dir or config_lib.latest_run_dir()
    if model_dir is None:
        raise SystemExit(f"no run under {config_lib.runs_dir()} (train one first, or pass --model_dir)")
    saved = config_lib.load_saved(model_dir)
    if saved is None:
        raise SystemExit(f"--model_dir={model_dir}: no config.json (was a run trained there?)")
    overrides = {"model_dir": str(model_dir), "eval_batch": fl.eval_batch, "sample_bytes": fl.sample_bytes}
    overrides.update(sample_prompt=fl.sample_prompt, sample_temperature=fl.sample_temperature)
    if fl["data_path"].present:
        overrides["data_path"] = fl.data_path
    cfg = config_lib.Config(**{**saved, **overrides})
    model, step = restore_model(cfg)
    corpus = data_lib.load_bytes(cfg.data_path)
    splits = data_lib.split(corpus)
    print(f"{model_dir}: checkpoint at step {step}; {data_lib.describe(corpus, cfg.data_path)}")
    eval_fn = make_eval_fn(model)
    for name in ("valid", "test"):
        start = time.perf_counter()
        bpb, count = bits_per_byte(model, getattr(splits, name), cfg.eval_batch, eval_fn=eval_fn)
        print(f"{name}: {bpb:.4f} bits per byte over {count:,} bytes ({time.perf_counter() - start:.0f} s)")
    if cfg.sample_bytes:
        prompt = cfg.sample_prompt.encode() or bytes(splits.test[:120])
        text = sample(model, prompt, cfg.sample_bytes, cfg.sample_temperature, cfg.seed)
        print(f"--- prompt ---\n{printable(prompt)}\n--- sample ---\n{printable(text)}\n---")
    sys.stdout.flush()


if __name__ == "__main__":
    from absl import app, flags

    flags.DEFINE_string("model_dir", "", "the run to evaluate (its config.json and checkpoints); empty: the latest")
    flags.DEFINE_string("data_path", "", "override the run's data (enwik8 or enwik8.zip; empty: the run's)")
    flags.DEFINE_integer("eval_batch", 16, "evaluation batch size")
    flags.DEFINE_integer("sample_bytes", 200, "bytes to sample (0 = none)")
    flags.DEFINE_string("sample_prompt", "", "prompt; empty: the first 120 bytes of the test split")
    flags.DEFINE_float("sample_temperature", 0.8, "sampling temperature (0 = greedy)")
    from examples.enwik8 import config as config_lib

    app.run(main, flags_parser=config_lib.parse_flags)
