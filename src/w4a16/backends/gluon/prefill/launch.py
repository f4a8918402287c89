"""Host side of the Gluon prefill kernel (``kernel.py``): cached launch plans and the launch
(through ``host.launch``'s direct path); its offline compilation is in ``../offline.py``."""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import torch

from ....epilogue import code_of, out_features
from ....errors import expect
from ...workspace import plans_of, tile_counters
from ..host import PRODUCER_REGS, check_x2, gl_dtype, k_ranges, launch, stage_blocks, weight_descriptors
from ..layout import GluonPrepared
from .config import GluonPrefillConfig


def epilogue_parts(cfg: GluonPrefillConfig, epi: int) -> int:
    """Token slices of the tile epilogue: the config's, at least 2 with the residual epilogue (its
    loaded tile spills a one-slice epilogue of the 128-token tiles)."""
    return max(cfg.epi_parts, 2) if epi == 2 else cfg.epi_parts


@functools.lru_cache(maxsize=1024)
def prefill_constexprs(cfg: GluonPrefillConfig, kh: int, group: int, has_zeros: bool, has_bias: bool, dtype,
                split: bool = False, epi: int = 0):
    """The kernel's trailing constexpr arguments, in signature order (epi: the epilogue's code;
    split: K ranges per tile; ``cfg.stream`` gives STREAM, with which ``split`` must be False)."""
    ks, gps, gdiv = stage_blocks(cfg, kh, group)
    return dict(MT=cfg.mt, BN=cfg.bn, KH=kh, NCH=cfg.nch, STAGES=cfg.stages, GPS=gps, GDIV=gdiv,
                GROUP_N=cfg.group_n, PINGPONG=bool(cfg.pingpong), HOLD=bool(cfg.hold), HAS_ZEROS=bool(has_zeros),
                HAS_BIAS=bool(has_bias), DTYPE=gl_dtype(dtype), EPI_PARTS=epilogue_parts(cfg, epi), SPLIT=bool(split),
                CONSUMER_REGS=cfg.consumer_regs, PRODUCER_REGS=PRODUCER_REGS, EPI=epi, STREAM=bool(cfg.stream))


@dataclass(frozen=True)
class PrefillPlan:
    """One (prepared weight, M, config)'s launch, resolved once (``plan_for``)."""
    c_desc: object
    s_desc: object
    o_desc: object
    xl: object
    kh: int
    n_k: int
    n_tn: int
    n_tm: int
    n_split: int   # K ranges per tile (1: no split); stream-K: the most pieces of a tile
    kps: int       # stages per K range; stream-K: stages per program
    grid: tuple
    dummy_f32: object   # stands for the partials and counters when there is no split


def stream_runs(tiles: int, n_k: int, programs: int) -> tuple:
    """Stream-K over ``tiles`` tiles of ``n_k`` K stages for at most ``programs`` programs: (stages
    per program, the most pieces one tile is cut into, programs launched). Runs of
    ceil(tiles * n_k / programs) stages; tile t's stages [t * n_k, (t + 1) * n_k) meet the runs
    t * n_k // run to ((t + 1) * n_k - 1) // run."""
    total = tiles * n_k
    run = -(-total // max(1, programs))
    pieces = max(((t + 1) * n_k - 1) // run - (t * n_k) // run + 1 for t in range(tiles))
    return run, pieces, -(-total // run)


def plan_for(pw: GluonPrepared, M: int, cfg: GluonPrefillConfig) -> PrefillPlan:
    """The launch plan of M rows on ``pw`` with ``cfg``, cached per prepared weight."""
    key = ("prefill", M, cfg)
    plans = plans_of(pw)
    plan = plans.get(key)
    if plan is not None:
        return plan
    kh, ks, xl, c_desc, s_desc, o_desc = weight_descriptors(pw, cfg, cfg.bn)
    n_tn = -(-pw.N // cfg.rows)
    n_tm = -(-M // cfg.mt)
    n_k = -(-pw.K // ks)
    sms = torch.cuda.get_device_properties(pw.codes.device).multi_processor_count
    if cfg.stream:
        kps, n_split, programs = stream_runs(n_tn * n_tm, n_k, sms)
    else:
        kps, n_split = k_ranges(n_k, cfg.splits)
        programs = min(n_tn * n_tm * n_split, sms)
    plan = PrefillPlan(c_desc=c_desc, s_desc=s_desc, o_desc=o_desc, xl=xl, kh=kh, n_k=n_k, n_tn=n_tn, n_tm=n_tm,
                       n_split=n_split, kps=kps, grid=(programs, 1),
                       dummy_f32=torch.zeros(1, dtype=torch.float32, device=pw.codes.device))
    plans[key] = plan
    return plan


def run_prefill(x2: torch.Tensor, pw: GluonPrepared, bias: Optional[torch.Tensor], alpha: float,
                cfg: GluonPrefillConfig, deterministic: bool = True,
                out: Optional[torch.Tensor] = None, epilogue: Optional[str] = None,
                residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """y [M, N] = alpha * x2 @ W^T + bias, then the epilogue, with the Gluon prefill kernel, on
    torch's current stream.

    x2: contiguous [M, K] fp16/bf16; pw: the weight in the Gluon layout (the decode kernel's, same
    dtype); bias: [N] or None; epilogue: None, "silu_mul" (y [M, N / 2]) or "residual" (residual
    [M, N] contiguous). A config with ``splits`` > 1 splits K and sums the fp32 partials in a
    fixed order, so the result is deterministic either way.
    """
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    from .kernel import w4a16_prefill_kernel
    M, K = x2.shape
    N = pw.N
    expect(M >= 1, "x2.shape[0] (M)", ">= 1", M)
    check_x2(x2, pw)
    plan = plan_for(pw, M, cfg)
    y = out if out is not None else torch.empty(M, out_features(N, epilogue), dtype=x2.dtype, device=x2.device)
    x_desc = TensorDescriptor(x2, [M, K], [K, 1], [cfg.mt, plan.kh], plan.xl)
    split = plan.n_split > 1 and not cfg.stream
    cx = prefill_constexprs(cfg, plan.kh, pw.group, pw.has_zeros, bias is not None, x2.dtype, split,
                            code_of(epilogue))
    if plan.n_split > 1:
        part = torch.empty(plan.n_split * M * N, dtype=torch.float32, device=x2.device)
        # per (tile, warpgroup, epilogue slice); this (device, stream)'s buffer, kept at zero by the kernels
        cnt = tile_counters(x2.device, plan.n_tn * plan.n_tm * 2 * cx["EPI_PARTS"])
    else:
        part = cnt = plan.dummy_f32
    args = (plan.c_desc, x_desc, plan.s_desc, plan.o_desc, y, bias if bias is not None else y, residual, part, cnt,
            M, N, pw.group, plan.n_k, plan.n_tn, plan.n_tm, plan.n_split, plan.kps, float(alpha))
    launch(w4a16_prefill_kernel, plan.grid, args, cx, cfg, ("prefill", cfg, plan.kh, pw.K_pad, x2.get_device()))
    return y


