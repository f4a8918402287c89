"""Host side of the Gluon decode kernel: support check, cached launch plans, launch (its offline
compilation for sm_90a is in ``offline.py``)."""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import torch

from ...errors import expect
from ..workspace import plans_of, tile_counters
from .config import GluonDecodeConfig, auto_splits
from .layout import GLUON_LAYOUT_VERSION, GluonPrepared, half_chunk

MAX_M = 64
PRODUCER_REGS = 40   # registers of the one-warp TMA producer partition (setmaxnreg)


def supports(M: int, N: int, K: int, group: int, dtype: torch.dtype, has_zeros: bool,
             x: Optional[torch.Tensor] = None) -> Optional[str]:
    """None when the Gluon decode kernel handles this call, else the reason it does not."""
    from ..triton_compat import gluon_unsupported
    reason = gluon_unsupported()
    if reason:
        return reason
    if not (1 <= M <= MAX_M):
        return f"M = {M} outside 1..{MAX_M}"
    if dtype not in (torch.float16, torch.bfloat16):
        return f"dtype {dtype} is not fp16/bf16"
    if N < 1 or K < 2 or K % 2:
        return f"bad shape N = {N}, K = {K}"
    if (K * 2) % 16:
        return f"x's row pitch K * 2 = {K * 2} bytes is not a multiple of 16 (TMA)"
    if group not in (32, 64, 128, 256) and group != K:
        return f"group size {group} unsupported"
    if K % group:
        return f"K = {K} is not a multiple of the group size {group}"
    if x is not None:
        if not x.is_cuda:
            return "x is not a CUDA tensor"
        if torch.cuda.get_device_capability(x.device)[0] != 9:
            return "not an sm_90 GPU"
        if x.data_ptr() % 16:
            return "x's data pointer is not 16-byte aligned (TMA)"
        if x.dim() != 2 or x.stride(1) != 1 or x.stride(0) != K:
            return "x is not a contiguous [M, K] matrix"
    return None


def gl_dtype(dtype):
    from triton.experimental.gluon import language as gl
    return gl.float16 if dtype == torch.float16 else gl.bfloat16


def smem_layouts(cfg: GluonDecodeConfig, kh: int, dtype):
    from triton.experimental.gluon import language as gl
    gdt = gl_dtype(dtype)
    cl = gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=8, rank=3)
    xl = gl.NVMMASharedLayout.get_default_for([cfg.mt, kh], gdt)
    sl = gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=16, rank=2)
    return cl, xl, sl


def stage_blocks(cfg: GluonDecodeConfig, kh: int, group: int):
    """(KS, GPS, GDIV): values of K per stage, scale rows per stage box, local group divisor."""
    ks = cfg.nch * 2 * kh
    if group < ks:
        return ks, ks // group, group
    return ks, 1, 1 << 30


@functools.lru_cache(maxsize=1024)
def decode_constexprs(cfg, kh, group, split_mode, has_zeros, has_bias, dtype):
    """The kernel's constexpr arguments, in signature order (cached: the same few per weight)."""
    ks, gps, gdiv = stage_blocks(cfg, kh, group)
    return dict(MT=cfg.mt, W=cfg.warps, KH=kh, NCH=cfg.nch, STAGES=cfg.stages, GPS=gps, GDIV=gdiv,
                SPLIT=split_mode, HAS_ZEROS=bool(has_zeros), HAS_BIAS=bool(has_bias), DTYPE=gl_dtype(dtype),
                WS=bool(cfg.ws), PRODUCER_REGS=PRODUCER_REGS, SA=cfg.scale_after(has_zeros, group), PDL=bool(cfg.pdl))


