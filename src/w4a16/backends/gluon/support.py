"""Which problems the Gluon kernels take: the one rule, read by the backend's ``supports`` and the
launchers' checks, and tested against the C library's rule (``capi.loader.gluon_applies``, the
Python mirror of its ``gluon_class``, accepts a subset: tests/capi/test_gluon_rule.py)."""
from __future__ import annotations

from typing import Optional

import torch

MAX_DECODE_M = 64      # the decode kernel's token tiles end at 64; the prefill kernel takes M above
PREFILL_MIN_M = MAX_DECODE_M + 1
GROUPS = (32, 64, 128, 256)


def problem_reason(M: int, N: int, K: int, group: int, dtype: torch.dtype) -> Optional[str]:
    """None when a Gluon kernel computes this problem (M rows of x [M, K], an [N, K] weight of
    effective group size ``group`` (K for per-channel), activations of ``dtype``), else why not.
    Zero points of any kind are taken."""
    if M < 1:
        return f"M = {M}"
    if dtype not in (torch.float16, torch.bfloat16):
        return f"dtype {dtype} is not fp16/bf16"
    if N < 1 or K < 2 or K % 2:
        return f"bad shape N = {N}, K = {K}"
    if K % 8:
        return f"K = {K}: x's rows must be a multiple of 16 bytes for TMA (K % 8 == 0)"
    if group not in GROUPS and group != K:
        return f"group size {group}: the Gluon kernels take 32, 64, 128, 256 or per-channel"
    if K % group:
        return f"K = {K} is not a multiple of the group size {group}"
    if M > MAX_DECODE_M and M * N >= 2 ** 31:
        return f"M * N = {M * N}: the Gluon prefill kernel uses 32-bit output offsets"
    return None


def x_reason(x: torch.Tensor, K: int) -> Optional[str]:
    """None when ``x`` can feed the kernels' TMA descriptor directly, else why not."""
    if not x.is_cuda:
        return "x is not a CUDA tensor"
    if torch.cuda.get_device_capability(x.device)[0] != 9:
        return "not an sm_90 GPU"
    if x.data_ptr() % 16:
        return "x's data pointer is not 16-byte aligned (TMA)"
    if x.dim() != 2 or x.stride(1) != 1 or x.stride(0) != K:
        return "x is not a contiguous [M, K] matrix"
    return None


def call_reason(M: int, N: int, K: int, group: int, dtype: torch.dtype, x: Optional[torch.Tensor] = None,
                kernel: str = "any") -> Optional[str]:
    """:func:`problem_reason`, then :func:`x_reason` for a given ``x``, and for ``kernel``
    "decode" (M <= 64) or "prefill" (M > 64) the kernel's range of M."""
    if kernel == "decode" and not 1 <= M <= MAX_DECODE_M:
        return f"M = {M} outside 1..{MAX_DECODE_M} (the decode kernel)"
    if kernel == "prefill" and M < PREFILL_MIN_M:
        return f"M = {M} < {PREFILL_MIN_M}: the decode kernel's range"
    return problem_reason(M, N, K, group, dtype) or (x_reason(x, K) if x is not None else None)
