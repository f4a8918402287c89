"""Host side of the Gluon decode kernel (``kernel.py``, ``stream_k.py``): launch plans, the
workspace, the launch on torch's current stream."""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import torch

from ....epilogue import code_of, out_shape
from ....errors import expect, fail
from ...workspace import plans_of, tile_counters
from ..host import PRODUCER_REGS, check_x2, gl_dtype, k_ranges, launch, stage_blocks, weight_descriptors
from ..layout import GluonPrepared
from .config import GluonDecodeConfig, auto_splits


@functools.lru_cache(maxsize=1024)
def decode_constexprs(cfg, kh, group, split_mode, has_zeros, has_bias, dtype, epi=0):
    """The kernel's trailing constexpr arguments, in signature order (cached: the same few per
    weight); epi: the epilogue's code."""
    ks, gps, gdiv = stage_blocks(cfg, kh, group)
    return dict(MT=cfg.mt, W=cfg.warps, KH=kh, NCH=cfg.nch, STAGES=cfg.stages, GPS=gps, GDIV=gdiv,
                SPLIT=split_mode, HAS_ZEROS=bool(has_zeros), HAS_BIAS=bool(has_bias), DTYPE=gl_dtype(dtype),
                WS=bool(cfg.ws), PRODUCER_REGS=PRODUCER_REGS, SA=cfg.scale_after(has_zeros, group), PDL=bool(cfg.pdl),
                EPI=epi)


@dataclass(frozen=True)
class DecodePlan:
    """One (prepared weight, M, config, determinism)'s launch, resolved once (``plan_for``)."""
    c_desc: object          # codes, scales and offsets TMA descriptors of the weight
    s_desc: object
    o_desc: object
    grid: tuple
    splits: int             # K ranges per tile (stream-K: the programs, P)
    sps: int                # the kernel's stages_per_split (stream-K: n_units, all tiles x stages)
    n_stages: int
    dummy_f32: torch.Tensor  # stands for the partials and counters a launch does not need
    xl: object              # x's shared layout (its descriptor is made per call)
    kh: int
    split_mode: int         # SPLIT of the kernel: 0, 1 or 2 (split_mode_of), 3 stream-K
    part_numel: int         # fp32 partials the launch needs (0: none; split mode 2: the zeroed sum)
    n_counters: int         # tile counters it needs (0: none; with the RMSNorm epilogue one more, the rows')
    n_tiles: int            # N tiles (the RMSNorm epilogue's partial sums: [n_tiles, M] fp32)

    @property
    def kernel(self):
        """The jitted kernel this plan launches."""
        if self.split_mode == 3:
            from .stream_k import w4a16_decode_sk_kernel
            return w4a16_decode_sk_kernel
        from .kernel import w4a16_decode_kernel
        return w4a16_decode_kernel


def split_mode_of(splits: int, deterministic: bool) -> int:
    """The decode kernel's SPLIT: 0 no K split, 1 partials summed in split order by the last split
    of each tile, 2 fp32 atomics (finished on the host)."""
    return 0 if splits == 1 else (1 if deterministic else 2)


SK_MAX_PRODUCT = 2 ** 31   # stream-K: units x programs must fit the kernel's 32-bit arithmetic


def stream_k_programs(n_units: int, slots: int) -> int:
    """Programs of a stream-K launch: one per resident slot, never more than there are units;
    0 when units x programs would overflow the kernel's 32-bit unit arithmetic."""
    p = min(n_units, slots)
    return p if n_units * p < SK_MAX_PRODUCT else 0


