"""Mixture-of-experts layers with int4 expert weights: QuantizedExperts (the stacked weights),
grouped_gemm and fused_moe (the ops), W4A16Experts (the module that replaces a transformers
model's experts) and the routing helpers."""
from .module import W4A16Experts, quantize_experts, with_dequantized_experts
from .ops import fused_moe, grouped_gemm
from .routing import Routing, align
from .weights import QuantizedExperts

__all__ = ["QuantizedExperts", "grouped_gemm", "fused_moe", "W4A16Experts", "quantize_experts", "with_dequantized_experts",
           "Routing", "align"]
