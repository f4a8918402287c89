"""``kernel_info``: the SPEC's occupancy query for the kernel a call would run."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

import torch

from .config import GemmConfig
from .errors import expect
from .weight import QuantizedWeight

# Per-SM limits of compute capability 9.0 (CUDA C++ Programming Guide, "Compute Capabilities").
SM90_REGISTERS = 65536
SM90_SHARED_BYTES = 233472  # 228 KiB usable per SM
SM90_SHARED_RESERVED = 1024  # per resident block
SM90_MAX_THREADS = 2048
SM90_MAX_BLOCKS = 32


@dataclass(frozen=True)
class KernelInfo:
    """What one launch of the GEMM kernel uses.

    config: the GemmConfig run; grid: (programs, splits); registers: per thread;
    shared_bytes: per block; spills: registers spilled to local memory;
    blocks_per_sm: resident blocks per SM by registers, shared memory and threads (sm_90 limits);
    limited_by: which of those three binds.
    """

    config: GemmConfig
    grid: tuple
    num_warps: int
    registers: int
    shared_bytes: int
    spills: int
    blocks_per_sm: int
    limited_by: str

    def as_dict(self) -> dict:
        d = asdict(self)
        d["config"] = self.config.short()
        return d


def occupancy(registers: int, shared_bytes: int, num_warps: int) -> tuple:
    """(resident blocks per SM, limiting resource) under sm_90 limits."""
    threads = 32 * num_warps
    by_regs = SM90_REGISTERS // max(1, registers * threads)
    by_smem = SM90_SHARED_BYTES // (shared_bytes + SM90_SHARED_RESERVED)
    by_threads = SM90_MAX_THREADS // threads
    limits = {"registers": by_regs, "shared memory": by_smem, "threads": by_threads,
              "blocks": SM90_MAX_BLOCKS}
    name = min(limits, key=limits.get)
    return limits[name], name


def kernel_info(x: torch.Tensor, w: QuantizedWeight, config="auto", bias: Optional[torch.Tensor] = None) -> KernelInfo:
    """Run ``gemm(x, w, bias, config=config)`` once (compiling if needed) and report the kernel's
    registers, shared memory, spills and resident blocks per SM. x: [..., K] on a CUDA device."""
    from .backends.triton.launch import effective_block_m, launch_gemm_compiled, split_plan
    from .ops import chosen_config, prepare
    from .validate import check_gemm_args

    check_gemm_args(x, w, bias, 1.0)
    cfg = chosen_config(x, w, config)
    expect(isinstance(cfg, GemmConfig), "x.device", "a device where the Triton kernels run", x.device)
    x2 = x.reshape(-1, w.shape[1]).contiguous()
    expect(x2.shape[0] > 0, "x", "at least one row (M >= 1)", tuple(x.shape))
    pw = prepare(w, cfg.wide_scales)
    _, compiled = launch_gemm_compiled(x2, pw, bias, 1.0, cfg)
    shared = int(getattr(compiled.metadata, "shared", 0))
    warps = int(getattr(compiled.metadata, "num_warps", cfg.num_warps))
    regs = int(getattr(compiled, "n_regs", 0) or 0)
    spills = int(getattr(compiled, "n_spills", 0) or 0)
    blocks, limit = occupancy(regs, shared, warps)
    M, N = x2.shape[0], w.shape[0]
    splits, _ = split_plan(cfg, pw.K_pad // pw.kc)
    bm = effective_block_m(cfg, M)
    grid = (-(-M // bm) * -(-N // cfg.block_n), splits)
    return KernelInfo(cfg, grid, warps, regs, shared, spills, blocks, limit)
