"""ShardedW4A16Linear: a W4A16Linear after a tensor-parallel style has sharded it.

The kernels run on plain local tensors: ``weight_q`` is this rank's shard as a QuantizedWeight of
the local shape, and ``forward`` maps a local input to a local output. The module's buffers
(``scales``, ``zeros``, ``perm``), its ``bias`` and the ``qweight`` of its state dict are DTensors
of the global shape over the same local storage, so ``state_dict()`` describes the whole layer
the way torch's own tensor-parallel styles leave ``nn.Linear`` (``full_tensor()`` gathers it;
``torch.distributed.checkpoint`` can save it). ``in_features`` / ``out_features`` stay global.

Layout (tp ranks, rank r):
    column-wise: codes/scales/zeros/bias Shard(0) (rows [r*N/tp, (r+1)*N/tp)), perm Replicate.
    row-wise:    codes/scales/zeros Shard(1) (stored K positions [r*K/tp, (r+1)*K/tp), whole
                 groups), bias Replicate (added once, by rank 0, in the kernel's epilogue,
                 before the partial sums are reduced), perm Replicate; with act-order the local
                 input is ``x[..., perm[r*K/tp:(r+1)*K/tp]]`` (``input_index``), exact.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.distributed.tensor import DeviceMesh, DTensor, Replicate, Shard

from ..errors import fail
from ..fused import FusedW4A16Linear
from ..nn import W4A16Linear
from ..ops import gemm
from ..weight import QuantizedWeight
from .shard import COLWISE, LocalShard


def _global(local: torch.Tensor, mesh: DeviceMesh, placement, shape) -> DTensor:
    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(local, mesh, [placement], run_check=False, shape=torch.Size(shape), stride=stride)


class ShardedW4A16Linear(W4A16Linear):
    """A W4A16Linear holding one tensor-parallel shard (see the module docstring).

    Attributes beyond W4A16Linear's: ``tp_style`` ("colwise" / "rowwise"), ``tp_rank``,
    ``tp_size``, ``local_shape`` (N, K) of ``weight_q``, ``input_index`` (int64 [K/tp] for a
    row-wise act-order shard, else None).
    """

    @classmethod
    def install(cls, module: W4A16Linear, shard: LocalShard, style: str, mesh: DeviceMesh) -> "ShardedW4A16Linear":
        """Turn ``module`` (a W4A16Linear of the global shape) into this class in place, holding
        ``shard``: the object keeps its identity, hooks and place in the model and only its class
        changes (as FSDP2's ``fully_shard`` does). Its previous codes, scales and zeros are released."""
        N, K = module.out_features, module.in_features
        rank, tp = mesh.get_local_rank(), mesh.size()
        w = shard.weight
        placement = Shard(0) if style == COLWISE else Shard(1)
        d = module.__dict__
        d["_w"] = w
        d["tp_style"], d["tp_rank"], d["tp_size"], d["local_shape"] = style, rank, tp, w.shape
        d["input_index"] = shard.input_index
        d["_tp_mesh"] = mesh
        groups = w.scales.shape[1] * (tp if style != COLWISE else 1)
        module._buffers["scales"] = _global(w.scales, mesh, placement, (N, groups))
        module._buffers["zeros"] = None if w.zeros is None else _global(w.zeros, mesh, placement, (N, groups))
        perm = w.perm if style == COLWISE else shard.perm
        module._buffers["perm"] = None if perm is None else _global(perm, mesh, Replicate(), (K,))
        bias = shard.bias
        if bias is not None:
            bias = bias.to(device=w.device, dtype=w.dtype)
            module._parameters["bias"] = nn.Parameter(
                _global(bias, mesh, Shard(0) if style == COLWISE else Replicate(), (N,)), requires_grad=False)
        else:
            module._parameters["bias"] = None
        d["_local_bias"] = bias if (style == COLWISE or rank == 0) else None
        if isinstance(module, FusedW4A16Linear):
            d["splits"], d["_cache"] = tuple(s // tp for s in module.splits), None
            cls = ShardedFusedW4A16Linear
        module.__class__ = cls
        return module

    # ------------------------------------------------------------------ compute
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: the local input (column-wise: [..., K], replicated; row-wise: [..., K/tp], this
        rank's slice, or [..., K] replicated with act-order) -> the local output [..., N/tp]
        (column-wise) or this rank's partial sum [..., N] (row-wise)."""
        if self.input_index is not None:
            x = x.index_select(-1, self.input_index)
        return gemm(x, self._w, self._local_bias, backend=self.backend)

    # ------------------------------------------------------------------ state
    def __setattr__(self, name, value):
        if name in ("scales", "zeros", "perm", "bias", "qweight") and "_w" in self.__dict__:
            fail(name, "no assignment on a tensor-parallel W4A16 layer (its tensors are shards)",
                 "an assignment")
        super().__setattr__(name, value)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        codes = self._w.plain_codes() if keep_vars else self._w.plain_codes().detach()
        N, K = self.out_features, self.in_features
        placement = Shard(0) if self.tp_style == COLWISE else Shard(1)
        destination[prefix + "qweight"] = _global(codes, self._tp_mesh, placement, (N, K // 2))
        nn.Module._save_to_state_dict(self, destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        fail(f"{prefix}load_state_dict", "no state-dict load on a tensor-parallel W4A16 layer "
             "(load the checkpoint with w4a16.distributed.load_sharded, or before apply_tp_plan)",
             "a load_state_dict call")

    def _apply(self, fn, *args, **kwargs):
        nn.Module._apply(self, fn, *args, **kwargs)
        local = lambda t: None if t is None else (t.to_local() if isinstance(t, DTensor) else t)  # noqa: E731
        w = self._w
        codes = fn(w.plain_codes())
        scales, zeros = local(self._buffers["scales"]), local(self._buffers["zeros"])
        perm = local(self._buffers["perm"]) if self.tp_style == COLWISE else None
        d = self.__dict__
        d["_w"] = QuantizedWeight(codes, scales, zeros, w.group_size, perm)
        bias = local(self._parameters["bias"])
        d["_local_bias"] = bias if (self.tp_style == COLWISE or self.tp_rank == 0) else None
        if self.input_index is not None:
            d["input_index"] = self.input_index.to(codes.device)
        return self

    @property
    def weight_q(self) -> QuantizedWeight:
        """This rank's shard (local shape ``local_shape``), the object ``forward`` runs."""
        return self._w

    def extra_repr(self) -> str:
        return (super().extra_repr() + f", tp={self.tp_style} rank {self.tp_rank}/{self.tp_size}, "
                f"local_shape={self.local_shape}")


class ShardedFusedW4A16Linear(ShardedW4A16Linear, FusedW4A16Linear):
    """A fused projection (``w4a16.fused``) split column-wise member by member: rank r keeps rows
    [r*s/tp, (r+1)*s/tp) of each member of width s, concatenated in member order, and ``splits``
    holds the local widths, so each W4A16Slice still returns its own projection's local columns.
    Its state dict's DTensors put the ranks' blocks one after the other (rank-major), not in the
    unsharded fused order."""
