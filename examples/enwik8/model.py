"""The Sparse Transformer of Child et al. (2019) over bytes, with attention from bsattn.

Pre-norm residual blocks (paper §5.2)::

    h = embed(x) + positions                            [B, T, d]
    a = dropout(proj(attention(norm(h))));  h += a
    b = dropout(W2 gelu(W1 norm(h)));       h += b      (n_layer times)
    logits = norm(h) W_out                              [B, T, 256]

Initialisation as in the paper's §6: token embedding N(0, 0.125/sqrt(d)), position embeddings
N(0, 0.125/sqrt(d * n_emb)) (n_emb = 2 for the factorised row/column embedding), weights
N(0, 0.125/sqrt(d_in)), biases 0, the attention output and W2 further scaled by 1/sqrt(2 n_layer),
output weights 0. GELU is the paper's x * sigmoid(1.702 x).

Attention reads and writes ``[B, T, H*D]`` (head h owns channels [h*D, (h+1)*D)), the layout of
``bsattn.blocksparse_attention_impl`` and of its dense twin ``bsattn.attention_impl``:
``--attention=sparse|dense`` switches engines over the same mask; ``--attention=memory_efficient`` (with
``--attn_mode=all``) runs the dense causal model on ``bsattn.memory_efficient_attention`` (O(T) memory);
``--block=colt5`` replaces the blocks by CoLT5's routed attention and feed-forward (``CoLT5Block``).
``'fixed'`` is the paper's merged fixed pattern (one head sees its stride chunk and the summary columns);
``'strided'`` factorises into ``'local'`` and ``'strided'`` heads, either half of the heads each (``split``)
or alternating blocks (``interleaved``).

Mixed precision: variables are float32 and are cast to the compute dtype where they are used; norms,
the softmax statistics (inside the ops) and the logits are float32. Dropout is stateless, seeded by
``(seed, step, layer, site)``, so a recomputed block (``recompute=True``) draws the same masks and a
resumed run the same noise.
"""

from __future__ import annotations

import math

import tensorflow as tf

from bsattn import (
    attention_impl,
    blocksparse_attention_impl,
    memory_efficient_attention,
    recomputable,
)
from examples.enwik8.config import Config

N_VOCAB = 256
COMPUTE_DTYPES = {"float32": tf.float32, "mixed_bfloat16": tf.bfloat16, "mixed_float16": tf.float16}


def gelu(x: tf.Tensor) -> tf.Tensor:
    """The paper's GELU approximation, ``x * sigmoid(1.702 x)``."""
    return x * tf.sigmoid(tf.constant(1.702, x.dtype) * x)


def dropout(x: tf.Tensor, rate: float, seed: tf.Tensor | None) -> tf.Tensor:
    """Stateless dropout (``seed`` int64 ``[2]``); the identity when ``seed`` is None or ``rate`` is 0."""
    if seed is None or rate == 0.0:
        return x
    return tf.nn.experimental.stateless_dropout(x, rate, seed)


def _normal(shape: list[int], std: float, seed: int) -> tf.Tensor:
    return tf.random.stateless_normal(shape, seed=[seed, 0], stddev=std)


class Linear(tf.Module):
    """``y = x W + b``: ``[..., n_in] -> [..., n_out]``, ``W ~ N(0, std)`` (std 0 gives zeros), ``b = 0``."""

    def __init__(self, n_in: int, n_out: int, std: float, seed: int, name: str):
        super().__init__(name=name)
        with self.name_scope:
            init = _normal([n_in, n_out], std, seed) if std > 0 else tf.zeros([n_in, n_out])
            self.w = tf.Variable(init, name="w")
            self.bias = tf.Variable(tf.zeros([n_out]), name="bias")

    def __call__(self, x: tf.Tensor) -> tf.Tensor:
        *lead, n_in = x.shape
        y = tf.matmul(tf.reshape(x, [-1, n_in]), tf.cast(self.w, x.dtype)) + tf.cast(self.bias, x.dtype)
        return tf.reshape(y, [-1 if d is None else d for d in lead] + [y.shape[-1]])


class LayerNorm(tf.Module):
    """Layer normalisation over the last axis, computed in float32: ``[..., d] -> [..., d]`` (input dtype)."""

    def __init__(self, n_state: int, name: str, eps: float = 1e-5):
        super().__init__(name=name)
        self.eps = eps
        with self.name_scope:
            self.gain = tf.Variable(tf.ones([n_state]), name="gain")
            self.bias = tf.Variable(tf.zeros([n_state]), name="bias")

    def __call__(self, x: tf.Tensor) -> tf.Tensor:
        x32 = tf.cast(x, tf.float32)
        mean, var = tf.nn.moments(x32, axes=[-1], keepdims=True)
        y = (x32 - mean) * tf.math.rsqrt(var + self.eps) * self.gain + self.bias
        return tf.cast(y, x.dtype)


