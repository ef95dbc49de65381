"""bsattn: block-sparse attention for TensorFlow 2 (OpenAI blocksparse / sparse_attention, revived).

Layout: the shared engine sits at the top (``patterns`` -> ``tables`` / ``fused_tables`` -> op wrappers
``blocksparse_ops`` / ``fused_attention`` -> ``reference``, ``recompute``), with OpenAI's functions beside it
(``sparse_attention``, ``transformer``); each further family has a subpackage: ``bsattn.deepspeed``,
``bsattn.memory_efficient``, ``bsattn.colt5``.

``bsattn.patterns``, ``bsattn.tables``, ``bsattn.fused_tables``, ``bsattn.deepspeed.sparsity_config`` and
``bsattn.reference`` are NumPy only; the rest needs TensorFlow and is imported on first access (so the NumPy parts also work where
TensorFlow is absent, e.g. in the GPU device harness). The op library itself loads on the first op call.
"""

import importlib

__version__ = "0.1.0"

# Public name -> module that defines it.
_EXPORTS = {
    "BlocksparseTransformer": "bsattn.transformer",
    "attention_impl": "bsattn.sparse_attention",
    "blocksparse_attention_impl": "bsattn.sparse_attention",
    "get_attn_mask": "bsattn.sparse_attention",
    "get_blocksparse_obj": "bsattn.sparse_attention",
    "merge_heads": "bsattn.sparse_attention",
    "merge_states": "bsattn.sparse_attention",
    "shape_list": "bsattn.sparse_attention",
    "split_heads": "bsattn.sparse_attention",
    "split_states": "bsattn.sparse_attention",
    "strided_transpose": "bsattn.sparse_attention",
    "recomputable": "bsattn.recompute",
    "context_parallel_attention": "bsattn.context_parallel",
    "context_parallel_plan": "bsattn.context_parallel",
    "SparsityConfig": "bsattn.deepspeed.sparsity_config",
    "DenseSparsityConfig": "bsattn.deepspeed.sparsity_config",
    "FixedSparsityConfig": "bsattn.deepspeed.sparsity_config",
    "VariableSparsityConfig": "bsattn.deepspeed.sparsity_config",
    "BigBirdSparsityConfig": "bsattn.deepspeed.sparsity_config",
    "BSLongformerSparsityConfig": "bsattn.deepspeed.sparsity_config",
    "LocalSlidingWindowSparsityConfig": "bsattn.deepspeed.sparsity_config",
    "sparsity_config_from_json": "bsattn.deepspeed.sparsity_config",
    "SparseSelfAttention": "bsattn.deepspeed.layers",
    "BertSparseSelfAttention": "bsattn.deepspeed.layers",
    "SparseMultiHeadAttention": "bsattn.deepspeed.layers",
    "SparseGroupedQueryAttention": "bsattn.deepspeed.layers",
    "deepspeed_sparse_attention": "bsattn.deepspeed.layers",
    "attention": "bsattn.memory_efficient.dense",
    "memory_efficient_attention": "bsattn.memory_efficient.functions",
    "flash_attention": "bsattn.memory_efficient.functions",
    "numerically_unstable_memory_efficient_attention": "bsattn.memory_efficient.functions",
    "MemoryEfficientAttention": "bsattn.memory_efficient.layers",
    "FlashAttention": "bsattn.memory_efficient.layers",
    "CosineSimAttention": "bsattn.memory_efficient.layers",
    "coor_descent": "bsattn.colt5.coor_descent",
    "topk": "bsattn.colt5.topk",
    "TopkReturn": "bsattn.colt5.topk",
    "CoordinateDescentRouter": "bsattn.colt5.router",
    "RouterReturn": "bsattn.colt5.router",
    "route_back": "bsattn.colt5.router",
    "ConditionalRoutedFeedForward": "bsattn.colt5.layers",
    "ConditionalRoutedAttention": "bsattn.colt5.layers",
    "ConditionalRoutedAutoregressiveAttention": "bsattn.colt5.layers",
    "ConditionalRoutedCrossAttention": "bsattn.colt5.layers",
    "ConditionalRoutedImageAttention": "bsattn.colt5.layers",
    "ConditionalRoutedTransformerBlock": "bsattn.colt5.layers",
    "ConditionalRoutedViT": "bsattn.colt5.vit",
}
_SUBMODULES = (
    "patterns",
    "tables",
    "fused_tables",
    "reference",
    "blocksparse_ops",
    "fused_attention",
    "sparse_attention",
    "transformer",
    "recompute",
    "context_parallel",
    "deepspeed",
    "memory_efficient",
    "colt5",
)

__all__ = sorted(_EXPORTS) + list(_SUBMODULES)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f"bsattn.{name}")
    else:
        raise AttributeError(f"module 'bsattn' has no attribute {name!r}")
    globals()[name] = value  # cache: later lookups skip __getattr__
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
