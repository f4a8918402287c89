"""The quantization contract shared by every part of the package.

    W[n, k] = (q[n, k] - z[n, k // g]) * s[n, k // g]       # [N, K]
    y       = alpha * (x @ W^T) + bias                      # x [M, K] -> y [M, N]

q is a 4-bit code in 0..15; symmetric weights use z = 8; g is the group size along K
(-1 means one group spanning all of K). x, scales, zeros, bias and y share one dtype
(fp16 or bf16); accumulation, alpha and bias are applied in fp32.
"""
from __future__ import annotations

import numbers

import torch

from .errors import expect

SUPPORTED_GROUP_SIZES = (32, 64, 128, 256, -1)
ACTIVATION_DTYPES = (torch.float16, torch.bfloat16)
SYMMETRIC_ZERO = 8
CODE_MAX = 15


def dtype_name(dtype: torch.dtype) -> str:
    """'fp16' / 'bf16' / str(dtype) for messages and tables."""
    return {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}.get(dtype, str(dtype))


def is_int(v) -> bool:
    """True for a Python or NumPy integer, False for bool, float and anything else."""
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def check_group_size(group_size: int, K: int, arg: str = "group_size") -> int:
    """Validate ``group_size`` (an int, not a bool or float) against K >= 1 and return the
    effective group size (K for -1)."""
    expect(is_int(group_size), arg, f"an int, one of {SUPPORTED_GROUP_SIZES}",
           f"{group_size!r} ({type(group_size).__name__})")
    expect(int(group_size) in SUPPORTED_GROUP_SIZES, arg, f"one of {SUPPORTED_GROUP_SIZES}", group_size)
    expect(K >= 1, "K", "at least 1 (a weight with no input features cannot be quantized)", K)
    g = K if group_size == -1 else int(group_size)
    expect(K % g == 0, "K", f"a multiple of the group size {g}", K)
    return g


def check_activation_dtype(dtype: torch.dtype, arg: str) -> None:
    expect(dtype in ACTIVATION_DTYPES, f"{arg}.dtype", "torch.float16 or torch.bfloat16", dtype)
