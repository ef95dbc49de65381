"""bsattn: block-sparse attention for TensorFlow 2 (OpenAI blocksparse / sparse_attention, revived).

Layout: the shared engine sits at the top (``patterns`` -> ``tables`` / ``fused_tables`` -> op wrappers
``blocksparse_ops`` / ``fused_attention`` -> ``reference``, ``recompute``), with OpenAI's functions beside it
(``sparse_attention``, ``transformer``), and KV-cache decoding over them (``decoding``); each further family has a subpackage: ``bsattn.deepspeed``,
``bsattn.memory_efficient``, ``bsattn.colt5``.

``bsattn.patterns``, ``bsattn.tables``, ``bsattn.fused_tables``, ``bsattn.deepspeed.sparsity_config`` and
``bsattn.reference`` are NumPy only; the rest needs TensorFlow and is imported on first access (so the NumPy parts also work where
TensorFlow is absent, e.g. in the GPU device harness). The op library itself loads on the first op call.
"""

from bsattn import colt5, memory_efficient
from bsattn._lazy import lazy_exports

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
    "decode_attention": "bsattn.decoding",
    "decode_tables": "bsattn.decoding",
    "blocksparse_decode_impl": "bsattn.decoding",
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
    **memory_efficient.EXPORTS,
    **colt5.EXPORTS,
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
    "decoding",
    "context_parallel",
    "deepspeed",
    "memory_efficient",
    "colt5",
)

__all__, __getattr__, __dir__ = lazy_exports("bsattn", _EXPORTS, _SUBMODULES)
