"""An RMSNorm of rows in one launch (one program per row), where torch's operations run about seven
kernels (the cast, the square, the mean, the add, rsqrt, two products), each a launch and host
time: ``w4a16.gemm``'s eager calls on a GPU run it for the norms they compute beside a kernel that
lacks them (the "residual_rmsnorm" epilogue's norm after the residual epilogue, an input norm
before the GEMM).

Per row of h [M, N]: r = 1 / sqrt(mean(h^2) + eps) in fp32, u = h * r rounded to h's dtype, and
y = weight * u rounded to it: the roundings of ``w4a16.epilogue.rms_norm``; the mean's summation
order and the reciprocal square root differ from torch's within fp32 rounding.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .fast_launch import CachedLaunch

MAX_BLOCK = 4096   # columns a program reads per step


@triton.jit
def rms_norm_kernel(h_ptr, w_ptr, y_ptr, N, eps, BLOCK: tl.constexpr):
    """h, y [M, N] contiguous (fp16/bf16), w [N] in their dtype; one program per row, BLOCK columns
    a step: the squares summed over the row, then the row normalized (module docstring)."""
    row = tl.program_id(0).to(tl.int64) * N
    cols = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], tl.float32)
    for n0 in range(0, N, BLOCK):
        c = n0 + cols
        h = tl.load(h_ptr + row + c, mask=c < N, other=0.0).to(tl.float32)
        acc += h * h
    r = 1.0 / tl.sqrt_rn(tl.sum(acc, 0) / N + eps)
    for n0 in range(0, N, BLOCK):
        c = n0 + cols
        ok = c < N
        h = tl.load(h_ptr + row + c, mask=ok, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + c, mask=ok, other=0.0).to(tl.float32)
        u = (h * r).to(y_ptr.dtype.element_ty).to(tl.float32)
        tl.store(y_ptr + row + c, (w * u).to(y_ptr.dtype.element_ty), mask=ok)


_LAUNCH = CachedLaunch(rms_norm_kernel)


def launch_shape(N: int) -> tuple:
    """(BLOCK, num_warps) of the launch for rows of N elements (what the offline compile builds too)."""
    block = min(MAX_BLOCK, max(16, 1 << (N - 1).bit_length()))
    return block, 8 if block >= 2048 else 4


def rms_norm_rows(h: torch.Tensor, weight: torch.Tensor, eps: float, out=None) -> torch.Tensor:
    """y [M, N] = the RMSNorm of h [M, N] (contiguous, fp16/bf16) with ``weight`` [N] (h's dtype,
    contiguous) and ``eps``, into ``out`` (contiguous, h's shape and dtype) when given; the caller
    checks the arguments."""
    M, N = h.shape
    y = out if out is not None else torch.empty_like(h)
    if M and N:
        block, warps = launch_shape(N)
        _LAUNCH((M,), (h, weight, y, N, float(eps)), dict(BLOCK=block), warps, 1)
    return y
