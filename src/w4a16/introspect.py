"""``kernel_info``: the SPEC's occupancy query for the kernel a call would run."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from .errors import expect
from .weight import QuantizedWeight

# Per-SM limits by compute capability (CUDA C++ Programming Guide, "Compute Capabilities"):
# registers, shared memory usable by blocks, threads, resident blocks.
SM_LIMITS = {
    (8, 0): (65536, 167936, 2048, 32),
    (8, 6): (65536, 102400, 1536, 16),
    (8, 7): (65536, 167936, 2048, 16),
    (8, 9): (65536, 102400, 1536, 24),
    (9, 0): (65536, 233472, 2048, 32),
}
SHARED_RESERVED = 1024  # per resident block


@dataclass(frozen=True)
class KernelInfo:
    """What one launch of the chosen kernel uses.

    backend: its name; reason: why it was chosen; config: its config label; grid: the launch grid;
    registers: per thread; shared_bytes: per block; spills: registers spilled to local memory;
    blocks_per_sm: resident blocks per SM by registers, shared memory, threads and the block limit
    of this GPU's compute capability; limited_by: which of those binds.
    """

    backend: str
    reason: str
    config: str
    grid: tuple
    num_warps: int
    registers: int
    shared_bytes: int
    spills: int
    blocks_per_sm: int
    limited_by: str

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def occupancy(registers: int, shared_bytes: int, num_warps: int, capability=(9, 0)) -> tuple:
    """(resident blocks per SM, limiting resource) under the limits of ``capability``."""
    regs, smem, threads_max, blocks_max = SM_LIMITS.get(tuple(capability), SM_LIMITS[(9, 0)])
    threads = 32 * num_warps
    limits = {"registers": regs // max(1, registers * threads),
              "shared memory": smem // (shared_bytes + SHARED_RESERVED),
              "threads": threads_max // threads, "blocks": blocks_max}
    name = min(limits, key=limits.get)
    return limits[name], name


def kernel_info(x: torch.Tensor, w: QuantizedWeight, config: Any = "auto", bias: Optional[torch.Tensor] = None,
                backend: str = "auto") -> KernelInfo:
    """Run ``gemm(x, w, bias, config=config, backend=backend)``'s kernel once (compiling if needed)
    and report its backend, why it was chosen, registers, shared memory, spills and resident
    blocks per SM. x: [..., K] on a CUDA device."""
    from .ops import choose
    from .validate import check_gemm_args

    check_gemm_args(x, w, bias, 1.0)
    expect(x.device.type == "cuda", "x.device", "a CUDA device (kernel_info reads a compiled kernel)", x.device)
    x2 = x.reshape(-1, w.shape[1]).contiguous()
    expect(x2.shape[0] > 0, "x", "at least one row (M >= 1)", tuple(x.shape))
    choice = choose(x2, w, config, backend)
    b = choice.backend
    info = b.kernel_info(x2, w.prepared(b), bias, choice.config)
    expect(bool(info), "backend", "a kernel backend", b.name)
    cap = torch.cuda.get_device_capability(x.device)
    blocks, limit = occupancy(info["registers"], info["shared_bytes"], info["num_warps"], cap)
    return KernelInfo(b.name, choice.reason, b.config_label(choice.config), tuple(info["grid"]),
                      info["num_warps"], info["registers"], info["shared_bytes"], info["spills"], blocks, limit)
