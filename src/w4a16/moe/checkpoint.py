"""Experts of a 4-bit checkpoint into a model's experts modules.

GPTQ, AWQ and compressed-tensors MoE checkpoints store each expert's projections as separate
quantized Linear layers: ``{experts}.{e}.gate_proj`` / ``up_proj`` / ``down_proj`` (Qwen2/3-MoE,
DeepSeek-V3) or ``{experts}.{e}.w1`` / ``w3`` / ``w2`` (Mixtral: gate, up, down), where a
transformers 5 model holds one experts module with 3-D ``gate_up_proj`` [E, 2I, H] and
``down_proj`` [E, H, I]. Mixtral checkpoints name the block ``block_sparse_moe`` where the model
says ``mlp``. Each expert's layers are read with the format's importer, gate and up stacked row-wise,
and the experts stacked into a :class:`W4A16Experts`.
"""
from __future__ import annotations

import re
from typing import Callable, Dict, List, Tuple

import torch
from torch import nn

from ..errors import W4A16Error, expect
from ..weight import QuantizedWeight, join_parts
from .module import W4A16Experts
from .weights import QuantizedExperts

NAMES = {"gate_proj": "gate", "up_proj": "up", "down_proj": "down", "w1": "gate", "w3": "up", "w2": "down"}
EXPERT = re.compile(r"^(?P<parent>.+)\.(?P<e>\d+)\.(?P<proj>gate_proj|up_proj|down_proj|w1|w3|w2)$")


def _module_name(model: nn.Module, parent: str):
    """The model's experts module for a checkpoint's ``parent`` prefix (``block_sparse_moe`` read as
    ``mlp``), or None."""
    for name in (parent, parent.replace(".block_sparse_moe.", ".mlp.")):
        try:
            m = model.get_submodule(name)
        except AttributeError:
            continue
        if isinstance(getattr(m, "gate_up_proj", None), torch.Tensor) and m.gate_up_proj.dim() == 3:
            return name
    return None


def expert_layers(model: nn.Module, prefixes: List[str]) -> Dict[str, Dict[int, Dict[str, str]]]:
    """{experts module name: {expert: {"gate" | "up" | "down": checkpoint prefix}}} for the
    checkpoint layer ``prefixes`` that belong to an experts module of ``model``."""
    out: Dict[str, Dict[int, Dict[str, str]]] = {}
    for p in prefixes:
        m = EXPERT.match(p)
        name = _module_name(model, m["parent"]) if m else None
        if name is not None:
            out.setdefault(name, {}).setdefault(int(m["e"]), {})[NAMES[m["proj"]]] = p
    return out


def build_experts(model: nn.Module, name: str, layers: Dict[int, Dict[str, str]],
                  build: Callable[[str], object], dtype, device=None, parts: int = 1) -> W4A16Experts:
    """The W4A16Experts for the model's experts module ``name`` from its checkpoint ``layers``;
    ``build(prefix)`` returns the QuantizedWeight of one checkpoint layer. On ``device`` (default:
    the float module's, the CPU for a meta one). ``parts`` > 1: ``build`` gives one rank's part of
    each layer (1 / parts of the intermediate size: gate and up rows, down columns)."""
    module = model.get_submodule(name)
    E, I2, H = module.gate_up_proj.shape
    I2 //= parts
    expect(sorted(layers) == list(range(E)), f"{name} experts in the checkpoint", f"experts 0..{E - 1}",
           f"{sorted(layers)[:8]}{'...' if len(layers) > 8 else ''}")
    parts: Dict[str, List] = {"gate_up": [], "down": []}
    for e in range(E):
        missing = [k for k in ("gate", "up", "down") if k not in layers[e]]
        expect(not missing, f"{name}.{e}", "gate, up and down projections in the checkpoint", f"no {missing}")
        ws = {k: build(layers[e][k]) for k in ("gate", "up", "down")}
        want = {"gate": (I2 // 2, H), "up": (I2 // 2, H), "down": (H, I2 // 2)}
        for k, w in ws.items():
            expect(tuple(w.shape) == want[k], f"{layers[e][k]}", f"a weight of shape {want[k]} (the model's)",
                   tuple(w.shape))
            expect(w.params.perm is None, f"{layers[e][k]}", "experts without act-order (g_idx in the default order)",
                   "an act-order permutation")
        expect(ws["gate"].group_size_effective == ws["up"].group_size_effective, f"{name}.{e}",
               "one group size for gate and up", {k: ws[k].group_size_effective for k in ("gate", "up")})
        parts["gate_up"].append([ws["gate"], ws["up"]])
        parts["down"].append([ws["down"]])
    target = dtype or (module.gate_up_proj.dtype if module.gate_up_proj.dtype in (torch.float16, torch.bfloat16)
                       else parts["down"][0][0].dtype)
    if device is None:
        device = torch.device("cpu") if module.gate_up_proj.is_meta else module.gate_up_proj.device
    return W4A16Experts(*(_stack(parts[k], target, device, f"{name} {k}") for k in ("gate_up", "down")))


def _stack(per_expert: List[List], dtype, device, what: str) -> QuantizedExperts:
    """QuantizedExperts of E experts, each a list of QuantizedWeights stacked row-wise (gate, up)."""
    try:
        rows = [ws[0] if len(ws) == 1 else QuantizedWeight(*join_parts(ws, torch.cat), ws[0].group_size)
                for ws in per_expert]
        return QuantizedExperts.stack(rows).to(device, dtype)
    except W4A16Error as e:
        raise W4A16Error(f"{what}: {e}") from e


def experts_used_keys(layers: Dict[int, Dict[str, str]]) -> List[str]:
    """The checkpoint layer prefixes of one experts module."""
    return [p for e in layers.values() for p in e.values()]


def loaded(model: nn.Module, name: str, new: W4A16Experts) -> Tuple[int, int]:
    """Put ``new`` in place of the experts module ``name``; returns (bytes before, bytes after)."""
    old = model.get_submodule(name)
    before = sum(t.numel() * t.element_size() for t in (old.gate_up_proj, old.down_proj))
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, new)
    return before, new.nbytes()
