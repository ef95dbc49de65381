"""Train the Sparse Transformer on bytes; report bits per byte; sample.

    python -m examples.enwik8.train                                  # built-in corpus (README.md: timings)
    python -m examples.enwik8.train --attention=dense                # the same model on dense TF attention
    python -m examples.enwik8.train --data_path=enwik8.zip --n_layer=30 --n_state=512 --n_head=8 \\
        --n_timesteps=12288 --attn_mode=fixed --local_attn_ctx=128 --recompute --precision=mixed_bfloat16

Resuming: a run lives in a folder (``--model_dir``); running the same command again continues it from its last
checkpoint, and a finished run just reports its numbers again. Without ``--model_dir`` the folder is
``$BSATTN_ENWIK8_RUNS`` (default ``/tmp/bsattn_enwik8``) ``/<name>-<hash>``, the hash taken over the settings a
resume needs unchanged (data, model, attention, dropout, precision, optimiser, seed) and ``--n_steps``: the same
command resumes, different settings start a fresh run in their own folder (printed at the start). With an
explicit ``--model_dir`` an existing run there is resumed, and other settings of those kinds are refused with
the list of changed flags (``--n_steps`` may then change, to extend a run).

A resumed run is exact: the checkpoint holds the model, the optimizer (moments, step count, loss scale) and
the step; the training windows and the dropout noise are functions of ``(seed, step)``, so the continued run
sees what the uninterrupted one would have.

TensorFlow's C++ start-up logs are hidden (``TF_CPP_MIN_LOG_LEVEL=3`` unless set): run with
``TF_CPP_MIN_LOG_LEVEL=0`` to see them.

One step (``tf.function``), on every replica: forward, loss = summed cross-entropy / global batch
tokens (x the loss scale for float16), gradients, all-reduce (sum), clip to ``clip_norm`` by the
global norm, AdamW (its learning rate: linear warm-up, then cosine decay to 0).
"""

from __future__ import annotations

import math
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from examples.enwik8 import config as config_lib
from examples.enwik8 import data as data_lib
from examples.enwik8 import evaluate as eval_lib
from examples.enwik8.config import Config
from examples.enwik8.model import SparseTransformer, token_losses

LN2 = math.log(2.0)


# ---- devices and strategies -----------------------------------------------------------------------------------


def configure_devices(n_cpu_devices: int) -> None:
    """Split the CPU into ``n_cpu_devices`` logical devices; must run before TensorFlow initialises."""
    if n_cpu_devices <= 1:
        return
    cpu = tf.config.list_physical_devices("CPU")[0]
    try:
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * n_cpu_devices)
    except RuntimeError as err:
        if len(tf.config.list_logical_devices("CPU")) != n_cpu_devices:
            raise RuntimeError(
                f"--n_cpu_devices={n_cpu_devices}: TensorFlow is already initialised; set it before any TF op runs"
            ) from err


def cpu_devices_needed(cfg: Config) -> int:
    """Logical CPU devices to configure: ``--n_cpu_devices``, or ``--context_parallel`` when that runs on CPUs
    (``--strategy=default`` on a machine without GPUs)."""
    if cfg.context_parallel > 1 and cfg.strategy == "default" and not tf.config.list_physical_devices("GPU"):
        return max(cfg.n_cpu_devices, cfg.context_parallel)
    return cfg.n_cpu_devices


