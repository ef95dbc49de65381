"""Memory-efficient exact attention: lucidrains' memory-efficient-attention-pytorch in TensorFlow.

Functions on ``[b, h, n, d]`` tensors (``bsattn.memory_efficient.functions``, ``.dense``):
``attention`` (dense reference), ``memory_efficient_attention``, ``flash_attention``,
``numerically_unstable_memory_efficient_attention``; Keras 3 layers (``.layers``): ``MemoryEfficientAttention``,
``FlashAttention``, ``CosineSimAttention``. Engines: the fused op (``.fused_engine``, default) and the pure-TF
chunked engine (``.chunked``, used under XLA). Every public name is also exported from ``bsattn``.
"""

from bsattn._lazy import lazy_exports

EXPORTS = {
    "attention": "bsattn.memory_efficient.dense",
    "memory_efficient_attention": "bsattn.memory_efficient.functions",
    "flash_attention": "bsattn.memory_efficient.functions",
    "numerically_unstable_memory_efficient_attention": "bsattn.memory_efficient.functions",
    "MemoryEfficientAttention": "bsattn.memory_efficient.layers",
    "FlashAttention": "bsattn.memory_efficient.layers",
    "CosineSimAttention": "bsattn.memory_efficient.layers",
}

__all__, __getattr__, __dir__ = lazy_exports("bsattn.memory_efficient", EXPORTS)