def plan_for(pw: GluonPrepared, M: int, cfg: GluonDecodeConfig, deterministic: bool,
             epilogue: Optional[str] = None) -> DecodePlan:
    """The launch plan of M rows on ``pw`` with ``cfg``, cached per prepared weight. With an
    epilogue the K-split partials are summed in split order (the atomic mode leaves the finish to
    the host, which applies alpha and bias only), whatever ``deterministic`` says; with
    "residual_rmsnorm" the counters hold the rows' one after the tiles'."""
    deterministic = deterministic or epilogue is not None
    norm = epilogue == "residual_rmsnorm"
    key = (M, cfg, deterministic, norm)
    plans = plans_of(pw)
    plan = plans.get(key)
    if plan is not None:
        return plan
    bn = 16 * cfg.warps
    kh, ks, xl, c_desc, s_desc, o_desc = weight_descriptors(pw, cfg, bn)
    n_tiles = -(-pw.N // bn)
    n_stages = -(-pw.K // ks)
    dev = pw.codes.device
    slots = torch.cuda.get_device_properties(dev).multi_processor_count * cfg.resident(kh, pw.has_zeros)
    dummy = torch.zeros(1, dtype=torch.float32, device=dev)
    progs = stream_k_programs(n_tiles * n_stages, cfg.splits or slots) if cfg.sk else 0
    if progs:
        plan = DecodePlan(c_desc=c_desc, s_desc=s_desc, o_desc=o_desc, grid=(progs, 1), splits=progs,
                          sps=n_tiles * n_stages, n_stages=n_stages, dummy_f32=dummy, xl=xl, kh=kh, split_mode=3,
                          part_numel=2 * progs * M * bn, n_counters=n_tiles + norm, n_tiles=n_tiles)
    else:
        if cfg.splits and not cfg.sk:
            splits = min(cfg.splits, n_stages)
        else:
            # a partial tile is mt x bn fp32, written once and read once: 16 * mt / ks stages of codes
            splits = auto_splits(n_tiles, n_stages, slots, 16.0 * cfg.mt / ks)
        sps, splits = k_ranges(n_stages, splits)
        mode = split_mode_of(splits, deterministic)
        plan = DecodePlan(c_desc=c_desc, s_desc=s_desc, o_desc=o_desc, grid=(n_tiles, splits), splits=splits,
                          sps=sps, n_stages=n_stages, dummy_f32=dummy, xl=xl, kh=kh, split_mode=mode,
                          part_numel={0: 0, 1: splits * M * pw.N, 2: M * pw.N}[mode],
                          n_counters=(n_tiles if mode == 1 or norm else 0) + norm, n_tiles=n_tiles)
    plans[key] = plan
    return plan


def workspace_of(plan: DecodePlan, device) -> tuple:
    """(fp32 partials, tile counters) for one launch of ``plan`` (the plan's dummy where it needs
    none; split mode 2 adds into a zeroed sum). The counters are this (device, stream)'s buffer,
    kept at zero by every kernel that uses it, so launches on other streams never share counters."""
    alloc = torch.zeros if plan.split_mode == 2 else torch.empty
    part = alloc(plan.part_numel, dtype=torch.float32, device=device) if plan.part_numel else plan.dummy_f32
    cnt = tile_counters(device, plan.n_counters) if plan.n_counters else plan.dummy_f32
    return part, cnt


def norm_args(plan: DecodePlan, M: int, norm, device) -> tuple:
    """The kernel's (nw_ptr, ss_ptr, eps): with the RMSNorm epilogue (``norm`` a
    ``w4a16.epilogue.Norm``) its weight, fresh fp32 partial sums [N tiles, M] and epsilon; else
    None three times (constexprs: no kernel parameters)."""
    if norm is None:
        return None, None, None
    return norm.weight, torch.empty(plan.n_tiles, M, dtype=torch.float32, device=device), float(norm.eps)


def run_decode(x2: torch.Tensor, pw: GluonPrepared, bias: Optional[torch.Tensor], alpha: float,
               cfg: GluonDecodeConfig, deterministic: bool = True,
               out: Optional[torch.Tensor] = None, epilogue: Optional[str] = None,
               residual: Optional[torch.Tensor] = None, norm=None) -> torch.Tensor:
    """y [M, N] = alpha * x2 @ W^T + bias, then the epilogue, with the Gluon decode kernel, on
    torch's current stream.

    x2: contiguous [M, K] fp16/bf16 (M <= cfg.mt); pw: the weight in the Gluon layout (same dtype);
    bias: [N] or None; epilogue: None, "silu_mul" (y [M, N / 2]), "residual" (residual [M, N]
    contiguous) or "residual_rmsnorm" (the residual, and ``norm`` a ``w4a16.epilogue.Norm``
    whose weight [N] is contiguous in x2's dtype: y [2, M, N], h and its RMSNorm).
    deterministic=False adds K-split partials with fp32 atomics (the plain epilogue only: with
    another the partials are summed in split order).
    """
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    M, K = x2.shape
    N = pw.N
    expect(1 <= M <= cfg.mt, "x2.shape[0] (M)", f"1..{cfg.mt} (the config's token tile)", M)
    check_x2(x2, pw)
    expect((norm is not None) == (epilogue == "residual_rmsnorm"), "norm",
           "a Norm with epilogue='residual_rmsnorm', else None", norm)
    if norm is not None and not cfg.norm_epilogue:   # the message formatted only on failure
        fail("epilogue", f"not 'residual_rmsnorm' with config {cfg.short()} (GluonDecodeConfig.norm_epilogue)",
             epilogue)
    plan = plan_for(pw, M, cfg, deterministic, epilogue)
    y = out if out is not None else torch.empty(out_shape(M, N, epilogue), dtype=x2.dtype, device=x2.device)
    x_desc = TensorDescriptor(x2, [M, K], [K, 1], [cfg.mt, plan.kh], plan.xl)
    part, cnt = workspace_of(plan, x2.device)
    cx = decode_constexprs(cfg, plan.kh, pw.group, plan.split_mode, pw.has_zeros, bias is not None, x2.dtype,
                           code_of(epilogue))
    args = (plan.c_desc, x_desc, plan.s_desc, plan.o_desc, y, bias if bias is not None else y, residual, part, cnt,
            M, N, pw.group, plan.n_stages, plan.sps, float(alpha), *norm_args(plan, M, norm, x2.device))
    launch(plan.kernel, plan.grid, args, cx, cfg, (cfg, plan.kh, pw.K_pad, x2.get_device()))
    if plan.split_mode == 2:
        r = part.view(M, N) * float(alpha)
        if bias is not None:
            r = r + bias.float()
        y.copy_(r)
    return y
