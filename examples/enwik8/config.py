"""The settings of a run: one dataclass, whose fields are also the command-line flags.

``Config()`` holds the defaults of the bare ``python -m examples.enwik8.train``: a small model on the
built-in corpus (timings: README.md, "Results"). Names follow blocksparse's
``examples/transformer/enwik8.py`` where they fit (``n_layer``, ``n_state``, ``n_head``,
``n_timesteps``, ``n_batch``, ``lr``, ``warmup_iters``, ``clip_norm``, ``resid_pdrop``,
``embed_pdrop``, ``recompute``); the sizes are smaller so that the default fits a CPU.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any

ATTENTIONS = ("sparse", "dense", "memory_efficient")
BLOCKS = ("transformer", "colt5")
ATTN_MODES = ("all", "local", "strided", "fixed")
STRIDED_HEADS = ("split", "interleaved")
POS_EMBDS = ("factorized", "dense")
PRECISIONS = ("float32", "mixed_bfloat16", "mixed_float16")
STRATEGIES = ("default", "mirrored", "multi_worker")


DEFAULT_RUNS_DIR = "/tmp/bsattn_enwik8"
RUNS_ENV = "BSATTN_ENWIK8_RUNS"  # the base folder of the default run directories


class SettingsError(ValueError):
    """Settings that cannot run, or that do not match the run being resumed."""


def _field(default: Any, help: str, choices: tuple[str, ...] | None = None) -> Any:
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices})


@dataclasses.dataclass
class Config:
    # ---- data
    data_path: str = _field(
        "", "enwik8 (the raw 100,000,000-byte file) or enwik8.zip; empty: the built-in corpus (no download)"
    )
    n_timesteps: int = _field(512, "context length in bytes (T)")
    n_batch: int = _field(4, "global batch size (split over the replicas)")
    # ---- model
    n_layer: int = _field(4, "number of Transformer blocks")
    n_state: int = _field(128, "model width d")
    n_head: int = _field(2, "attention heads (head size n_state / n_head)")
    mlp_ratio: int = _field(4, "MLP width / n_state")
    attention: str = _field(
        "sparse",
        "sparse: bsattn's blocksparse_attention_impl; dense: attention_impl; memory_efficient: the dense causal "
        "model (--attn_mode=all) on bsattn.memory_efficient_attention, O(T) memory",
        ATTENTIONS,
    )
    attn_mode: str = _field(
        "fixed", "attention pattern (both engines compute the same mask; 'all' is plain causal)", ATTN_MODES
    )
    local_attn_ctx: int = _field(128, "the stride l of 'fixed' and 'strided', the window of 'local'")
    blocksize: int = _field(32, "block size of the sparse layout (8, 16, 32, 64 or 128)")
    num_verts: int = _field(1, "'fixed': summary column groups, one per head group")
    vertsize: int = _field(1, "'fixed': summary width in blocks (c = vertsize * blocksize bytes)")
    strided_heads: str = _field(
        "split",
        "'strided': split = half the heads local, half strided in every block; "
        "interleaved = blocks alternate local and strided",
        STRIDED_HEADS,
    )
    block: str = _field(
        "transformer",
        "transformer: the Sparse Transformer block (attention per --attention/--attn_mode); colt5: CoLT5's routed "
        "blocks (bsattn.colt5: ConditionalRoutedAutoregressiveAttention + ConditionalRoutedFeedForward)",
        BLOCKS,
    )
    colt5_light_window: int = _field(128, "colt5: light attention window (a token sees back to the previous window)")
    colt5_heavy_window: int = _field(0, "colt5: heavy window (routing unit of the queries); 0 = colt5_light_window")
    colt5_heavy_tokens_q: int = _field(32, "colt5: heavy (routed) queries per heavy window")
    colt5_heavy_tokens_kv: int = _field(64, "colt5: heavy (routed) keys/values from all earlier windows")
    colt5_heavy_ff_tokens: int = _field(32, "colt5: tokens of every colt5_light_window given the heavy feed-forward")
    colt5_routed_kv: int = _field(1, "colt5: key/value routes (n_head must be a multiple)")
    pos_embd: str = _field(
        "factorized",
        "factorized: row + column embeddings of width local_attn_ctx (the paper's); dense: one per position",
        POS_EMBDS,
    )
    resid_pdrop: float = _field(0.05, "dropout on each residual branch")
    embed_pdrop: float = _field(0.05, "dropout on the embeddings")
    recompute: bool = _field(False, "recompute each block in the backward pass (bsattn.recomputable)")
    precision: str = _field("float32", "compute precision (variables stay float32)", PRECISIONS)
    # ---- optimisation
    n_steps: int = _field(1600, "training steps")
    lr: float = _field(1e-3, "peak learning rate")
    warmup_iters: int = _field(100, "linear warm-up steps, then cosine decay to 0 at n_steps")
    weight_decay: float = _field(0.01, "AdamW decoupled weight decay (not on biases and norms)")
    clip_norm: float = _field(1.0, "clip gradients to this global norm")
    seed: int = _field(0, "seed of the initialisation, the window order and dropout")
    # ---- distribution
    strategy: str = _field("default", "tf.distribute strategy (multi_worker reads TF_CONFIG)", STRATEGIES)
    n_cpu_devices: int = _field(1, "split the CPU into this many logical devices (to try mirrored without GPUs)")
    context_parallel: int = _field(
        1,
        "split each sequence over this many replicas (bsattn.context_parallel: each holds T/N tokens and receives "
        "the key/value blocks its rows need); with --strategy=default a MirroredStrategy over the first N GPUs, "
        "else N logical CPUs; with mirrored/multi_worker the strategy's replicas must be N. --attention=sparse only",
    )
    # ---- bookkeeping
    model_dir: str = _field(
        "",
        "checkpoints and TensorBoard logs; an existing run there is resumed. Empty: RUNS_DIR/<name>-<hash of "
        "the run's settings>, so the same command resumes and different settings start fresh (RUNS_DIR: "
        f"${RUNS_ENV}, else {DEFAULT_RUNS_DIR})",
    )
    ckpt_every: int = _field(400, "save a checkpoint every this many steps (and at the end)")
    log_every: int = _field(50, "write summaries and a log line every this many steps")
    eval_every: int = _field(400, "evaluate on the first eval_bytes of the valid split every this many steps")
    eval_bytes: int = _field(131072, "bytes of valid used by the periodic evaluation (0 = all)")
    eval_batch: int = _field(16, "evaluation batch size")
    final_eval: bool = _field(True, "after training: bits per byte on all of valid and test, and a sample")
    sample_bytes: int = _field(200, "bytes to sample after training (0 = none)")
    sample_prompt: str = _field("", "prompt of the sample; empty: the first 120 bytes of the test split")
    sample_temperature: float = _field(0.8, "sampling temperature (0 = greedy)")
    sample_top_k: int = _field(0, "sample from the k likeliest bytes only (0 = all 256)")
    sample_cache: bool = _field(
        True, "sample with a key/value cache (one decoding step per byte; not --block=colt5); off: re-run the window"
    )
    sample_window_shift: int = _field(
        1, "bytes the sampling window moves once the context exceeds n_timesteps (1: sliding; larger: fewer re-runs)"
    )

    @property
    def d_head(self) -> int:
        return self.n_state // self.n_head

    def validate(self) -> None:
        """Raise ``ValueError`` naming the flag for settings the model cannot run."""
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                raise SettingsError(f"--{f.name}={getattr(self, f.name)!r}: expected one of {', '.join(choices)}")
        positive = ("n_timesteps", "n_batch", "n_layer", "n_state", "n_head", "mlp_ratio", "n_steps", "n_cpu_devices",
                    "context_parallel")  # fmt: skip
        for name in positive:
            if getattr(self, name) < 1:
                raise SettingsError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if self.n_state % self.n_head:
            raise SettingsError(f"--n_state={self.n_state} must be a multiple of --n_head={self.n_head}")
        if self.n_timesteps % self.blocksize:
            raise SettingsError(f"--n_timesteps={self.n_timesteps} must be a multiple of --blocksize={self.blocksize}")
        if self.context_parallel > 1:
            self._validate_context_parallel()
        if self.block == "colt5":
            self._validate_colt5()
            return
        if self.attention == "memory_efficient" and self.attn_mode != "all":
            raise SettingsError(
                f"--attention=memory_efficient is the dense causal model: it needs --attn_mode=all, got {self.attn_mode}"
            )
        if self.attn_mode != "all" and self.local_attn_ctx < 1:
            raise SettingsError(f"--attn_mode={self.attn_mode} needs --local_attn_ctx >= 1")
        if self.attn_mode == "strided" and self.strided_heads == "split" and self.n_head % 2:
            raise SettingsError(f"--strided_heads=split needs an even --n_head, got {self.n_head}")
        if not 0.0 <= self.resid_pdrop < 1.0 or not 0.0 <= self.embed_pdrop < 1.0:
            raise SettingsError("--resid_pdrop and --embed_pdrop must be in [0, 1)")
        self._validate_patterns()

    def _validate_context_parallel(self) -> None:
        n = self.context_parallel
        if self.block != "transformer" or self.attention != "sparse":
            raise SettingsError(
                f"--context_parallel={n} needs --block=transformer --attention=sparse (the fused block-sparse op), "
                f"got --block={self.block} --attention={self.attention}"
            )
        if self.n_timesteps % (n * self.blocksize):
            raise SettingsError(
                f"--context_parallel={n}: --n_timesteps={self.n_timesteps} must be a multiple of context_parallel * "
                f"blocksize = {n} * {self.blocksize} (each replica holds whole blocks)"
            )

    def _validate_colt5(self) -> None:
        for name in COLT5_FIELDS:
            if name != "colt5_heavy_window" and getattr(self, name) < 1:
                raise SettingsError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if self.colt5_heavy_window < 0:
            raise SettingsError(f"--colt5_heavy_window must be >= 0, got {self.colt5_heavy_window}")
        if self.n_head % self.colt5_routed_kv:
            raise SettingsError(
                f"--n_head={self.n_head} must be a multiple of --colt5_routed_kv={self.colt5_routed_kv}"
            )
        if not 0.0 <= self.resid_pdrop < 1.0 or not 0.0 <= self.embed_pdrop < 1.0:
            raise SettingsError("--resid_pdrop and --embed_pdrop must be in [0, 1)")

    def _validate_patterns(self) -> None:
        from bsattn import patterns

        modes = {"strided": ("local", "strided")}.get(self.attn_mode, (self.attn_mode,))
        heads = self.n_head // 2 if self.attn_mode == "strided" and self.strided_heads == "split" else self.n_head
        for mode in modes:
            try:
                patterns.mode_pattern(
                    mode,
                    self.n_timesteps,
                    heads,
                    None if mode == "all" else self.local_attn_ctx,
                    blocksize=self.blocksize,
                    num_verts=self.num_verts,
                    vertsize=self.vertsize,
                )
            except ValueError as err:
                hint = (
                    " (strided needs n_timesteps / local_attn_ctx to be a multiple of blocksize)"
                    if mode == "strided"
                    else ""
                )
                raise SettingsError(
                    f"--attn_mode={self.attn_mode} with --n_timesteps={self.n_timesteps} "
                    f"--local_attn_ctx={self.local_attn_ctx} --blocksize={self.blocksize}: {err}{hint}"
                ) from err

    # ---- persistence: the settings a checkpoint depends on are stored next to it

    RUN_IDENTITY = (
        "data_path",
        "n_timesteps",
        "n_batch",
        "n_layer",
        "n_state",
        "n_head",
        "mlp_ratio",
        "attention",
        "attn_mode",
        "local_attn_ctx",
        "blocksize",
        "num_verts",
        "vertsize",
        "strided_heads",
        "pos_embd",
        "resid_pdrop",
        "embed_pdrop",
        "precision",
        "lr",
        "warmup_iters",
        "weight_decay",
        "clip_norm",
        "seed",
    )

    @property
    def run_dir(self) -> str:
        """Where this run lives: ``model_dir``, or when that is empty ``runs_dir() / run_name()``."""
        return self.model_dir or str(runs_dir() / self.run_name())

    def run_name(self) -> str:
        """``<attention>-<attn_mode>-<n_layer>x<n_state>-T<n_timesteps>-<hash>``: the hash covers the settings that
        must match for a resume (``RUN_IDENTITY``) and ``n_steps``, so a short trial run is never continued
        into the full one."""
        key = {name: getattr(self, name) for name in (*self.identity(), "n_steps")}
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]
        kind = "colt5" if self.block == "colt5" else f"{self.attention}-{self.attn_mode}"
        return f"{kind}-{self.n_layer}x{self.n_state}-T{self.n_timesteps}-{digest}"

    def identity(self) -> tuple[str, ...]:
        """The settings a resume must keep: ``RUN_IDENTITY``, plus the CoLT5 ones for ``--block=colt5`` (so the
        names, and hashes, of the Sparse Transformer's runs are those of before the flag existed)."""
        return self.RUN_IDENTITY + (("block", *COLT5_FIELDS) if self.block == "colt5" else ())

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    def check_resumable(self, saved: dict) -> None:
        """Raise ``ValueError`` when a run saved with ``saved`` settings cannot be continued with these."""
        saved = {"block": "transformer", **saved}  # runs saved before --block existed
        changed = [
            f"--{name}: {saved[name]!r} -> {getattr(self, name)!r}"
            for name in dict.fromkeys(("block", *self.identity()))
            if name in saved and saved[name] != getattr(self, name)
        ]
        if changed:
            raise SettingsError(
                "the run in --model_dir was made with other settings, so it cannot be resumed:\n  "
                + "\n  ".join(changed)
                + "\nUse another --model_dir (or delete that one), or leave --model_dir out (each setting then "
                "gets its own folder), to start a new run."
            )


COLT5_FIELDS = (
    "colt5_light_window",
    "colt5_heavy_window",
    "colt5_heavy_tokens_q",
    "colt5_heavy_tokens_kv",
    "colt5_heavy_ff_tokens",
    "colt5_routed_kv",
)


def runs_dir() -> Path:
    """The base folder of the default run directories: ``$BSATTN_ENWIK8_RUNS``, else ``/tmp/bsattn_enwik8``."""
    return Path(os.environ.get(RUNS_ENV) or DEFAULT_RUNS_DIR)


def latest_run_dir() -> Path | None:
    """The run under ``runs_dir()`` whose ``config.json`` was written last, or None."""
    configs = sorted(runs_dir().glob("*/config.json"), key=lambda path: path.stat().st_mtime)
    return configs[-1].parent if configs else None


def load_saved(model_dir: str | Path) -> dict | None:
    """The settings saved in ``model_dir/config.json``, or None."""
    path = Path(model_dir) / "config.json"
    return json.loads(path.read_text()) if path.exists() else None


def define_flags() -> None:
    """Define one absl flag per field of ``Config`` (same name, default and help)."""
    from absl import flags

    for f in dataclasses.fields(Config):
        help_text, choices = f.metadata["help"], f.metadata.get("choices")
        if choices:
            flags.DEFINE_enum(f.name, f.default, list(choices), help_text)
        elif f.type in ("bool", bool):
            flags.DEFINE_bool(f.name, f.default, help_text)
        elif f.type in ("int", int):
            flags.DEFINE_integer(f.name, f.default, help_text)
        elif f.type in ("float", float):
            flags.DEFINE_float(f.name, f.default, help_text)
        else:
            flags.DEFINE_string(f.name, f.default, help_text)


def from_flags() -> Config:
    """The ``Config`` of the parsed absl flags."""
    from absl import flags

    values = {f.name: flags.FLAGS[f.name].value for f in dataclasses.fields(Config)}
    return Config(**values)


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing for ``app.run(main, flags_parser=parse_flags)``, where ``--help`` exits 0 (absl: 1)."""
    from absl import flags

    try:
        return flags.FLAGS(argv)
    except flags.Error as err:
        raise SystemExit(f"FATAL Flags parsing error: {err}\nPass --help to see the flags.") from None
    except SystemExit as stop:  # only absl's help flags exit while parsing, with 1 after printing the help
        raise SystemExit(0 if stop.code == 1 else stop.code) from None
