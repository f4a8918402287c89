"""Host-side state shared by the kernel backends: the split-K tile counters and the per-weight
launch-plan caches."""
from __future__ import annotations

import weakref

import torch

_COUNTERS: dict = {}
_BY_TENSOR: "weakref.WeakValueDictionary" = weakref.WeakValueDictionary()  # id(first op tensor) -> prepared
_PLANS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # prepared weight -> {key: plan}
MAX_PLANS = 256  # per weight; many distinct M (e.g. prefill lengths) start its cache afresh


def plans_of(prepared) -> dict:
    """The launch-plan cache of a prepared weight (dropped with it; cleared when it grows past
    MAX_PLANS). Prepared weights are compared by identity."""
    plans = _PLANS.get(prepared)
    if plans is None or len(plans) >= MAX_PLANS:
        plans = _PLANS[prepared] = {}
    return plans


def tile_counters(device: torch.device, tiles: int) -> torch.Tensor:
    """Zeroed int32 counters for the split-K programs of ``tiles`` output tiles: one buffer per
    (device, current stream), grown on demand; the kernel leaves every counter it uses at 0.
    (Launches on one stream are ordered, so they can share a buffer; other streams get their own.)"""
    stream = torch._C._cuda_getCurrentRawStream(device.index) if device.type == "cuda" else 0
    key = (device.type, device.index, stream)
    buf = _COUNTERS.get(key)
    if buf is None or buf.numel() < tiles:
        buf = _COUNTERS[key] = torch.zeros(max(tiles, 4096), dtype=torch.int32, device=device)
    return buf


def remember(backend, prepared) -> None:
    """Let :func:`recall` find ``prepared`` from its op tensors while it is alive (held weakly:
    a weight's replaced layouts are never kept alive here)."""
    tensors = backend.op_tensors(prepared)
    if tensors:
        _BY_TENSOR[id(tensors[0])] = prepared


def recall(backend, tensors) -> object:
    """The live prepared weight whose op tensors are exactly ``tensors`` (by identity), or None."""
    hit = _BY_TENSOR.get(id(tensors[0])) if tensors else None
    if hit is not None:
        mine = backend.op_tensors(hit)
        if len(mine) == len(tensors) and all(a is b for a, b in zip(mine, tensors)):
            return hit
    return None
