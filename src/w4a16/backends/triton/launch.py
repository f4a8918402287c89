"""Host side of the GEMM kernel: grid, split-K, workspace, launch on torch's current stream."""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import triton.language as tl

from ...config import GemmConfig
from ...epilogue import code_of, out_shape
from ...errors import expect
from ..device import capability_major, index_of
from .env import interpreting
from .fast_launch import CachedLaunch, arg_key
from .gemm import w4a16_gemm_kernel
from ..workspace import plans_of, tile_counters
from .layout import PreparedWeight, widen_scales
from .reduce import splitk_reduce_kernel

TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}
REDUCE_BLOCK = 1024
_GEMM = CachedLaunch(w4a16_gemm_kernel)
_REDUCE = CachedLaunch(splitk_reduce_kernel)
INT32_LIMIT = 2**31


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def effective_block_m(cfg: GemmConfig, M: int) -> int:
    """The config's block_m, lowered to the smallest power of two >= M (at least 16)."""
    return max(16, min(cfg.block_m, 1 << (max(M, 1) - 1).bit_length()))


def group_log2(pw: PreparedWeight) -> int:
    """log2 of the group size, or -1 for per-channel weights (one group over all of K)."""
    return -1 if pw.group == pw.K else pw.group.bit_length() - 1


def split_plan(cfg: GemmConfig, chunks: int) -> tuple:
    """(splits, chunks_per_split) for a K of ``chunks`` layout chunks: no split is left empty."""
    if cfg.kind == "tile" or chunks <= 1:
        return 1, chunks
    per = _cdiv(chunks, min(cfg.split_k, chunks))
    return _cdiv(chunks, per), per


def uses_wgmma(device: torch.device) -> bool:
    """Whether kernels launched on ``device`` compile to Hopper's wgmma (a CUDA device of compute
    capability 9.x, not Triton's CPU interpreter)."""
    return device.type == "cuda" and not interpreting() and capability_major(index_of(device)) == 9


class LaunchPlan(NamedTuple):
    """One launch of the GEMM kernel, resolved (:func:`launch_plan`)."""

    grid: tuple
    splits: int
    chunks_per_split: int
    atomic: bool
    constexprs: dict
    static: tuple          # everything the compiled kernel depends on but the per-call tensors' alignment
    cx: tuple              # the constexpr values in signature order
    cfg: GemmConfig        # the config launched: the caller's, or on Hopper GemmConfig.for_wgmma's twin


def launch_plan(pw: PreparedWeight, M: int, cfg: GemmConfig, has_bias: bool, atomic_ok: bool,
                dtype: torch.dtype, epilogue: Optional[str] = None, input_norm: bool = False) -> LaunchPlan:
    """The :class:`LaunchPlan` of one launch, cached per prepared weight. Its static key covers
    everything the compiled kernel depends on except the alignment of the per-call tensors (x, y,
    workspace, bias, residual). Atomic split-K (finished by the reduce kernel) is used for the plain
    epilogue only. input_norm: x is read RMS-normalized (the kernel's PRO)."""
    key = (M, cfg, has_bias, atomic_ok, dtype, epilogue, input_norm)
    plans = plans_of(pw)
    plan = plans.get(key)
    if plan is not None:
        return plan
    if uses_wgmma(pw.qk.device):
        cfg = cfg.for_wgmma()
    chunks = pw.K_pad // pw.kc
    splits, per = split_plan(cfg, chunks)
    atomic = splits > 1 and atomic_ok and epilogue is None
    bm = effective_block_m(cfg, M)
    grid = (_cdiv(M, bm) * _cdiv(pw.N, cfg.block_n), splits)
    constexprs = dict(
        GROUP_LOG2=group_log2(pw), KC=pw.kc, ONE_SCALE=pw.group == pw.K or pw.group % pw.kc == 0,
        EVEN_K=pw.K % pw.kc == 0, BM=bm, BN=cfg.block_n, EPILOGUE=splits == 1, GROUP_M=cfg.group_m,
        SWAP_AB=cfg.swap_ab, UNROLL=cfg.unroll, PREFETCH=cfg.prefetch, SCALE_AFTER=cfg.scale_after,
        HAS_ZEROS=pw.zeros_t is not None, HAS_BIAS=has_bias, ATOMIC=atomic,
        USE_ASM=cfg.dequant == "magic" and not interpreting(), DTYPE=TL_DTYPES[dtype], EPI=code_of(epilogue),
        PRO=bool(input_norm))
    cx = tuple(constexprs.values())
    zeros = pw.zeros_t if pw.zeros_t is not None else pw.scales_t
    static = (cx, cfg.num_warps, cfg.num_stages, dtype, has_bias, arg_key(pw.qk), arg_key(pw.scales_t),
              arg_key(zeros), tuple(arg_key(v) for v in (M, pw.N, pw.K, chunks, per, pw.qk.shape[0])))
    plan = plans[key] = LaunchPlan(grid, splits, per, atomic, constexprs, static, cx, cfg)
    return plan