def block_modes(cfg: Config) -> list[list[tuple[str, int]]]:
    """Per block, its attention calls as ``(attn_mode, heads)``, applied to consecutive channel groups."""
    if cfg.attn_mode != "strided":
        return [[(cfg.attn_mode, cfg.n_head)]] * cfg.n_layer
    if cfg.strided_heads == "split":
        half = cfg.n_head // 2
        return [[("local", half), ("strided", half)]] * cfg.n_layer
    return [[("local" if i % 2 == 0 else "strided", cfg.n_head)] for i in range(cfg.n_layer)]


class Block(tf.Module):
    """One pre-norm residual block: ``[B, T, d] -> [B, T, d]``."""

    def __init__(self, cfg: Config, index: int, name: str):
        super().__init__(name=name)
        self.cfg, self.index = cfg, index
        self.modes = block_modes(cfg)[index]
        d, seed = cfg.n_state, cfg.seed * 1000 + 10 * (index + 1)
        std, resid = 0.125 / math.sqrt(d), 1.0 / math.sqrt(2 * cfg.n_layer)
        with self.name_scope:
            self.norm_a = LayerNorm(d, "norm_a")
            self.qkv = Linear(d, 3 * d, std, seed + 1, "qkv")
            self.proj = Linear(d, d, std * resid, seed + 2, "proj")
            self.norm_m = LayerNorm(d, "norm_m")
            self.fc = Linear(d, cfg.mlp_ratio * d, std, seed + 3, "fc")
            self.out = Linear(cfg.mlp_ratio * d, d, resid * 0.125 / math.sqrt(cfg.mlp_ratio * d), seed + 4, "out")

    def attention(self, q: tf.Tensor, k: tf.Tensor, v: tf.Tensor) -> tf.Tensor:
        """``[B, T, H*D] x3 -> [B, T, H*D]`` through bsattn; head groups of different modes use their channels."""
        cfg = self.cfg
        if cfg.attention == "memory_efficient":  # [B, T, H*D] <-> [B, H, T, D]
            q, k, v = (tf.transpose(tf.reshape(t, [-1, t.shape[1], cfg.n_head, cfg.d_head]), [0, 2, 1, 3])
                       for t in (q, k, v))  # fmt: skip
            out = memory_efficient_attention(q, k, v, causal=True)
            return tf.reshape(tf.transpose(out, [0, 2, 1, 3]), [-1, out.shape[2], cfg.n_state])
        impl = blocksparse_attention_impl if cfg.attention == "sparse" else attention_impl
        outputs, start = [], 0
        for mode, heads in self.modes:
            width = heads * cfg.d_head
            kwargs = {"blocksize": cfg.blocksize}
            if mode != "all":
                kwargs["local_attn_ctx"] = cfg.local_attn_ctx
            if mode == "fixed":
                kwargs.update(num_verts=cfg.num_verts, vertsize=cfg.vertsize)
            qg, kg, vg = (t[..., start : start + width] for t in (q, k, v)) if len(self.modes) > 1 else (q, k, v)
            strategy = context_shard(cfg)[2]
            if strategy is not None:
                kwargs["context_parallel"] = strategy
            outputs.append(impl(qg, kg, vg, heads, mode, **kwargs))
            start += width
        return outputs[0] if len(outputs) == 1 else tf.concat(outputs, axis=-1)

    def __call__(self, h: tf.Tensor, seed: tf.Tensor | None = None) -> tf.Tensor:
        """``seed`` int64 ``[2]`` turns dropout on (training); None turns it off."""
        site_seeds = (
            [None, None] if seed is None else [tf.random.experimental.stateless_fold_in(seed, i) for i in (0, 1)]
        )
        q, k, v = tf.split(self.qkv(self.norm_a(h)), 3, axis=-1)
        h = h + dropout(self.proj(self.attention(q, k, v)), self.cfg.resid_pdrop, site_seeds[0])
        m = self.out(gelu(self.fc(self.norm_m(h))))
        return h + dropout(m, self.cfg.resid_pdrop, site_seeds[1])


