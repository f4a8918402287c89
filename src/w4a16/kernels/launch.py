"""Host side of the GEMM kernel: grid, split-K, workspace, launch on torch's current stream."""
from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

from ..config import GemmConfig
from ..errors import expect
from .gemm import w4a16_gemm_kernel
from .layout import PreparedWeight
from .reduce import splitk_reduce_kernel

TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}
REDUCE_BLOCK = 1024
INT32_LIMIT = 2**31


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def effective_block_m(cfg: GemmConfig, M: int) -> int:
    """The config's block_m, lowered to the smallest power of two >= M (at least 16)."""
    return max(16, min(cfg.block_m, triton.next_power_of_2(max(M, 1))))


def group_log2(pw: PreparedWeight) -> int:
    """log2 of the group size, or -1 for per-channel weights (one group over all of K)."""
    return -1 if pw.group == pw.K else pw.group.bit_length() - 1


def split_plan(cfg: GemmConfig, chunks: int) -> tuple:
    """(splits, chunks_per_split) for a K of ``chunks`` layout chunks: no split is left empty."""
    if cfg.kind == "tile" or chunks <= 1:
        return 1, chunks
    per = triton.cdiv(chunks, min(cfg.split_k, chunks))
    return triton.cdiv(chunks, per), per


def launch_gemm(x: torch.Tensor, pw: PreparedWeight, bias: Optional[torch.Tensor], alpha: float,
                cfg: GemmConfig, deterministic: bool = True, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """y [M, N] = alpha * x @ W^T + bias (see :func:`launch_gemm_compiled`)."""
    return launch_gemm_compiled(x, pw, bias, alpha, cfg, deterministic, out)[0]


def launch_gemm_compiled(x: torch.Tensor, pw: PreparedWeight, bias: Optional[torch.Tensor], alpha: float,
                         cfg: GemmConfig, deterministic: bool = True,
                         out: Optional[torch.Tensor] = None) -> tuple:
    """y = alpha * x @ W^T + bias.

    x: [M, K] contiguous, pw.dtype; bias: None or [N]; out: None or a contiguous [M, N] tensor of
    x's dtype to write into (tests poison it first). Returns y [M, N] in x's dtype.
    Workspace (split-K partial sums, fp32) comes from torch's caching allocator; everything is
    launched on torch's current stream, so the call can be captured in a CUDA graph.
    """
    M = x.shape[0]
    N = pw.N
    y = torch.empty((M, N), dtype=x.dtype, device=x.device) if out is None else out
    if M == 0:
        return y, None
    expect(N * pw.K_pad // 2 < INT32_LIMIT, "w.shape", "N * K / 2 < 2**31 bytes of codes", (N, pw.K))
    rows = (INT32_LIMIT - 1) // max(N, pw.K)
    if M > rows:
        # The kernel indexes x and y with 32-bit offsets: run row blocks that stay below 2**31.
        compiled = None
        for m0 in range(0, M, rows):
            _, compiled = launch_gemm_compiled(x[m0:m0 + rows], pw, bias, alpha, cfg, deterministic,
                                               y[m0:m0 + rows])
        return y, compiled
    chunks = pw.K_pad // pw.kc
    splits, per = split_plan(cfg, chunks)
    atomic = splits > 1 and not deterministic
    if splits == 1:
        part = y
    elif atomic:
        part = torch.zeros((M, N), dtype=torch.float32, device=x.device)
    else:
        part = torch.empty((splits, M, N), dtype=torch.float32, device=x.device)
    bm = effective_block_m(cfg, M)
    grid = (triton.cdiv(M, bm) * triton.cdiv(N, cfg.block_n), splits)
    dtype = TL_DTYPES[x.dtype]
    zeros = pw.zeros_t if pw.zeros_t is not None else pw.scales_t
    bias_arg = bias if bias is not None else pw.scales_t
    compiled = w4a16_gemm_kernel[grid](
        x, pw.qk, pw.scales_t, zeros, bias_arg, y, part,
        M, N, pw.K, chunks, per, float(alpha),
        GROUP_LOG2=group_log2(pw), KC=pw.kc, ONE_SCALE=pw.group == pw.K or pw.group % pw.kc == 0,
        EVEN_K=pw.K % pw.kc == 0, BM=bm, BN=cfg.block_n, EPILOGUE=splits == 1, GROUP_M=cfg.group_m,
        SWAP_AB=cfg.swap_ab, UNROLL=cfg.unroll, PREFETCH=cfg.prefetch,
        HAS_ZEROS=pw.zeros_t is not None, HAS_BIAS=bias is not None, ATOMIC=atomic,
        USE_ASM=cfg.dequant == "magic" and not interpreting(), DTYPE=dtype,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    if splits > 1:
        splitk_reduce_kernel[(triton.cdiv(M * N, REDUCE_BLOCK),)](
            part, bias_arg, y, M, N, float(alpha), 1 if atomic else splits,
            HAS_BIAS=bias is not None, BLOCK=REDUCE_BLOCK, DTYPE=dtype,
            num_warps=4,
        )
    return y, compiled