@dataclass
class _Plan:
    c_desc: object
    s_desc: object
    o_desc: object
    grid: tuple
    splits: int        # K ranges per tile (stream-K: the programs, P)
    sps: int           # the kernel's stages_per_split (stream-K: n_units, all tiles x stages)
    n_stages: int
    dummy_f32: torch.Tensor
    xl: object
    kh: int
    split_mode: int    # SPLIT of the kernel: 0, 1 or 2 (split_mode_of), 3 stream-K
    part_numel: int    # fp32 partials the launch needs (0: none; split mode 2: the zeroed sum)
    n_counters: int    # tile counters it needs (0: none)

    @property
    def kernel(self):
        """The jitted kernel this plan launches."""
        if self.split_mode == 3:
            from .decode_sk import w4a16_decode_sk_kernel
            return w4a16_decode_sk_kernel
        from .decode import w4a16_decode_kernel
        return w4a16_decode_kernel


def weight_descriptors(pw: GluonPrepared, cfg, bn: int) -> tuple:
    """(kh, ks, x's shared layout, codes / scales / offsets TMA descriptors) of a prepared weight for
    a decode or prefill config whose warpgroup covers ``bn`` weight rows: codes boxes
    [bn / 16, ks / 32, 256], scale and offset boxes [groups per stage, bn]."""
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    kh = pw.kh
    ks, gps, _ = stage_blocks(cfg, kh, pw.group)
    cl, xl, sl = smem_layouts(cfg, kh, pw.dtype)
    c_desc = TensorDescriptor.from_tensor(pw.codes, [bn // 16, ks // 32, 256], cl)
    s_desc = TensorDescriptor.from_tensor(pw.scales_t, [gps, bn], sl)
    o_desc = TensorDescriptor.from_tensor(pw.offs_t, [gps, bn], sl) if pw.offs_t is not None else s_desc
    return kh, ks, xl, c_desc, s_desc, o_desc


def k_ranges(n_stages: int, splits: int) -> tuple:
    """(stages per range, ranges): ``n_stages`` K stages in at most ``splits`` ranges, none empty."""
    per = -(-n_stages // min(splits, n_stages))
    return per, -(-n_stages // per)


def check_x2(x2: torch.Tensor, pw: GluonPrepared) -> None:
    """x2's K and dtype against the prepared weight (both kernels)."""
    expect(x2.shape[1] == pw.K, "x2.shape[1] (K)", pw.K, x2.shape[1])
    expect(x2.dtype == pw.dtype, "x2.dtype", f"{pw.dtype} (the scales' dtype)", x2.dtype)


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


def _plan(pw: GluonPrepared, M: int, cfg: GluonDecodeConfig, deterministic: bool) -> _Plan:
    key = (M, cfg, deterministic)
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
        plan = _Plan(c_desc, s_desc, o_desc, (progs, 1), progs, n_tiles * n_stages, n_stages, dummy, xl, kh,
                     3, 2 * progs * M * bn, n_tiles)
    else:
        if cfg.splits and not cfg.sk:
            splits = min(cfg.splits, n_stages)
        else:
            # a partial tile is mt x bn fp32, written once and read once: 16 * mt / ks stages of codes
            splits = auto_splits(n_tiles, n_stages, slots, 16.0 * cfg.mt / ks)
        sps, splits = k_ranges(n_stages, splits)
        mode = split_mode_of(splits, deterministic)
        plan = _Plan(c_desc, s_desc, o_desc, (n_tiles, splits), splits, sps, n_stages, dummy, xl, kh, mode,
                     {0: 0, 1: splits * M * pw.N, 2: M * pw.N}[mode], n_tiles if mode == 1 else 0)
    plans[key] = plan
    return plan


def workspace_of(plan: _Plan, device) -> tuple:
    """(fp32 partials, tile counters) for one launch of ``plan`` (the plan's dummy where it needs
    none; split mode 2 adds into a zeroed sum). The counters are this (device, stream)'s buffer,
    kept at zero by every kernel that uses it, so launches on other streams never share counters."""
    alloc = torch.zeros if plan.split_mode == 2 else torch.empty
    part = alloc(plan.part_numel, dtype=torch.float32, device=device) if plan.part_numel else plan.dummy_f32
    cnt = tile_counters(device, plan.n_counters) if plan.n_counters else plan.dummy_f32
    return part, cnt


def run_decode(x2: torch.Tensor, pw: GluonPrepared, bias: Optional[torch.Tensor], alpha: float,
               cfg: GluonDecodeConfig, deterministic: bool = True,
               out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """y [M, N] = alpha * x2 @ W^T + bias with the Gluon decode kernel, on torch's current stream.

    x2: contiguous [M, K] fp16/bf16 (M <= cfg.mt); pw: the weight in the Gluon layout (same dtype);
    bias: [N] or None. deterministic=False adds K-split partials with fp32 atomics.
    """
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    M, K = x2.shape
    N = pw.N
    expect(1 <= M <= cfg.mt, "x2.shape[0] (M)", f"1..{cfg.mt} (the config's token tile)", M)
    check_x2(x2, pw)
    plan = _plan(pw, M, cfg, deterministic)
    y = out if out is not None else torch.empty(M, N, dtype=x2.dtype, device=x2.device)
    x_desc = TensorDescriptor(x2, [M, K], [K, 1], [cfg.mt, plan.kh], plan.xl)
    part, cnt = workspace_of(plan, x2.device)
    cx = decode_constexprs(cfg, plan.kh, pw.group, plan.split_mode, pw.has_zeros, bias is not None, x2.dtype)
    args = (plan.c_desc, x_desc, plan.s_desc, plan.o_desc, y, bias if bias is not None else y, part, cnt,
            M, N, pw.group, plan.n_stages, plan.sps, float(alpha))
    _launch(plan.kernel, plan.grid, args, cx, cfg, (cfg, plan.kh, pw.K_pad, x2.get_device()))
    if plan.split_mode == 2:
        r = part.view(M, N) * float(alpha)
        if bias is not None:
            r = r + bias.float()
        y.copy_(r)
    return y


_KERNELS: dict = {}
_DIRECT = [True]  # cleared for the process if a direct launch ever fails
_DIRECT_ERROR: list = [None]  # why it failed (see direct_launch_state)
_LAST: list = [None]  # (compiled kernel, grid) of this process's latest launch, for kernel_info


def direct_launch_state() -> tuple:
    """(direct launches in use, the error that turned them off or None)."""
    return _DIRECT[0], _DIRECT_ERROR[0]


def last_launch() -> Optional[tuple]:
    """(compiled kernel, grid) of the latest Gluon launch in this process, or None."""
    return _LAST[0]


def _launch(kernel, grid, args, cx: dict, cfg: GluonDecodeConfig, static: tuple) -> None:
    """``kernel[grid](*args, **cx)``, but once a specialization is compiled, launched directly
    through its compiled launcher (Gluon's generic launch binds every argument in Python on each
    call). The key holds what the compiled kernel depends on: the config and layout (descriptor
    block shapes), the device, the constexprs and each plain argument's specialization."""
    from ..triton.fast_launch import arg_key
    from ..triton_compat import COMPILE_OPTIONS, hooks_active

    key = (static, tuple(cx.values()), tuple(arg_key(a) for a in args[4:]))
    compiled = _KERNELS.get(key) if _DIRECT[0] and not hooks_active() else None
    if compiled is not None and static[-1] == torch._C._cuda_getDevice():
        stream = torch._C._cuda_getCurrentRawStream(static[-1])
        try:
            compiled.run(grid[0], grid[1], 1, stream, compiled.function, compiled.packed_metadata, None, None, None,
                         *args, *cx.values())
            _LAST[0] = (compiled, grid)
            return
        except Exception as e:  # an API difference in this Triton build: keep to the generic path
            _DIRECT[0] = False
            _DIRECT_ERROR[0] = repr(e)
    opts = {"launch_pdl": True} if getattr(cfg, "pdl", False) else {}   # a programmatic dependent launch
    compiled = kernel[grid](*args, num_warps=cfg.warps, maxnreg=cfg.regs, **opts, **COMPILE_OPTIONS, **cx)
    if hasattr(compiled, "result"):
        compiled = compiled.result()
    if len(_KERNELS) >= 256:
        _KERNELS.clear()
    _KERNELS[key] = compiled
    _LAST[0] = (compiled, grid)


def layout_version() -> int:
    return GLUON_LAYOUT_VERSION