class CoLT5Block(tf.Module):
    """``--block=colt5``: ``h += dropout(routed_attention(h)); h += dropout(routed_ff(h))`` with bsattn.colt5's
    ``ConditionalRoutedAutoregressiveAttention`` (light: the previous window up to the token, on the fused op;
    heavy: routed queries per heavy window over keys routed from all earlier windows) and
    ``ConditionalRoutedFeedForward`` (light MLP 0.5 d on every token, heavy 4 d on the routed ones; its router
    picks ``colt5_heavy_ff_tokens`` in every window of ``colt5_light_window`` bytes). The pre-norms (RMSNorm /
    LayerNorm) live in the branches, as in CoLT5. ``[B, T, d] -> [B, T, d]``.

    Not strictly causal, as the original's design: which tokens of a window are routed (to the heavy queries,
    to the heavy MLP) is a top-k over the whole window, so it depends on later tokens of that window; the
    values themselves only see the past. ``colt5_heavy_tokens_q`` = the heavy window and
    ``colt5_heavy_ff_tokens`` = the light window route every token there: then the model is causal.

    Initialisation (seeded, as the rest of the model): kernels N(0, 0.125/sqrt(d_in)), the branches' output
    kernels further / sqrt(2 n_layer), biases 0, norm gains 1, routing tokens, null key/values and the null
    query token N(0, 1).
    """

    def __init__(self, cfg: Config, index: int, name: str):
        from bsattn import ConditionalRoutedAutoregressiveAttention, ConditionalRoutedFeedForward

        super().__init__(name=name)
        self.cfg = cfg
        d, policy = cfg.n_state, cfg.precision
        windows = -(-cfg.n_timesteps // cfg.colt5_light_window)
        with self.name_scope:
            self.attn = ConditionalRoutedAutoregressiveAttention(
                d, num_heavy_tokens_q=cfg.colt5_heavy_tokens_q, num_heavy_tokens_kv=cfg.colt5_heavy_tokens_kv,
                num_routed_kv=cfg.colt5_routed_kv, light_dim_head=cfg.d_head, light_heads=cfg.n_head,
                light_window_size=cfg.colt5_light_window, heavy_window_size=cfg.colt5_heavy_window or None,
                heavy_dim_head=cfg.d_head, heavy_heads=cfg.n_head, name=f"{name}_attn", dtype=policy,
            )  # fmt: skip
            # Routed per light window (route_block_size): a token's heavy MLP depends on its own window only.
            self.ff = ConditionalRoutedFeedForward(
                d, num_heavy_tokens=min(cfg.n_timesteps, cfg.colt5_heavy_ff_tokens * windows),
                router_kwargs={"route_block_size": cfg.colt5_light_window}, name=f"{name}_ff", dtype=policy,
            )  # fmt: skip
        seed, resid = cfg.seed * 1000 + 10 * (index + 1), 1.0 / math.sqrt(2 * cfg.n_layer)
        layer_vars = [*self.attn.weights, *self.ff.weights]
        for i, v in enumerate(layer_vars):
            leaf = v.path.rsplit("/", 1)[-1]
            shape = list(v.shape)
            if leaf in ("bias", "beta"):
                init = tf.zeros(shape)
            elif leaf in ("gamma",):
                init = tf.ones(shape)
            elif leaf == "kernel":
                std = 0.125 / math.sqrt(shape[0]) * (resid if "/to_out/" in v.path or "/proj_out/" in v.path else 1)
                init = _normal(shape, std, seed * 100 + i)
            else:  # routing_token, null_kv, null_q_token
                init = _normal(shape, 1.0, seed * 100 + i)
            v.assign(init)
        # The layers' tf.Variables, so that tf.Module (trainable_variables, the optimizer, n_params) sees them.
        self.layer_variables = [v.value for v in layer_vars]

    def __call__(self, h: tf.Tensor, seed: tf.Tensor | None = None) -> tf.Tensor:
        site_seeds = (
            [None, None] if seed is None else [tf.random.experimental.stateless_fold_in(seed, i) for i in (0, 1)]
        )
        h = h + dropout(tf.cast(self.attn(h), h.dtype), self.cfg.resid_pdrop, site_seeds[0])
        return h + dropout(tf.cast(self.ff(h), h.dtype), self.cfg.resid_pdrop, site_seeds[1])


class SparseTransformer(tf.Module):
    """Bytes ``[B, T]`` (int) -> next-byte logits ``[B, T, 256]`` (float32). ``T`` must be ``cfg.n_timesteps``."""

    def __init__(self, cfg: Config, name: str = "sparse_transformer"):
        super().__init__(name=name)
        cfg.validate()
        self.cfg = cfg
        self.compute_dtype = COMPUTE_DTYPES[cfg.precision]
        d, seed = cfg.n_state, cfg.seed * 1000
        with self.name_scope:
            self.embed = tf.Variable(_normal([N_VOCAB, d], 0.125 / math.sqrt(d), seed + 1), name="embed")
            if cfg.pos_embd == "factorized":
                width = max(1, min(cfg.local_attn_ctx, cfg.n_timesteps))
                self.pos_width = width
                rows = -(-cfg.n_timesteps // width)
                std = 0.125 / math.sqrt(2 * d)
                self.pos_row = tf.Variable(_normal([rows, d], std, seed + 2), name="pos_row")
                self.pos_col = tf.Variable(_normal([width, d], std, seed + 3), name="pos_col")
            else:
                self.pos = tf.Variable(_normal([cfg.n_timesteps, d], 0.125 / math.sqrt(d), seed + 2), name="pos")
            kind = CoLT5Block if cfg.block == "colt5" else Block
            self.blocks = [kind(cfg, i, name=f"block_{i}") for i in range(cfg.n_layer)]
            self.norm_f = LayerNorm(d, "norm_f")
            self.head = Linear(d, N_VOCAB, 0.0, seed + 4, "head")

    def positions(self) -> tf.Tensor:
        """Position embeddings float32 ``[T, d]``: ``row[t // w] + col[t % w]`` or one vector per position."""
        t = tf.range(self.cfg.n_timesteps)
        if self.cfg.pos_embd == "factorized":
            return tf.gather(self.pos_row, t // self.pos_width) + tf.gather(self.pos_col, t % self.pos_width)
        return self.pos

    def __call__(self, tokens: tf.Tensor, seed: tf.Tensor | None = None) -> tf.Tensor:
        """``seed`` int64 ``[2]``: training (dropout on, seeded); None: evaluation.

        Under context parallelism (``cfg.context_parallel = N > 1``, called inside ``strategy.run`` of ``N``
        replicas) ``tokens`` is this replica's shard ``[B, T/N]`` (tokens ``[r T/N, (r+1) T/N)``) and so are the
        logits; elsewhere (evaluation, sampling) the whole window."""
        cfg = self.cfg
        shard, n_shards, _ = context_shard(cfg)
        length = cfg.n_timesteps // n_shards
        if tokens.shape[-1] != length:
            expected = f"n_timesteps={cfg.n_timesteps}" + (f" / {n_shards} replicas" if n_shards > 1 else "")
            raise ValueError(f"the model runs on windows of {expected} bytes, got {tokens.shape}")
        h = tf.gather(self.embed, tokens) + self.positions()[shard * length : (shard + 1) * length]
        h = dropout(tf.cast(h, self.compute_dtype), cfg.embed_pdrop, self._fold(seed, 0))
        for i, block in enumerate(self.blocks):
            h = _recomputable_block(block, h, seed=self._fold(seed, i + 1), recompute=cfg.recompute)
        return tf.cast(self.head(self.norm_f(h)), tf.float32)

    @staticmethod
    def _fold(seed: tf.Tensor | None, data: int) -> tf.Tensor | None:
        return None if seed is None else tf.random.experimental.stateless_fold_in(seed, data)

    def n_params(self) -> int:
        return int(sum(v.shape.num_elements() for v in self.trainable_variables))


# Only ``h`` is differentiated through recompute_grad; the block (its variables are found when it runs) and the
# dropout seed (an integer tensor, captured, so the recomputed forward draws the same masks) are constants.
@recomputable
def _recomputable_block(block: Block, h: tf.Tensor, seed: tf.Tensor | None = None) -> tf.Tensor:
    return block(h, seed)


def context_shard(cfg: Config) -> tuple[int, int, tf.distribute.Strategy | None]:
    """``(shard, n_shards, strategy)`` of the calling replica when the sequence is split (``--context_parallel``
    > 1, inside ``strategy.run`` of that many replicas), else ``(0, 1, None)`` (evaluation, sampling, one device)."""
    ctx = tf.distribute.get_replica_context()
    if cfg.context_parallel == 1 or ctx is None or ctx.num_replicas_in_sync == 1:
        return 0, 1, None
    if ctx.num_replicas_in_sync != cfg.context_parallel:
        raise ValueError(
            f"--context_parallel={cfg.context_parallel} but the strategy has {ctx.num_replicas_in_sync} replicas"
        )
    from bsattn.context_parallel import replica_shard

    shard, n = replica_shard(ctx.strategy)
    return shard, n, ctx.strategy


def token_losses(logits: tf.Tensor, targets: tf.Tensor) -> tf.Tensor:
    """Cross-entropy in nats, float32 ``[B, T]``."""
    return tf.nn.sparse_softmax_cross_entropy_with_logits(labels=targets, logits=logits)
