"""Tensor-parallel loading of Hugging Face 4-bit checkpoints: each rank reads its part of every
layer the plan shards, straight from the safetensors files (``get_slice``).

``w4a16.load_pretrained_quantized(model, path, mesh=mesh)`` uses a :class:`ShardReader`. What a
rank reads of one layer (N outputs, K inputs, G groups; rank r keeps rows [n0, n1) column-wise,
or K positions [k0, k1) and groups [g0, g1) row-wise):

    format              tensor               column-wise          row-wise
    GPTQ                qweight [K/8, N]     [:, n0:n1]           [k0/8:k1/8]
                        scales  [G, N]       [:, n0:n1]           [g0:g1]
                        qzeros  [G, N/8]     [:, n0/8:n1/8]       [g0:g1]
                        g_idx   [K]          whole                whole (checked, then dropped)
    AWQ                 qweight [K, N/8]     [:, n0/8:n1/8]       [k0:k1]
                        scales  [G, N]       [:, n0:n1]           [g0:g1]
                        qzeros  [G, N/8]     [:, n0/8:n1/8]       [g0:g1]
    compressed-tensors  weight_packed [N, K/8]      [n0:n1]       [:, k0/8:k1/8]
                        weight_scale [N, G]         [n0:n1]       [:, g0:g1]
                        weight_zero_point [N/8, G]  [n0/8:n1/8]   [:, g0:g1]
                        weight_g_idx [K]            whole         whole (checked, then dropped)
    bias [N]                                 [n0:n1]              whole

A layer whose part is not such a slice is read whole and split in memory (exact, listed in
``report.read_whole``): act-order weights (a g_idx other than ``arange(K) // g``) split row-wise,
whose stored K order is the permuted one, and column-wise splits with n0 or n1 not a multiple of
8 where a format packs 8 outputs per int32. Tensors of layers the plan does not shard, and every
other tensor (embeddings, norms, an fp16 lm_head), are read whole. A mixture of experts'
per-expert layers are split as its experts module is (:mod:`w4a16.distributed.experts`): each
expert's gate and up column-wise, its down row-wise, read as slices like any such layer.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DeviceMesh

from ..errors import expect
from ..fused import FusedW4A16Linear, W4A16Slice
from ..moe.module import PARTS, W4A16Experts
from ..moe.weights import QuantizedExperts
from ..nn import W4A16Linear
from ..weight import QuantizedWeight
from .experts import EXPERTS, W4A16ExpertsParallel
from .loading import mesh_device
from .plan import COLWISE_REP, DEFAULT_TP_PLAN, Plan, apply_tp_plan, plan_targets
from .shard import COLWISE, ROWWISE, LocalShard, Split, split_for, take
from .styles import W4A16Parallel

PACKS_N = {"gptq": ("qzeros",), "awq": ("qweight", "qzeros"), "compressed-tensors": ("weight_zero_point",)}
G_IDX = {"gptq": "g_idx", "awq": None, "compressed-tensors": "weight_g_idx"}


def groups_in_checkpoint(method: str, shape_of, prefix: str) -> int:
    """G of a layer from its scales' stored shape (read from the file header, not the data)."""
    if method == "compressed-tensors":
        return shape_of(f"{prefix}.weight_scale")[1]
    return shape_of(f"{prefix}.scales")[0]


