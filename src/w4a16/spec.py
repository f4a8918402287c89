"""The quantization contract shared by every part of the package.

    W[n, k] = (q[n, k] - z[n, k // g]) * s[n, k // g]       # [N, K]
    y       = alpha * (x @ W^T) + bias                      # x [M, K] -> y [M, N]

q is a 4-bit code in 0..15; symmetric weights use z = 8; g is the group size along K
(-1 means one group spanning all of K). x, scales, zeros, bias and y share one dtype
(fp16 or bf16); accumulation, alpha and bias are applied in fp32.
"""
from __future__ import annotations

import torch

from .errors import expect

SUPPORTED_GROUP_SIZES = (32, 64, 128, 256, -1)
ACTIVATION_DTYPES = (torch.float16, torch.bfloat16)
SYMMETRIC_ZERO = 8
CODE_MAX = 15


def dtype_name(dtype: torch.dtype) -> str:
    """'fp16' / 'bf16' / str(dtype) for messages and tables."""
    return {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}.get(dtype, str(dtype))


def check_group_size(group_size: int, K: int, arg: str = "group_size") -> int:
    """Validate ``group_size`` against K and return the effective group size (K for -1)."""
    expect(group_size in SUPPORTED_GROUP_SIZES, arg, f"one of {SUPPORTED_GROUP_SIZES}", group_size)
    g = K if group_size == -1 else group_size
    expect(K % g == 0, "K", f"a multiple of the group size {g}", K)
    return g


def check_activation_dtype(dtype: torch.dtype, arg: str) -> None:
    expect(dtype in ACTIVATION_DTYPES, f"{arg}.dtype", "torch.float16 or torch.bfloat16", dtype)
