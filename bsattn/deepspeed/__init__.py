"""DeepSpeed Sparse Attention on bsattn's fused op.

- ``bsattn.deepspeed.sparsity_config``: the six sparsity configs (NumPy only), the JSON factory, serialisation;
- ``bsattn.deepspeed.layers``: the Keras layers (``SparseSelfAttention``, ``BertSparseSelfAttention``,
  ``SparseMultiHeadAttention``, ``SparseGroupedQueryAttention``) and the functional ``deepspeed_sparse_attention``;
- ``bsattn.deepspeed.bert_utils``: padding, position-embedding extension and model attention replacement.

Every public name is also exported from ``bsattn``. Submodules load on first access (the configs need no TF).
"""
