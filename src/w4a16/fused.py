"""Fused projections: sibling W4A16 layers that read the same input run as one GEMM.

Decoder layers of Llama-, Qwen2- and Mistral-style models project the same hidden states with
``q_proj``, ``k_proj`` and ``v_proj``, and with ``gate_proj`` and ``up_proj``. At decode sizes
those are small, memory-bound GEMMs (k and v of Llama-3-8B are 2 MB of codes each) that reach a
fraction of the bandwidth a single larger GEMM does. :func:`fuse_projections` concatenates each
group's rows into one :class:`FusedW4A16Linear` (registered on the parent as ``qkv_proj`` or
``gate_up_proj``) and puts a :class:`W4A16Slice` in each original place, so the model's own
forward keeps working: the first slice called with an input computes the fused GEMM, each slice
returns its columns as a view (no copy), and the result is dropped once every slice has read it.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from torch import nn

from .errors import expect
from .nn import W4A16Linear
from .weight import QuantizedWeight, join_parts

# (fused attribute, member attributes) looked for on every module.
GROUPS: Tuple[Tuple[str, Tuple[str, ...]], ...] = (
    ("qkv_proj", ("q_proj", "k_proj", "v_proj")),
    ("gate_up_proj", ("gate_proj", "up_proj")),
)


class FusedW4A16Linear(W4A16Linear):
    """A W4A16Linear whose output rows are the concatenation of several projections.

    splits: the members' out_features, in order (their sum is out_features). ``forward(x)``
    returns the whole [..., out_features] result; :meth:`part` returns member ``i``'s columns.
    """

    def __init__(self, in_features: int, splits: Sequence[int], **kwargs):
        super().__init__(in_features, int(sum(splits)), **kwargs)
        self.splits = tuple(int(s) for s in splits)
        self._cache: Optional[list] = None  # [x, x's version, parts, slices served]

    @classmethod
    def from_members(cls, members: Sequence[W4A16Linear]) -> "FusedW4A16Linear":
        """Concatenate the rows of ``members`` (same in_features, group size, dtype, device, no
        act-order; symmetric and asymmetric may mix: a symmetric member gets zero points 8)."""
        first = members[0]
        for i, m in enumerate(members):
            expect(isinstance(m, W4A16Linear), f"members[{i}]", "a W4A16Linear", type(m).__name__)
            for attr in ("in_features", "group_size", "dtype"):
                expect(getattr(m, attr) == getattr(first, attr), f"members[{i}].{attr}", getattr(first, attr),
                       getattr(m, attr))
            expect(m.scales.device == first.scales.device, f"members[{i}].device", first.scales.device,
                   m.scales.device)
            expect(m.perm is None, f"members[{i}].perm", "None (act-order projections are not fused)", "a perm")
        codes, scales, zeros = join_parts([m.weight_q for m in members], torch.cat)
        bias = None
        if any(m.bias is not None for m in members):
            bias = torch.cat([m.bias.detach() if m.bias is not None else
                              torch.zeros(m.out_features, dtype=first.dtype, device=first.scales.device)
                              for m in members])
        w = QuantizedWeight.from_plain(codes, scales, zeros, first.group_size)
        backends = {getattr(m, "backend", "auto") for m in members}
        mod = cls(first.in_features, [m.out_features for m in members], bias=bias is not None,
                  group_size=first.group_size, symmetric=zeros is None, dtype=first.dtype, device="meta",
                  backend=backends.pop() if len(backends) == 1 else "auto")
        mod.__dict__["_w"] = w
        mod._buffers.update(scales=w.scales, zeros=w.zeros)
        if bias is not None:
            mod.bias = nn.Parameter(bias.contiguous(), requires_grad=False)
        return mod

    def part(self, x: torch.Tensor, i: int) -> torch.Tensor:
        """Member ``i``'s output [..., splits[i]] for input x [..., in_features]: a view of the
        fused result, computed once per input for all members."""
        # self.__dict__ rather than attribute assignment: nn.Module.__setattr__ costs eager host time
        c = self.__dict__["_cache"]
        compiling = torch.compiler.is_compiling()
        if c is None or c[0] is not x or (not compiling and c[1] != x._version):
            parts = torch.Tensor.split_with_sizes(self.forward(x), self.splits, -1)
            c = self.__dict__["_cache"] = [x, None if compiling else x._version, parts, 0]
        c[3] += 1
        out = c[2][i]
        if c[3] >= len(self.splits):
            self.__dict__["_cache"] = None  # every member has its view: hold nothing between calls
        return out

    def extra_repr(self) -> str:
        return super().extra_repr() + f", splits={self.splits}"


class W4A16Slice(nn.Module):
    """Stands where a fused projection was: ``forward(x)`` is that projection's output, a view of
    the fused GEMM (see :class:`FusedW4A16Linear`). Holds no parameters of its own."""

    def __init__(self, fused: FusedW4A16Linear, index: int, name: str):
        super().__init__()
        object.__setattr__(self, "fused", fused)  # not a submodule: the parent registers it once
        self.index = index
        self.fused_name = name
        self.in_features = fused.in_features
        self.out_features = fused.splits[index]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fused.part(x, self.index)

    def extra_repr(self) -> str:
        return f"{self.fused_name}[{self.index}], out_features={self.out_features}"


def fuse_projections(model: nn.Module, groups=GROUPS) -> List[str]:
    """Fuse every group of sibling W4A16Linear projections of ``model`` (see the module
    docstring); returns the names of the fused modules. A group is fused when all its members
    are W4A16Linear modules that can be concatenated (same in_features, group size, dtype and
    device, no act-order) and the fused name is free; anything else is left as it is."""
    fused = []
    for parent_name, parent in list(model.named_modules()):
        for fused_attr, names in groups:
            members = [getattr(parent, n, None) for n in names]
            if hasattr(parent, fused_attr) or not all(type(m) is W4A16Linear for m in members):
                continue
            first = members[0]
            if any(m.in_features != first.in_features or m.group_size != first.group_size or m.dtype != first.dtype
                   or m.scales.device != first.scales.device or m.perm is not None for m in members):
                continue
            module = FusedW4A16Linear.from_members(members)
            name = f"{parent_name}.{fused_attr}" if parent_name else fused_attr
            parent.add_module(fused_attr, module)
            for i, n in enumerate(names):
                setattr(parent, n, W4A16Slice(module, i, name))
            fused.append(name)
    return fused
