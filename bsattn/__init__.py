"""bsattn: block-sparse attention for TensorFlow 2 (OpenAI blocksparse / sparse_attention, revived).

The op library is loaded on first use of an op, not at import.
"""

from bsattn import patterns, reference, tables
from bsattn.recompute import recomputable
from bsattn.sparse_attention import (
    attention_impl,
    blocksparse_attention_impl,
    get_attn_mask,
    get_blocksparse_obj,
    merge_heads,
    merge_states,
    shape_list,
    split_heads,
    split_states,
    strided_transpose,
)
from bsattn.transformer import BlocksparseTransformer

__version__ = "0.1.0"

__all__ = [
    "BlocksparseTransformer",
    "attention_impl",
    "blocksparse_attention_impl",
    "get_attn_mask",
    "get_blocksparse_obj",
    "merge_heads",
    "merge_states",
    "patterns",
    "recomputable",
    "reference",
    "shape_list",
    "split_heads",
    "split_states",
    "strided_transpose",
    "tables",
]