def sliced_tensors(method: str, get, present: List[str], split: Split, N: int, K: int,
                   g_idx: Optional[torch.Tensor]) -> Optional[Dict[str, torch.Tensor]]:
    """The format's tensors of this rank's part, read by ``get(part, index)`` (a safetensors
    slice), or None when the part is not a slice of them (see the module docstring).

    g_idx: the layer's g_idx read whole (None when it has none or it is ``arange(K) // g``)."""
    col = split.style == COLWISE
    n0, n1 = split.rows[0].start, split.rows[0].stop
    k0, k1, g0, g1 = split.cols.start, split.cols.stop, split.groups.start, split.groups.stop
    if not col and (g_idx is not None or k0 % 8 or k1 % 8):
        return None
    if col and (n0 % 8 or n1 % 8) and any(p in present for p in PACKS_N[method]):
        return None
    all_ = slice(None)
    out: Dict[str, torch.Tensor] = {}
    if method == "gptq":
        out["qweight"] = get("qweight", (all_, slice(n0, n1)) if col else slice(k0 // 8, k1 // 8))
        out["scales"] = get("scales", (all_, slice(n0, n1)) if col else slice(g0, g1))
        out["qzeros"] = get("qzeros", (all_, slice(n0 // 8, n1 // 8)) if col else slice(g0, g1))
        if col and g_idx is not None:
            out["g_idx"] = g_idx
    elif method == "awq":
        out["qweight"] = get("qweight", (all_, slice(n0 // 8, n1 // 8)) if col else slice(k0, k1))
        out["scales"] = get("scales", (all_, slice(n0, n1)) if col else slice(g0, g1))
        out["qzeros"] = get("qzeros", (all_, slice(n0 // 8, n1 // 8)) if col else slice(g0, g1))
    else:
        out["weight_packed"] = get("weight_packed", slice(n0, n1) if col else (all_, slice(k0 // 8, k1 // 8)))
        out["weight_scale"] = get("weight_scale", slice(n0, n1) if col else (all_, slice(g0, g1)))
        if "weight_zero_point" in present:
            out["weight_zero_point"] = get("weight_zero_point", slice(n0 // 8, n1 // 8) if col else (all_, slice(g0, g1)))
        out["weight_shape"] = torch.tensor([n1 - n0, K] if col else [N, k1 - k0])
        if col and g_idx is not None:
            out["weight_g_idx"] = g_idx
    return out


def layer_group(group: int, part_k: int, layer_k: int) -> int:
    """The group size of a layer of ``layer_k`` inputs whose row-wise part of ``part_k`` was read
    with ``group``: a part holding one group reads as per-channel (-1), but the layer's group is
    that part's K."""
    return part_k if group == -1 and part_k < layer_k else group


class ShardReader:
    """Reads each planned layer's local shard while ``load_pretrained_quantized`` builds the model,
    then shards the model (:meth:`finish`). Layers it reads become W4A16Linear placeholders of
    the global shape on the meta device until :func:`apply_tp_plan` installs their shards."""

    def __init__(self, model: nn.Module, mesh: DeviceMesh, plan: Optional[Plan]):
        expect(isinstance(mesh, DeviceMesh) and mesh.ndim == 1, "mesh", "a 1-D DeviceMesh",
               f"{mesh.ndim}-D" if isinstance(mesh, DeviceMesh) else type(mesh).__name__)
        self.mesh = mesh
        self.plan = DEFAULT_TP_PLAN if plan is None else plan
        self.rank, self.tp = mesh.get_local_rank(), mesh.size()
        self.targets = plan_targets(model, self.plan)
        self.shards: Dict[str, LocalShard] = {}
        self.read_whole: List[str] = []

    def style_of(self, prefix: str) -> Optional[str]:
        """COLWISE / ROWWISE when the plan shards layer ``prefix`` with a W4A16 style, else None."""
        value = self.targets.get(prefix, (None,))[0]
        if isinstance(value, W4A16Parallel):
            return value.style
        if value in (COLWISE, COLWISE_REP):
            return COLWISE
        return ROWWISE if value == ROWWISE else None

    def split_of(self, prefix: str, method: str, shape_of, N: int, K: int) -> Optional[Split]:
        style = self.style_of(prefix)
        if style is None:
            return None
        G = groups_in_checkpoint(method, shape_of, prefix)
        group = -1 if G == 1 else K // max(G, 1)
        return split_for(style, (N, K), group, self.rank, self.tp, prefix)

    def device(self, module: nn.Linear) -> torch.device:
        if not module.weight.is_meta and module.weight.device.type == self.mesh.device_type:
            return module.weight.device
        return mesh_device(self.mesh)

    def splits_experts(self, name: str, layers: Dict[int, Dict[str, str]]) -> bool:
        """Whether the plan splits the experts module ``name``; if so, each expert's checkpoint
        layers (``layers``: {expert: {"gate" | "up" | "down": prefix}}) are planned as the split
        has them (gate and up column-wise, down row-wise), so that they are read as slices."""
        value = self.targets.get(name, (None,))[0]
        if not (value == EXPERTS or isinstance(value, W4A16ExpertsParallel)):
            return False
        for projs in layers.values():
            for proj, prefix in projs.items():
                self.targets[prefix] = (ROWWISE if proj == "down" else COLWISE, name)
        return True

    def experts(self, name: str, local: W4A16Experts) -> W4A16Experts:
        """Keep ``local`` (this rank's part of the experts module ``name``, read as slices of each
        expert's layers) for :meth:`finish` on the rank's device, zero points alike on every rank;
        returns the meta W4A16Experts of the global shape that stands in the model until then."""
        dev = mesh_device(self.mesh)
        gu, dn = local.weights()
        if self._on_any_rank(gu.zeros is not None or dn.zeros is not None):
            gu, dn = (QuantizedExperts(w.qweight, w.scales, w.zeros if w.zeros is not None else torch.full_like(
                w.scales, 8), w.group_size) for w in (gu, dn))
        g_down = layer_group(dn.group_size, dn.shape[2], dn.shape[2] * self.tp)
        self.shards[name] = {f"{p}_{part}": getattr(w, part).to(dev) for p, w in (("gate_up", gu), ("down", dn))
                             for part in PARTS if getattr(w, part) is not None}
        meta = lambda t, dim: None if t is None else torch.empty(  # noqa: E731
            [n * self.tp if i == dim else n for i, n in enumerate(t.shape)], dtype=t.dtype, device="meta")
        return W4A16Experts(QuantizedExperts(meta(gu.qweight, 1), meta(gu.scales, 1), meta(gu.zeros, 1), gu.group_size),
                            QuantizedExperts(meta(dn.qweight, 2), meta(dn.scales, 2), meta(dn.zeros, 2), g_down))

    def placeholder(self, prefix: str, module: nn.Linear, shard: LocalShard, whole: bool) -> W4A16Linear:
        """Record ``shard`` for ``prefix`` and return the meta W4A16Linear of the global shape that
        stands in the model until :meth:`finish`. Zero points: a layer is asymmetric on every
        rank if its shard is on any (a slice may happen to hold only symmetric groups)."""
        w = shard.weight
        asymmetric = self._on_any_rank(w.zeros is not None)
        if asymmetric and w.zeros is None:
            w = QuantizedWeight.from_plain(w.plain_codes(), w.scales, torch.full_like(w.scales, 8), w.group_size,
                                           w.perm)
            shard = shard._replace(weight=w)
        self.shards[prefix] = shard
        if whole:
            self.read_whole.append(prefix)
        return W4A16Linear(module.in_features, module.out_features, bias=module.bias is not None,
                           group_size=layer_group(w.group_size, w.shape[1], module.in_features),
                           symmetric=not asymmetric, dtype=w.scales.dtype, device="meta")

    def _on_any_rank(self, value: bool) -> bool:
        """Whether ``value`` holds on any rank of the mesh (one all-reduce on the rank's device)."""
        flag = torch.tensor([int(value)], device=mesh_device(self.mesh))
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.mesh.get_group())
        return bool(flag.item())

    def local(self, w: QuantizedWeight, bias: Optional[torch.Tensor], split: Split, whole: bool) -> LocalShard:
        """The LocalShard from what was read: ``w`` and ``bias`` are already this rank's part, or
        (``whole``) the full layer, split here."""
        if whole:
            return take(w, bias, split)
        return LocalShard(w, bias)

    def finish(self, model: nn.Module) -> dict:
        """Give each fused projection the concatenation of its members' shards, shard the model
        with :func:`apply_tp_plan`, and check that no placeholder is left. Returns the styles."""
        modules = dict(model.named_modules())
        for name, module in modules.items():
            if not isinstance(module, FusedW4A16Linear) or name in self.shards:
                continue
            members = sorted(((m.index, n) for n, m in modules.items() if isinstance(m, W4A16Slice) and m.fused is module))
            parts = [self.shards.pop(n) for _, n in members if n in self.shards]
            if not parts:
                continue
            expect(len(parts) == len(members), name, "all its members sharded alike", f"{len(parts)} of {len(members)}")
            ws = [p.weight for p in parts]
            asym = any(w.zeros is not None for w in ws)
            zeros = torch.cat([w.zeros if w.zeros is not None else torch.full_like(w.scales, 8) for w in ws]) \
                if asym else None
            fused = QuantizedWeight.from_plain(torch.cat([w.plain_codes() for w in ws]), torch.cat([w.scales for w in ws]),
                                               zeros, ws[0].group_size)
            bias = None if parts[0].bias is None else torch.cat([p.bias for p in parts])
            self.shards[name] = LocalShard(fused, bias)
        styles = apply_tp_plan(model, self.mesh, self.plan, shards=self.shards)
        left = [n for n, m in model.named_modules() if isinstance(m, W4A16Linear) and m.scales.is_meta
                or isinstance(m, W4A16Experts) and m.gate_up_qweight.is_meta]
        expect(not left, "plan", "to shard every layer it names (each was read as a shard)", f"unsharded: {left[:4]}")
        return styles
