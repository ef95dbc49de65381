"""CoLT5 conditional routing: lucidrains' CoLT5-attention in TensorFlow.

Coordinate-descent soft top-k (``coor_descent``, ``topk``), the ``CoordinateDescentRouter`` with ``route_back``,
and Keras 3 layers: ``ConditionalRoutedFeedForward``, ``ConditionalRoutedAttention``,
``ConditionalRoutedAutoregressiveAttention``, ``ConditionalRoutedCrossAttention``,
``ConditionalRoutedImageAttention``, ``ConditionalRoutedTransformerBlock``, ``ConditionalRoutedViT``. The light
branches run on bsattn's fused attention op. Every public name is also exported from ``bsattn``; where this
differs from the original is listed in the README's CoLT5 section.
"""

from bsattn._lazy import lazy_exports

EXPORTS = {
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

__all__, __getattr__, __dir__ = lazy_exports("bsattn.colt5", EXPORTS)
