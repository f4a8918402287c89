"""Host side the Gluon kernels share: shared-memory layouts and stage geometry, the weight's TMA
descriptors, K ranges, argument checks, and the launch itself (through the compiled kernel's own
launcher once a specialization is compiled)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from ...errors import expect
from .layout import GluonPrepared

PRODUCER_REGS = 40   # registers of the one-warp TMA producer partition (setmaxnreg)
MAX_KERNELS = 256    # compiled specializations kept for direct launches


def gl_dtype(dtype: torch.dtype):
    """Gluon's dtype for torch.float16 / torch.bfloat16."""
    from triton.experimental.gluon import language as gl
    return gl.float16 if dtype == torch.float16 else gl.bfloat16


def smem_layouts(cfg, kh: int, dtype: torch.dtype) -> tuple:
    """(codes, x, scales) shared layouts of a decode or prefill config (``cfg.mt`` tokens)."""
    from triton.experimental.gluon import language as gl
    cl = gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=8, rank=3)
    xl = gl.NVMMASharedLayout.get_default_for([cfg.mt, kh], gl_dtype(dtype))
    sl = gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=16, rank=2)
    return cl, xl, sl


def stage_blocks(cfg, kh: int, group: int) -> tuple:
    """(KS, GPS, GDIV): values of K per stage, scale rows per stage box, local group divisor.
    Groups (a power of two, at least a half chunk) smaller than a stage: GPS = KS / g rows of one
    scale each, GDIV = g. Otherwise one scale row per stage, every local group index 0 (GDIV =
    2^30): groups of a stage or longer, and a per-channel weight of any K (its one group: every
    stage reads row 0; K below a half chunk is padded with zero codes and x)."""
    ks = cfg.nch * 2 * kh
    if kh <= group < ks and group & (group - 1) == 0:
        return ks, ks // group, group
    return ks, 1, 1 << 30


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


@dataclass
class LaunchState:
    """This process's Gluon launches: whether compiled kernels are launched directly (``direct``;
    cleared for good, with the ``error``, if a direct launch ever fails), the compiled
    specializations, and the latest launch (compiled kernel, grid), for ``kernel_info``."""
    direct: bool = True
    error: Optional[str] = None
    kernels: dict = field(default_factory=dict)
    last: Optional[tuple] = None


STATE = LaunchState()


def launch(kernel, grid: tuple, args: tuple, cx: dict, cfg, static: tuple, n_desc: int = 4) -> None:
    """``kernel[grid](*args, **cx)``, but once a specialization is compiled, launched directly
    through its compiled launcher (Gluon's generic launch binds every argument in Python on each
    call). ``static``: what the compiled kernel depends on beyond the constexprs and the plain
    arguments' specialization (the config, layout, device last); ``n_desc``: the leading TMA
    descriptors in ``args`` (their blocks and layouts are in ``static``, not keyed one by one)."""
    from ..triton.fast_launch import arg_key
    from ..triton_compat import COMPILE_OPTIONS, hooks_active

    key = (static, tuple(cx.values()), tuple(arg_key(a) for a in args[n_desc:]))
    compiled = STATE.kernels.get(key) if STATE.direct and not hooks_active() else None
    if compiled is not None and static[-1] == torch._C._cuda_getDevice():
        stream = torch._C._cuda_getCurrentRawStream(static[-1])
        try:
            compiled.run(grid[0], grid[1], 1, stream, compiled.function, compiled.packed_metadata, None, None, None,
                         *args, *cx.values())
            STATE.last = (compiled, grid)
            return
        except Exception as e:  # an API difference in this Triton build: keep to the generic path
            STATE.direct, STATE.error = False, repr(e)
    opts = {"launch_pdl": True} if getattr(cfg, "pdl", False) else {}   # a programmatic dependent launch
    compiled = kernel[grid](*args, num_warps=cfg.warps, maxnreg=cfg.regs, **opts, **COMPILE_OPTIONS, **cx)
    if hasattr(compiled, "result"):
        compiled = compiled.result()
    if len(STATE.kernels) >= MAX_KERNELS:
        STATE.kernels.clear()
    STATE.kernels[key] = compiled
    STATE.last = (compiled, grid)