def make_strategy(name: str, context_parallel: int = 1) -> tf.distribute.Strategy:
    """``default`` (one device; with ``context_parallel = N > 1`` a MirroredStrategy over the first N GPUs, else
    N logical CPUs), ``mirrored`` (all GPUs, else all logical CPUs), ``multi_worker`` (TF_CONFIG)."""
    if name == "default" and context_parallel > 1:
        devices = tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("CPU")
        if len(devices) < context_parallel:
            raise ValueError(f"--context_parallel={context_parallel}: only {len(devices)} devices")
        return tf.distribute.MirroredStrategy([d.name for d in devices[:context_parallel]])
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        if tf.config.list_logical_devices("GPU"):
            return tf.distribute.MirroredStrategy()
        return tf.distribute.MirroredStrategy([d.name for d in tf.config.list_logical_devices("CPU")])
    if name == "multi_worker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    raise ValueError(f"--strategy={name!r}: expected default, mirrored or multi_worker")


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return True
    has_chief = "chief" in resolver.cluster_spec().as_dict()
    return resolver.task_type == "chief" or (not has_chief and resolver.task_type == "worker" and resolver.task_id == 0)


# ---- learning rate ----------------------------------------------------------------------------------------------


@keras.saving.register_keras_serializable(package="enwik8")
class WarmupCosine(keras.optimizers.schedules.LearningRateSchedule):
    """``peak * (i + 1) / warmup`` for the first ``warmup`` updates, then cosine decay towards 0 at ``total``."""

    def __init__(self, peak: float, warmup: int, total: int):
        self.peak, self.warmup, self.total = float(peak), int(warmup), int(total)

    def __call__(self, step):
        step = tf.cast(step, tf.float32)
        warm = self.peak * (step + 1.0) / max(self.warmup, 1)
        progress = tf.clip_by_value((step - self.warmup) / max(self.total - self.warmup, 1), 0.0, 1.0)
        cosine = self.peak * 0.5 * (1.0 + tf.cos(math.pi * progress))
        return tf.where(step < self.warmup, warm, cosine)

    def get_config(self) -> dict:
        return {"peak": self.peak, "warmup": self.warmup, "total": self.total}


def make_optimizer(cfg: Config, variables: list[tf.Variable]) -> keras.optimizers.Optimizer:
    """AdamW (no decay on biases, gains and other 1-D variables), in a LossScaleOptimizer for float16; built."""
    opt = keras.optimizers.AdamW(
        learning_rate=WarmupCosine(cfg.lr, cfg.warmup_iters, cfg.n_steps),
        weight_decay=cfg.weight_decay,
        beta_1=0.9,
        beta_2=0.999,
        epsilon=1e-8,
    )
    opt.exclude_from_weight_decay(var_list=[v for v in variables if v.shape.rank == 1])
    if cfg.precision == "mixed_float16":
        opt = keras.optimizers.LossScaleOptimizer(opt)
    opt.build(variables)
    return opt


# ---- summaries -------------------------------------------------------------------------------------------------


def _scalar_metadata() -> bytes:
    from tensorflow.core.framework import summary_pb2

    metadata = summary_pb2.SummaryMetadata()
    metadata.plugin_data.plugin_name = "scalars"  # what TensorBoard's scalar dashboard reads
    return metadata.SerializeToString()


def write_scalar(tag: str, value: float, step: int | None = None) -> None:
    """A TensorBoard scalar through core TF (``tf.summary.scalar`` needs the tensorboard package)."""
    tf.summary.write(tag, tf.constant(value, tf.float32), step=step, metadata=_scalar_metadata())


# ---- progress ----------------------------------------------------------------------------------------------------


