"""Tensor-parallel styles for W4A16Linear, for ``torch.distributed.tensor.parallel.parallelize_module``.

    W4A16ColwiseParallel(input_layouts=None, output_layouts=None, use_local_output=True)
    W4A16RowwiseParallel(input_layouts=None, output_layouts=None, use_local_output=True)

They take the options of torch's ``ColwiseParallel`` / ``RowwiseParallel`` and mean the same:
column-wise takes a replicated input and gives an output sharded on the last dimension
(``output_layouts=Replicate()`` gathers it); row-wise takes an input sharded on the last
dimension and gives the all-reduced sum (``Shard(-1)`` reduce-scatters it). Both go through
``distribute_module``: the partition function replaces the layer's tensors with this rank's shard
(:class:`ShardedW4A16Linear`), the input and output functions convert between DTensors and
local tensors at the layer's boundary, and the kernels run on local tensors in between.

Each rank takes its part of its own copy of the layer (torch's ``src_data_rank=None``: nothing is
scattered from rank 0), so every rank must hold the same full weight (the same checkpoint or seed);
:func:`load_sharded` avoids holding the full weight at all. Shard a model on its device: ``.to()``
after sharding is not supported.

In the common case (a plain tensor in the default layout) the input goes straight to the kernel
and the output is a plain tensor (column-wise: as it is; row-wise: summed with
``torch.distributed.all_reduce`` over the mesh's group, what the DTensor redistribution does).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch.distributed.tensor import DeviceMesh, DTensor, Partial, Replicate, Shard, distribute_module
from torch.distributed.tensor.parallel.style import ParallelStyle
from torch.distributed.tensor.placement_types import Placement

from ..errors import expect
from ..fused import FusedW4A16Linear
from ..nn import W4A16Linear
from .module import ShardedW4A16Linear
from .shard import COLWISE, ROWWISE, LocalShard, split_for, take


def _is_last_dim_shard(p: Placement, ndim: int) -> bool:
    return isinstance(p, Shard) and p.dim in (-1, ndim - 1)


def _to_dtensor(x: torch.Tensor, mesh: DeviceMesh, layout: Placement, width: Optional[int] = None) -> DTensor:
    if isinstance(x, DTensor):
        return x
    if width is not None and _is_last_dim_shard(layout, x.dim()):
        shape = (*x.shape[:-1], width)
        return DTensor.from_local(x, mesh, [Shard(x.dim() - 1)], run_check=False, shape=torch.Size(shape),
                                  stride=torch.empty(shape, device="meta").stride())
    return DTensor.from_local(x, mesh, [layout], run_check=False)


def _same(a: Placement, b: Placement, ndim: int) -> bool:
    return a == b or (_is_last_dim_shard(a, ndim) and _is_last_dim_shard(b, ndim))


class W4A16Parallel(ParallelStyle):
    style: str

    def __init__(self, *, input_layouts: Optional[Placement] = None, output_layouts: Optional[Placement] = None,
                 use_local_output: bool = True):
        super().__init__()
        self.input_layouts = input_layouts
        self.output_layouts = output_layouts
        self.use_local_output = use_local_output

    def local_shard(self, module: W4A16Linear, mesh: DeviceMesh, name: str = "weight") -> LocalShard:
        """This rank's shard of ``module`` (W4A16Error when the split is impossible)."""
        w = module.weight_q
        split = split_for(self.style, w.shape, w.group_size, mesh.get_local_rank(), mesh.size(), name,
                          getattr(module, "splits", None))
        return take(w, module.bias, split)

    def check_fused(self, module, name: str) -> None:
        """A fused projection's slices read its local result directly: only the default
        column-wise layouts apply to it."""
        if isinstance(module, FusedW4A16Linear):
            ok = (self.style == COLWISE and self.input_layouts in (None, Replicate())
                  and self.output_layouts in (None, Shard(-1)) and self.use_local_output)
            expect(ok, name, "a column-wise style with the default layouts for a fused projection (its slices "
                   "read the local result; quantize_model(..., fuse=False) keeps the projections apart)", repr(self))

    def _apply(self, module, device_mesh: DeviceMesh):
        return self.apply_shard(module, device_mesh, None)

    def apply_shard(self, module, mesh: DeviceMesh, shard: Optional[LocalShard], name: str = "module"):
        """Shard ``module`` over the 1-D ``mesh`` and install the input/output functions;
        ``shard`` given (a pre-read LocalShard, see ``load_sharded``) is used as this rank's part."""
        expect(isinstance(module, W4A16Linear) and not isinstance(module, ShardedW4A16Linear), name,
               "a W4A16Linear not yet sharded", type(module).__name__)
        expect(mesh.ndim == 1, "device_mesh", "a 1-D DeviceMesh (slice a larger mesh, e.g. mesh['tp'])",
               f"{mesh.ndim}-D")
        self.check_fused(module, name)
        if shard is None:
            shard = self.local_shard(module, mesh, name)

        def partition(sub_name, sub, m):
            if sub is module:
                ShardedW4A16Linear.install(module, shard, self.style, m)

        return distribute_module(module, mesh, partition, self._input_fn, self._output_fn)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(input_layouts={self.input_layouts}, output_layouts={self.output_layouts}, "
                f"use_local_output={self.use_local_output})")