def launch_gemm(x: torch.Tensor, pw: PreparedWeight, bias: Optional[torch.Tensor], alpha: float,
                cfg: GemmConfig, deterministic: bool = True, out: Optional[torch.Tensor] = None,
                epilogue: Optional[str] = None, residual: Optional[torch.Tensor] = None, norm=None,
                input_norm=None) -> torch.Tensor:
    """y [M, N] = alpha * x @ W^T + bias, then the epilogue (see :func:`launch_gemm_compiled`)."""
    return launch_gemm_compiled(x, pw, bias, alpha, cfg, deterministic, out, epilogue, residual, norm, input_norm)[0]


def row_limit(pw: PreparedWeight, M: int, cfg: GemmConfig) -> int:
    """The most rows of x one launch takes: the kernel indexes x, y and the split-K partials with
    32-bit offsets, so larger M runs in row blocks that stay below 2**31."""
    expect(pw.N * pw.K_pad // 2 < INT32_LIMIT, "w.shape", "N * K / 2 < 2**31 bytes of codes", (pw.N, pw.K))
    rows = (INT32_LIMIT - 1) // max(pw.N, pw.K)
    if cfg.kind == "splitk" and M * pw.N * cfg.split_k >= INT32_LIMIT:  # (cfg.split_k bounds the splits)
        rows = (INT32_LIMIT - 1) // max(pw.N * split_plan(cfg, pw.K_pad // pw.kc)[0], pw.K)
    return rows


def launch_gemm_compiled(x: torch.Tensor, pw: PreparedWeight, bias: Optional[torch.Tensor], alpha: float,
                         cfg: GemmConfig, deterministic: bool = True,
                         out: Optional[torch.Tensor] = None, epilogue: Optional[str] = None,
                         residual: Optional[torch.Tensor] = None, norm=None, input_norm=None) -> tuple:
    """y = alpha * x @ W^T + bias, then the epilogue -> (y, the compiled kernel or None).

    x: [M, K] contiguous, fp16/bf16; bias: None or [N]; epilogue: None, "silu_mul", "residual" or
    "residual_rmsnorm" (``w4a16.epilogue``); residual: [M, N] contiguous in x's dtype with the last
    two; norm: a ``w4a16.epilogue.Norm`` with "residual_rmsnorm"; input_norm: None or the Norm x is
    normalized with (weight [K]) as the kernel reads it; out: None or a contiguous tensor of
    y's shape and x's dtype to write into (tests poison it first). Returns y [M, N] ([M, N / 2]
    with "silu_mul", [2, M, N] with "residual_rmsnorm") in x's dtype.
    Workspace (split-K partial sums, fp32) comes from torch's caching allocator, the split-K tile
    counters from :func:`tile_counters`; everything is launched on torch's current stream, so the
    call can be captured in a CUDA graph.
    """
    M = x.shape[0]
    if M == 0:
        return (torch.empty(out_shape(0, pw.N, epilogue), dtype=x.dtype, device=x.device) if out is None else out), None
    rows = row_limit(pw, M, cfg)
    if M > rows:
        y = torch.empty(out_shape(M, pw.N, epilogue), dtype=x.dtype, device=x.device) if out is None else out
        compiled = None
        for m0 in range(0, M, rows):
            res = None if residual is None else residual[m0:m0 + rows]
            # with the norm, y [2, M, N]: a row block's h and n are not one contiguous slice
            part = y[:, m0:m0 + rows] if epilogue == "residual_rmsnorm" else y[m0:m0 + rows]
            block, compiled = launch_gemm_compiled(x[m0:m0 + rows], pw, bias, alpha, cfg, deterministic,
                                                   None if epilogue == "residual_rmsnorm" else part, epilogue, res, norm,
                                                   input_norm)
            if epilogue == "residual_rmsnorm":
                part.copy_(block)
        return y, compiled
    bound = BoundGemm(pw, M, x.dtype, bias is not None, alpha, cfg, deterministic, epilogue, input_norm is not None)
    return bound.launch(x, bias, residual, out, norm, input_norm)


def bind_gemm(pw: PreparedWeight, M: int, dtype: torch.dtype, has_bias: bool, alpha: float, cfg: GemmConfig,
              deterministic: bool = True, epilogue: Optional[str] = None, input_norm: bool = False):
    """A callable ``run(x [M, K] contiguous, bias, residual=None, norm=None, input_norm=None) -> y`` for
    repeated calls of one shape (with ``input_norm`` each call passes its Norm): everything that
    does not change between such calls is computed here, once."""
    if M == 0 or M > row_limit(pw, M, cfg) or (cfg.wide_scales and pw.scales_t.dtype != torch.float32):
        # Row blocks, or fp32 scales made per call: a bound launch would keep an fp32 copy of the
        # scales alive with the weight (prefill calls are long: the per-call copy costs little).
        return lambda x, bias, residual=None, norm=None, input_norm=None: launch_gemm(
            x, pw, bias, alpha, cfg, deterministic, None, epilogue, residual, norm, input_norm)
    bound = BoundGemm(pw, M, dtype, has_bias, alpha, cfg, deterministic, epilogue, input_norm)
    return lambda x, bias, residual=None, norm=None, input_norm=None: bound.launch(x, bias, residual, None, norm,
                                                                                   input_norm)[0]


class BoundGemm:
    """One launch shape of the kernel with its plan resolved: per call only the output and the
    split-K workspace are allocated and the per-call tensors' alignment is looked at."""

    def __init__(self, pw: PreparedWeight, M: int, dtype: torch.dtype, has_bias: bool, alpha: float,
                 cfg: GemmConfig, deterministic: bool, epilogue: Optional[str] = None, input_norm: bool = False):
        if cfg.wide_scales and pw.scales_t.dtype != torch.float32:
            # fp32 scales are made per bound launch (a few MB, next to a prefill GEMM's
            # milliseconds) rather than kept: the weight holds one prepared copy.
            pw = widen_scales(pw)
        grid, splits, per, atomic, constexprs, static, cx, cfg = launch_plan(pw, M, cfg, has_bias, not deterministic,
                                                                              dtype, epilogue, input_norm)
        self.out_shape = out_shape(M, pw.N, epilogue)
        # the norm epilogue: the rows' partial sums of squares per tile column, and a counter per row
        # block after the split-K tiles' counters
        self.ss_shape = (_cdiv(pw.N, cfg.block_n), M) if epilogue == "residual_rmsnorm" else None
        split_counters = grid[0] if splits > 1 and not atomic else 0
        self.n_counters = grid[0] + _cdiv(M, constexprs["BM"]) if self.ss_shape else split_counters
        self.M, self.N, self.dtype, self.grid, self.splits, self.atomic = M, pw.N, dtype, grid, splits, atomic
        self.constexprs, self.static, self.cx, self.cfg = constexprs, static, cx, cfg
        self.scales = pw.scales_t
        self.zeros = pw.zeros_t if pw.zeros_t is not None else pw.scales_t
        self.has_bias = has_bias
        self.alpha = float(alpha)
        self.tail = (M, pw.N, pw.K, pw.K_pad // pw.kc, per, pw.qk.shape[0], self.alpha)
        self.qk = pw.qk

    def launch(self, x: torch.Tensor, bias: Optional[torch.Tensor], residual: Optional[torch.Tensor] = None,
               out: Optional[torch.Tensor] = None, norm=None, input_norm=None) -> tuple:
        M, N = self.M, self.N
        y = torch.empty(self.out_shape, dtype=self.dtype, device=x.device) if out is None else out
        if self.splits == 1:
            part = y
        elif self.atomic:
            part = torch.zeros((M, N), dtype=torch.float32, device=x.device)
        else:
            part = torch.empty((self.splits, M, N), dtype=torch.float32, device=x.device)
        counters = tile_counters(x.device, self.n_counters) if self.n_counters else part
        norm_args = (None, None, None)
        if self.ss_shape is not None:
            norm_args = (norm.weight, torch.empty(self.ss_shape, dtype=torch.float32, device=x.device), norm.eps)
        bias_arg = bias if bias is not None else self.scales
        # What the compiled kernel depends on beyond the plan: the per-call tensors' 16-byte
        # alignment and dtypes (the dtypes follow from the plan unless a caller passes its own out).
        aligned = (not x.data_ptr() & 15, not y.data_ptr() & 15, not part.data_ptr() & 15,
                   not counters.data_ptr() & 15, not bias_arg.data_ptr() & 15, y.dtype, part.dtype, counters.dtype,
                   bias_arg.dtype, None if residual is None else (not residual.data_ptr() & 15, residual.dtype),
                   None if norm is None else (not norm.weight.data_ptr() & 15, norm.weight.dtype),
                   None if input_norm is None else (not input_norm.weight.data_ptr() & 15, input_norm.weight.dtype))
        pro_args = (None, None) if input_norm is None else (input_norm.weight, input_norm.eps)
        cfg = self.cfg
        # residual None (without the residual epilogue) is a constexpr to Triton: no kernel parameter
        compiled = _GEMM(self.grid, (x, self.qk, self.scales, self.zeros, bias_arg, residual, y, part, counters)
                         + self.tail + norm_args + pro_args,
                         self.constexprs, cfg.num_warps, cfg.num_stages, key=(self.static, aligned), cx=self.cx)
        if self.atomic:
            _REDUCE((_cdiv(M * N, REDUCE_BLOCK),), (part, bias_arg, y, M, N, self.alpha),
                    dict(HAS_BIAS=self.has_bias, BLOCK=REDUCE_BLOCK, DTYPE=self.constexprs["DTYPE"]), 4, 3)
        return y, compiled
