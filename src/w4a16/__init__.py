"""w4a16: fp16/bf16 activations x int4 weights (W4A16) GEMM for NVIDIA Hopper, in Triton.

    y = alpha * (x @ dequant(w)^T) + bias,   W[n, k] = (q[n, k] - z[n, k // g]) * s[n, k // g]
"""
from . import backends, formats, reference
from .errors import BackendRefused, W4A16Error
from .hf import load_pretrained_quantized
from .io import load, save
from .model import quantize_model
from .nn import W4A16Linear
from .config import GemmConfig, config_names
from .introspect import kernel_info
from .ops import choose, describe_path, gemm, prepare
from .reference import quantize
from .tune import tune
from .weight import QuantizedWeight

__version__ = "0.1.0"

__all__ = [
    "BackendRefused",
    "GemmConfig",
    "backends",
    "choose",
    "config_names",
    "describe_path",
    "QuantizedWeight",
    "W4A16Linear",
    "W4A16Error",
    "formats",
    "gemm",
    "kernel_info",
    "load",
    "load_pretrained_quantized",
    "prepare",
    "quantize",
    "quantize_model",
    "reference",
    "save",
    "tune",
]