class Progress:
    """A one-line progress bar (redrawn on a terminal) and a permanent line every ``log_every`` steps."""

    def __init__(self, first: int, last: int, log_every: int, bytes_per_step: int, enabled: bool = True):
        self.first, self.last, self.log_every, self.bytes_per_step = first, last, log_every, bytes_per_step
        self.enabled, self.tty = enabled, sys.stderr.isatty()
        self.losses: list[float] = []
        self.times: list[float] = []
        self.rate = 0.0
        self.start = time.perf_counter()

    def elapsed(self) -> str:
        seconds = int(time.perf_counter() - self.start)
        return f"{seconds // 60}:{seconds % 60:02d}"

    def update(self, step: int, loss: float, seconds: float) -> bool:
        """Record step ``step`` (1-based count of steps done); returns True when a log line is due."""
        self.losses.append(loss)
        if step > self.first + 1:  # the first step traces the function
            self.times.append(seconds)
        self.rate = self.bytes_per_step * len(self.times[-50:]) / max(sum(self.times[-50:]), 1e-9)
        due = step % self.log_every == 0 or step == self.last
        if self.enabled and self.tty:
            done = (step - self.first) / max(self.last - self.first, 1)
            eta = (self.last - step) * self.bytes_per_step / max(self.rate, 1e-9)
            bar = "=" * int(24 * done) + ">" + "." * (24 - int(24 * done))
            mean = np.mean(self.losses[-self.log_every :])
            sys.stderr.write(
                f"\rstep {step:>6}/{self.last} [{bar[:25]}] loss {mean:.4f} bpb {mean / LN2:.4f} "
                f"{self.rate / 1e3:6.1f} kB/s eta {int(eta) // 60}:{int(eta) % 60:02d}\x1b[K"
            )
            if due:
                sys.stderr.write("\n")
            sys.stderr.flush()
        return due

    def mean_loss(self) -> float:
        return float(np.mean(self.losses[-self.log_every :]))


# ---- the trainer -------------------------------------------------------------------------------------------------


