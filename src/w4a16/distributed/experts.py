"""Tensor parallelism for a mixture of experts' experts module (:class:`w4a16.moe.W4A16Experts`).

    W4A16ExpertsParallel()      the plan's "experts" entry

Every expert is split as a Megatron MLP is: rank r keeps rows [r*I/tp, (r+1)*I/tp) of each
expert's gate and of its up projection (gate_up's N, both halves alike) and the same columns of
its down projection (down's K, on group boundaries), so each rank runs the whole layer on its
slice of the intermediate size and the partial outputs are summed (one all-reduce per layer).
The input hidden states are replicated (a plain tensor, every rank the same); the router runs
whole on every rank. Needs I divisible by tp and I/tp a multiple of down's group size (a
per-channel down projection cannot be split). The module's experts become this rank's slices
(its state dict is the rank's part)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch.distributed.tensor import DeviceMesh
from torch.distributed.tensor.parallel.style import ParallelStyle

from ..errors import expect
from ..moe.module import PARTS, PROJECTIONS, W4A16Experts
from ..moe.weights import QuantizedExperts

EXPERTS = "experts"


def check_split(module: W4A16Experts, tp: int, name: str = "experts") -> None:
    """W4A16Error unless ``module``'s experts split over ``tp`` ranks."""
    I = module.intermediate_dim
    expect(I % tp == 0, f"{name}: tp", f"a divisor of the experts' intermediate size {I}", tp)
    g = module.group_sizes[1]
    expect(g != -1, f"{name}: down projection", "group-wise scales to split its K over ranks", "per-channel (-1)")
    expect((I // tp) % g == 0, f"{name}: tp", f"a split of I = {I} into parts that are multiples of down's "
           f"group size {g}", tp)


def take(module: W4A16Experts, rank: int, tp: int) -> dict:
    """This rank's buffers {"gate_up_qweight": ..., "down_scales": ...} (zeros absent when None)."""
    I = module.intermediate_dim
    lo, hi = rank * I // tp, (rank + 1) * I // tp
    g = module.group_sizes[1]
    out = {}
    for part in PARTS:
        gu = getattr(module, f"gate_up_{part}")
        if gu is not None:
            out[f"gate_up_{part}"] = torch.cat([gu[:, lo:hi], gu[:, I + lo:I + hi]], 1).contiguous()
        dn = getattr(module, f"down_{part}")
        if dn is not None:
            cols = slice(lo // 2, hi // 2) if part == "qweight" else slice(lo // g, hi // g)
            out[f"down_{part}"] = dn[:, :, cols].contiguous()
    return out


class W4A16ExpertsParallel(ParallelStyle):
    """The experts of a W4A16Experts split over a 1-D mesh (module docstring); its output is the
    all-reduced sum, a plain tensor on every rank."""

    def _apply(self, module, device_mesh: DeviceMesh):
        return self.apply_shard(module, device_mesh)

    def apply_shard(self, module, mesh: DeviceMesh, name: str = "experts", local: Optional[dict] = None):
        """Shard ``module`` in place; ``local``: this rank's buffers already taken (:func:`take`, as
        the checkpoint reader does before the module's placeholder ever holds the whole weights)."""
        expect(isinstance(module, W4A16Experts) and not getattr(module, "tp", None), name,
               "a W4A16Experts not yet sharded", type(module).__name__)
        expect(mesh.ndim == 1, "device_mesh", "a 1-D DeviceMesh (slice a larger mesh, e.g. mesh['tp'])",
               f"{mesh.ndim}-D")
        check_split(module, mesh.size(), name)
        if local is None:
            local = take(module, mesh.get_local_rank(), mesh.size())
        gs = module.group_sizes
        module.set_weights(*(QuantizedExperts(local[f"{p}_qweight"], local[f"{p}_scales"], local.get(f"{p}_zeros"), g)
                             for p, g in zip(PROJECTIONS, gs)))
        module.tp = mesh.size()
        group = mesh.get_group()

        def all_reduce(mod, inputs, out):
            dist.all_reduce(out, group=group)
            return out

        module.register_forward_hook(all_reduce)
        return module

    def __repr__(self) -> str:
        return "W4A16ExpertsParallel()"