class W4A16ColwiseParallel(W4A16Parallel):
    """Split N: rank r keeps output rows [r*N/tp, (r+1)*N/tp) (codes, scales, zeros, bias); the
    input is replicated (``input_layouts``, default Replicate(), is redistributed to Replicate),
    the output is Shard(-1) unless ``output_layouts`` says otherwise (Replicate(): all-gather).
    Act-order weights keep their whole perm (it is over K). Needs N divisible by tp."""

    style = COLWISE

    def _input_fn(self, mod, inputs, mesh):
        x = inputs[0]
        layout = self.input_layouts or Replicate()
        if not isinstance(x, DTensor) and layout == Replicate():
            return inputs
        x = _to_dtensor(x, mesh, layout, mod.in_features)
        if x.placements != (Replicate(),):
            x = x.redistribute(placements=[Replicate()])
        return (x.to_local(), *inputs[1:])

    def _output_fn(self, mod, out, mesh):
        layout = self.output_layouts or Shard(-1)
        if self.use_local_output and _same(layout, Shard(-1), out.dim()):
            return out
        out = _to_dtensor(out, mesh, Shard(-1), mod.out_features)
        if not _same(out.placements[0], layout, out.dim()):
            out = out.redistribute(placements=[layout])
        return out.to_local() if self.use_local_output else out


class W4A16RowwiseParallel(W4A16Parallel):
    """Split K on group boundaries: rank r keeps stored K positions [r*K/tp, (r+1)*K/tp) (whole
    groups of codes, scales, zeros); the input is Shard(-1) (``input_layouts`` default), the
    partial outputs are summed (output Replicate(), or reduce-scattered for Shard(-1)). The bias
    is added once, by rank 0 in its kernel epilogue, before the sum. Act-order: each rank reads
    the input features ``perm[r*K/tp:(r+1)*K/tp]`` of a replicated input (a sharded input is
    all-gathered first), which is exact. Needs K divisible by tp and K/tp a multiple of the group
    size; per-channel weights (group_size -1) cannot be split row-wise."""

    style = ROWWISE

    def _input_fn(self, mod, inputs, mesh):
        x = inputs[0]
        layout = self.input_layouts or Shard(-1)
        want = Replicate() if mod.input_index is not None else Shard(x.dim() - 1)
        if not isinstance(x, DTensor) and _same(layout, want, x.dim()):
            return inputs
        x = _to_dtensor(x, mesh, layout, mod.in_features)
        if not _same(x.placements[0], want, x.dim()):
            x = x.redistribute(placements=[want])
        return (x.to_local(), *inputs[1:])

    def _output_fn(self, mod, out, mesh):
        layout = self.output_layouts or Replicate()
        if self.use_local_output and layout == Replicate() and not out.requires_grad:
            dist.all_reduce(out, group=mesh.get_group())
            return out
        out = DTensor.from_local(out, mesh, [Partial()], run_check=False)
        out = out.redistribute(placements=[layout])
        return out.to_local() if self.use_local_output else out


STYLES = {COLWISE: W4A16ColwiseParallel, ROWWISE: W4A16RowwiseParallel}