class Trainer:
    """Model, optimizer, step counter, checkpoints and the compiled step of one run."""

    def __init__(
        self,
        cfg: Config,
        splits: data_lib.Splits,
        strategy: tf.distribute.Strategy | None = None,
        log: Callable[[str], None] | None = None,
    ):
        cfg.validate()
        self.cfg, self.splits = cfg, splits
        self.strategy = strategy or tf.distribute.get_strategy()
        self.chief = is_chief(self.strategy)
        self.log = log or (print if self.chief else (lambda *_: None))
        replicas = self.strategy.num_replicas_in_sync
        if cfg.context_parallel > 1 and replicas != cfg.context_parallel:
            raise ValueError(
                f"--context_parallel={cfg.context_parallel} needs a strategy of that many replicas, got {replicas}"
            )
        if cfg.context_parallel == 1 and cfg.n_batch % replicas:
            raise ValueError(f"--n_batch={cfg.n_batch} must be a multiple of the {replicas} replicas")
        with self.strategy.scope():
            self.model = SparseTransformer(cfg)
            self.optimizer = make_optimizer(cfg, self.model.trainable_variables)
            self.step = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
        self.checkpoint = tf.train.Checkpoint(model=self.model, optimizer=self.optimizer, step=self.step)
        self.ckpt_dir = Path(cfg.run_dir) / "checkpoints"  # the chief's, which every worker restores from
        ckpt_dir = self.ckpt_dir
        if not self.chief:  # every worker writes (the save is collective); only the chief's copy is kept
            ckpt_dir = Path(tempfile.mkdtemp(prefix="enwik8_worker_ckpt_"))
        self.manager = tf.train.CheckpointManager(self.checkpoint, str(ckpt_dir), max_to_keep=3)
        self.eval_fn = eval_lib.make_eval_fn(self.model)
        self._train_step = self._make_train_step()
        self.history: list[float] = []
        self.step_seconds: list[float] = []  # wall time of each step (the first one includes tracing)

    # -- checkpoints

    def restore(self, path: str | None = None) -> int:
        """Restore checkpoint ``path`` (default: the latest, if any) after checking the run's settings; returns
        the step."""
        candidates = [path] if path else self._complete_checkpoints()
        if candidates:
            saved = config_lib.load_saved(self.cfg.run_dir)
            if saved is not None:
                self.cfg.check_resumable(saved)
        for i, candidate in enumerate(candidates):
            try:
                self.checkpoint.restore(candidate).assert_existing_objects_matched()
            except (tf.errors.OpError, ValueError, AssertionError) as e:
                if path or i + 1 == len(candidates):
                    raise
                self.log(f"checkpoint {candidate} is unreadable ({type(e).__name__}); trying the one before")
                continue
            self.log(f"resumed from {candidate} at step {int(self.step.numpy())}")
            break
        return int(self.step.numpy())

    def _complete_checkpoints(self) -> list[str]:
        """Checkpoints newest first. The manager's state file is replaced atomically only after a save's files
        are complete (TF writes them to temporaries and renames), so after a kill at any moment, even inside
        ``save``, the state names complete checkpoints only; a damaged one (e.g. a disk error) falls back to the
        one before in ``restore``."""
        state = tf.train.get_checkpoint_state(str(self.ckpt_dir))
        if state is None:
            return []
        listed = list(state.all_model_checkpoint_paths) or [state.model_checkpoint_path]
        return [p for p in reversed(listed) if tf.io.gfile.exists(p + ".index")]

    def save(self) -> str:
        """Save the step's checkpoint (collective: every worker calls it); a non-chief worker's copy is deleted at
        once, so only the chief's checkpoint directory holds checkpoints. Returns the saved path."""
        path = self.manager.save(checkpoint_number=int(self.step.numpy()))
        if not self.chief:
            directory = self.manager.directory
            tf.io.gfile.rmtree(directory)
            tf.io.gfile.makedirs(directory)  # empty, for the next save
        return path

    # -- the step

    def _make_train_step(self) -> Callable:
        cfg, strategy, model, opt = self.cfg, self.strategy, self.model, self.optimizer
        variables = model.trainable_variables
        scaled = isinstance(opt, keras.optimizers.LossScaleOptimizer)
        global_tokens = float(cfg.n_batch * cfg.n_timesteps)
        n_replicas = strategy.num_replicas_in_sync

        def replica_step(batch):
            ctx = tf.distribute.get_replica_context()
            stream = tf.stack([tf.constant(cfg.seed, tf.int64), batch["step"][0]])
            seed = tf.random.experimental.stateless_fold_in(
                tf.random.experimental.stateless_fold_in(stream, 1), ctx.replica_id_in_sync_group
            )
            with tf.GradientTape() as tape:
                loss = tf.reduce_sum(token_losses(model(batch["x"], seed), batch["y"])) / global_tokens
                objective = opt.scale_loss(loss) if scaled else loss
            grads = [tf.convert_to_tensor(g) for g in tape.gradient(objective, variables)]
            grads = ctx.all_reduce(tf.distribute.ReduceOp.SUM, grads)
            loss_scale = tf.convert_to_tensor(opt.dynamic_scale) if scaled else tf.constant(1.0)
            # Clipping needs the full gradient, so it happens here, after the all-reduce (Keras would clip each
            # replica's part). The optimizer sums over the replicas once more, hence the division.
            grads, norm = tf.clip_by_global_norm(grads, cfg.clip_norm * loss_scale)
            if n_replicas > 1:
                grads = [g / n_replicas for g in grads]
            opt.apply_gradients(zip(grads, variables))
            return loss, norm / loss_scale

        @tf.function(autograph=False)
        def train_step(iterator):
            loss, norm = strategy.run(replica_step, args=(next(iterator),))
            loss = strategy.reduce(tf.distribute.ReduceOp.SUM, loss, axis=None)
            return loss, strategy.experimental_local_results(norm)[0]

        return train_step

    def dataset(self, start_step: int):
        cfg, train = self.cfg, self.splits.train
        return self.strategy.distribute_datasets_from_function(
            lambda ctx: data_lib.train_dataset(
                train, cfg.n_timesteps, cfg.n_batch, cfg.seed, start_step, ctx, cfg.context_parallel
            )
        )

    def learning_rate(self) -> float:
        return float(self.optimizer.learning_rate.numpy()) if hasattr(self.optimizer.learning_rate, "numpy") else 0.0

    # -- evaluation

    def evaluate(self, split: str, max_bytes: int = 0) -> tuple[float, int]:
        return eval_lib.bits_per_byte(
            self.model, getattr(self.splits, split), self.cfg.eval_batch, max_bytes, self.eval_fn
        )

    # -- the loop

    def train(self, until_step: int | None = None, writer=None) -> list[float]:
        """Train from the current step to ``until_step`` (default ``n_steps``); returns the losses (nats)."""
        cfg = self.cfg
        first = int(self.step.numpy())
        last = min(cfg.n_steps, until_step or cfg.n_steps)
        if first >= last:
            return []
        writer = writer or tf.summary.create_noop_writer()
        iterator = iter(self.dataset(first))
        progress = Progress(first, last, cfg.log_every, cfg.n_batch * cfg.n_timesteps, enabled=self.chief)
        losses = []
        for step in range(first + 1, last + 1):
            start = time.perf_counter()
            loss, norm = self._train_step(iterator)
            loss, norm = float(loss), float(norm)
            seconds = time.perf_counter() - start
            self.step_seconds.append(seconds)
            self.step.assign(step)
            losses.append(loss)
            if not math.isfinite(loss) and cfg.precision != "mixed_float16":
                raise FloatingPointError(f"step {step}: the loss is {loss}; try a lower --lr")
            if progress.update(step, loss, seconds):
                mean = progress.mean_loss()
                lr = self.learning_rate()
                self.log(
                    f"step {step:>6}/{cfg.n_steps}  loss {mean:.4f}  train bpb {mean / LN2:.4f}  grad norm {norm:.3f}  "
                    f"lr {lr:.2e}  {progress.rate / 1e3:.1f} kB/s  [{progress.elapsed()}]"
                )
                with writer.as_default(step=step):
                    write_scalar("train/loss", mean)
                    write_scalar("train/bits_per_byte", mean / LN2)
                    write_scalar("train/grad_norm", norm)
                    write_scalar("train/learning_rate", lr)
                    write_scalar("train/bytes_per_second", progress.rate)
                    if isinstance(self.optimizer, keras.optimizers.LossScaleOptimizer):
                        write_scalar("train/loss_scale", float(self.optimizer.dynamic_scale.numpy()))
            if cfg.eval_every and step % cfg.eval_every == 0 and step != last and self.chief:
                bpb, count = self.evaluate("valid", cfg.eval_bytes)
                self.log(f"step {step:>6}  valid bpb {bpb:.4f}  (first {count:,} bytes of valid)")
                with writer.as_default(step=step):
                    write_scalar("valid/bits_per_byte_prefix", bpb)
            if cfg.ckpt_every and step % cfg.ckpt_every == 0:
                self.save()
        if last % max(cfg.ckpt_every, 1) or not cfg.ckpt_every:
            self.save()
        writer.flush()
        self.history.extend(losses)
        return losses


def restore_model(cfg: Config) -> tuple[SparseTransformer, int]:
    """The model of the latest checkpoint in ``cfg.run_dir`` (no optimizer), and its step."""
    model = SparseTransformer(cfg)
    step = tf.Variable(0, dtype=tf.int64, name="step")
    latest = tf.train.latest_checkpoint(str(Path(cfg.run_dir) / "checkpoints"))
    if latest is None:
        raise FileNotFoundError(f"--model_dir={cfg.run_dir}: no checkpoint")
    tf.train.Checkpoint(model=model, step=step).restore(latest).expect_partial()
    return model, int(step.numpy())


def run(cfg: Config, corpus: np.ndarray | None = None, until_step: int | None = None) -> dict:
    """One run: resume or start in ``cfg.run_dir``, train, evaluate, sample. Returns the results.

    ``corpus``: the bytes to split (default: ``load_bytes(cfg.data_path)``); ``until_step``: stop there, as if
    killed after that step's checkpoint (the schedule still ends at ``n_steps``).
    """
    cfg.validate()
    configure_devices(cpu_devices_needed(cfg))
    strategy = make_strategy(cfg.strategy, cfg.context_parallel)
    if corpus is None:
        corpus = data_lib.load_bytes(cfg.data_path)
    splits = data_lib.split(corpus)
    trainer = Trainer(cfg, splits, strategy)
    log = trainer.log
    log(data_lib.describe(corpus, cfg.data_path))
    log(
        f"splits: train {splits.train.size:,} / valid {splits.valid.size:,} / test {splits.test.size:,} bytes; "
        f"model: {cfg.n_layer} layers, d={cfg.n_state}, {cfg.n_head} heads, {trainer.model.n_params():,} parameters; "
        f"attention: {cfg.attention} {cfg.attn_mode}, T={cfg.n_timesteps}; {strategy.num_replicas_in_sync} replica(s)"
        + (", each sequence split over them (--context_parallel)" if cfg.context_parallel > 1 else "")
    )
    run_dir = Path(cfg.run_dir)
    resuming = (run_dir / "config.json").exists()
    log(f"model_dir: {run_dir} ({'an existing run: resuming' if resuming else 'a new run'})")
    run_dir.mkdir(parents=True, exist_ok=True)
    start_step = trainer.restore()
    if trainer.chief:
        config_path = run_dir / "config.json"  # atomic: a kill never leaves half a file
        config_path.with_suffix(".json.tmp").write_text(cfg.to_json())
        os.replace(config_path.with_suffix(".json.tmp"), config_path)
        writer = tf.summary.create_file_writer(str(run_dir / "logs"))
    else:
        writer = tf.summary.create_noop_writer()
    start = time.perf_counter()
    try:
        losses = trainer.train(until_step, writer)
    except KeyboardInterrupt:
        path = trainer.save()
        log(f"\ninterrupted: saved {path}; run the same command again to resume")
        raise
    results: dict = {
        "step": int(trainer.step.numpy()),
        "start_step": start_step,
        "losses": losses,
        "train_seconds": time.perf_counter() - start,
    }
    if losses:
        log(f"trained steps {start_step + 1}..{results['step']} in {results['train_seconds']:.0f} s")
    if cfg.final_eval and results["step"] >= cfg.n_steps and trainer.chief:  # evaluation has no collectives
        for split in ("valid", "test"):
            bpb, count = trainer.evaluate(split)
            results[f"{split}_bpb"] = bpb
            log(f"{split}: {bpb:.4f} bits per byte ({count:,} bytes)")
            with writer.as_default(step=results["step"]):
                write_scalar(f"{split}/bits_per_byte", bpb)
        if cfg.sample_bytes:
            prompt = cfg.sample_prompt.encode() or bytes(splits.test[:120])
            text = eval_lib.sample_with_settings(trainer.model, prompt, cfg)
            results["sample"] = eval_lib.printable(text)
            log(f"--- prompt ---\n{eval_lib.printable(prompt)}\n--- sample ---\n{results['sample']}\n---")
    writer.flush()
    results["trainer"] = trainer
    return results


def main(argv: list[str]) -> None:
    del argv
    from absl import logging

    logging.set_verbosity(logging.WARNING)  # TF's checkpointing logs every save at INFO through absl
    cfg = config_lib.from_flags()
    try:
        cfg.validate()
        configure_devices(cpu_devices_needed(cfg))
        corpus = data_lib.load_bytes(cfg.data_path)
    except (OSError, ValueError) as err:
        raise SystemExit(f"error: {err}") from None
    try:
        run(cfg, corpus)
    except config_lib.SettingsError as err:
        raise SystemExit(f"error: {err}") from None


if __name__ == "__main__":
    from absl import app, flags

    config_lib.define_flags()
    flags.adopt_module_key_flags(config_lib)  # so that --help lists them
    app.run(main, flags_parser=config_lib.parse_flags)
