"""Whole-model conversion: swap every eligible ``nn.Linear`` for a :class:`W4A16Linear`."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Tuple

import torch
from torch import nn
from tqdm.auto import tqdm

from . import spec
from .errors import W4A16Error, expect
from .fused import fuse_projections
from .fused_layer import fuse_decoder_layers
from .nn import W4A16Linear


def format_bytes(n: int) -> str:
    """1536 -> '1.5 KiB'; binary units, one decimal."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{int(size)} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


@dataclass
class QuantizationReport:
    """What a model conversion did.

    Attributes:
        replaced:     names of the modules now W4A16Linear or W4A16Experts, in model order.
        experts:      those of them that are experts modules (W4A16Experts).
        skipped:      name -> reason for every Linear left alone.
        bytes_before: bytes of the replaced layers' original weights (bias not counted).
        bytes_after:  bytes of their quantized storage (codes, scales, zeros, perm).
        missing_keys / unexpected_keys: from loading a checkpoint (empty for quantize_model).
        fused:        names of the fused projections made (``qkv_proj``, ``gate_up_proj``; see
                      :mod:`w4a16.fused`).
        fused_layers: names of the decoder layers whose activation and residual adds run in the
                      GEMMs' epilogues (``fuse="layers"``; see :mod:`w4a16.fused_layer`).
        sharded:      module name -> name of the tensor-parallel style applied (a load with a mesh).
        read_whole:   sharded layers whose checkpoint tensors had to be read whole (a load with a mesh).
    """

    replaced: List[str] = field(default_factory=list)
    experts: List[str] = field(default_factory=list)
    skipped: Dict[str, str] = field(default_factory=dict)
    bytes_before: int = 0
    bytes_after: int = 0
    missing_keys: List[str] = field(default_factory=list)
    unexpected_keys: List[str] = field(default_factory=list)
    fused: List[str] = field(default_factory=list)
    fused_layers: List[str] = field(default_factory=list)
    sharded: Dict[str, str] = field(default_factory=dict)
    read_whole: List[str] = field(default_factory=list)

    @property
    def ratio(self) -> float:
        """bytes_before / bytes_after (0.0 when nothing was replaced)."""
        return self.bytes_before / self.bytes_after if self.bytes_after else 0.0

    def __str__(self) -> str:
        n, e = len(self.replaced) - len(self.experts), len(self.experts)
        moe = f" and {e} experts module{'' if e == 1 else 's'}" if e else ""
        s = (f"quantized {n} Linear layer{'' if n == 1 else 's'}{moe}, {format_bytes(self.bytes_before)} -> "
             f"{format_bytes(self.bytes_after)} ({self.ratio:.1f}x smaller)")
        if self.fused:
            s += f"; fused {len(self.fused)} projection group{'' if len(self.fused) == 1 else 's'}"
        if self.sharded:
            s += f"; {len(self.sharded)} module(s) sharded"
            if self.read_whole:
                s += f" ({len(self.read_whole)} read whole: " + ", ".join(self.read_whole[:3]) + ")"
        if self.skipped:
            s += "; left alone: " + ", ".join(f"{k} ({v})" for k, v in self.skipped.items())
        if self.missing_keys:
            s += f"; {len(self.missing_keys)} missing key(s): " + ", ".join(self.missing_keys[:5])
        if self.unexpected_keys:
            s += f"; {len(self.unexpected_keys)} unexpected key(s): " + ", ".join(self.unexpected_keys[:5])
        return s


def linear_weight_bytes(linear: nn.Module) -> int:
    """Bytes of a Linear's weight (nn.Linear) or quantized storage (W4A16Linear), bias excluded."""
    if isinstance(linear, W4A16Linear):
        perm = 0 if linear.perm is None else linear.perm.numel() * linear.perm.element_size()
        return linear.weight_q.nbytes() + perm
    return linear.weight.numel() * linear.weight.element_size()


def name_matches(name: str, patterns: Iterable[str]) -> Optional[str]:
    """The first pattern naming ``name`` exactly, as its last component, or as a dotted prefix."""
    last = name.rsplit(".", 1)[-1]
    for p in patterns:
        if name == p or last == p or name.startswith(p + "."):
            return p
    return None


def linear_sites(model: nn.Module) -> Dict[int, Tuple[nn.Module, List[Tuple[str, nn.Module, str]]]]:
    """id(module) -> (module, [(full name, parent, attribute), ...]) for every nn.Linear (or
    subclass) below ``model``, shared modules listed once with every place they appear."""
    sites: Dict[int, Tuple[nn.Module, list]] = {}
    parents = dict(model.named_modules(remove_duplicate=False))
    for name, child in model.named_modules(remove_duplicate=False):
        if name and isinstance(child, nn.Linear):
            parent_name, _, attr = name.rpartition(".")
            sites.setdefault(id(child), (child, []))[1].append((name, parents[parent_name], attr))
    return sites


def ineligible_reason(linear: nn.Module, group_size: int) -> Optional[str]:
    """Why ``linear`` cannot be quantized with ``group_size``, or None if it can."""
    if type(linear) is not nn.Linear:
        return f"a subclass of nn.Linear ({type(linear).__name__})"
    K = linear.in_features
    if K % 2:
        return f"in_features {K} is odd"
    if group_size != -1 and K % group_size:
        return f"in_features {K} is not a multiple of group_size {group_size}"
    if not linear.weight.dtype.is_floating_point:
        return f"weight dtype {linear.weight.dtype} is not a float"
    if linear.weight.is_meta:
        return "weight is on the meta device"
    return None


def quantize_model(model: nn.Module, group_size: int = 128, symmetric: bool = True,
                   skip: Iterable[str] = ("lm_head",), dtype: Optional[torch.dtype] = None,
                   progress: bool = True, fuse=True, experts: bool = True) -> QuantizationReport:
    """Replace, in place, every eligible ``nn.Linear`` of ``model`` with ``W4A16Linear.from_linear``,
    and (``experts``) every mixture-of-experts experts module with a :class:`w4a16.moe.W4A16Experts`.

    Eligibility (anything else is left alone and listed in ``report.skipped`` with the reason):
      * the module's type is exactly ``nn.Linear`` (subclasses may read ``.weight`` elsewhere,
        as ``nn.MultiheadAttention`` does with its ``out_proj``);
      * its name is not matched by ``skip``: an entry matches a module name exactly
        (``"model.lm_head"``), as the last component (``"lm_head"``) or as a dotted prefix
        (``"model.layers.0"`` covers ``"model.layers.0.mlp.up"``);
      * in_features is even and a multiple of ``group_size`` (``group_size=-1``, per channel,
        only needs it even);
      * the weight is a float tensor holding real data (not on the meta device) and finite.

    A Linear shared by several parents is quantized once and replaced everywhere. The model
    itself is never replaced, even if it is an ``nn.Linear``.

    Args:
        model: any module; modified in place.
        group_size: 32, 64, 128, 256 or -1.
        symmetric: True -> z = 8; False -> integer zero points per group.
        skip: module names (or last components, or prefixes) to leave alone.
        dtype: fp16/bf16 for scales, zeros, bias and activations; default each layer's dtype if
            fp16/bf16, else fp16.
        progress: show a tqdm progress bar.
        fuse: True: run sibling projections that read the same input (q/k/v, gate/up of Llama-,
            Qwen2- and Mistral-style layers) as one GEMM each (:func:`w4a16.fused.fuse_projections`);
            "layers": also move SiLU(gate) * up and the residual adds of Llama-, Qwen2-, Qwen3- and
            Mistral-style decoder layers into the GEMMs' epilogues
            (:func:`w4a16.fused_layer.fuse_decoder_layers`); False: neither.
        experts: quantize the experts modules of transformers MoE models (3-D ``gate_up_proj``
            [E, 2I, H] and ``down_proj`` [E, H, I], SiLU: Qwen2/3-MoE, Mixtral, DeepSeek-V3, ...);
            one that cannot be converted, and every router, is listed in ``report.skipped``.

    Returns:
        QuantizationReport (replaced names, skipped names with reasons, weight bytes before/after).
    """
    expect(isinstance(model, nn.Module), "model", "a torch.nn.Module", type(model).__name__)
    expect(group_size in spec.SUPPORTED_GROUP_SIZES, "group_size", f"one of {spec.SUPPORTED_GROUP_SIZES}",
           group_size)
    if dtype is not None:
        expect(dtype in spec.ACTIVATION_DTYPES, "dtype", "torch.float16 or torch.bfloat16", dtype)
    expect(fuse is True or fuse is False or fuse == "layers", "fuse", "True, False or 'layers'", repr(fuse))
    skip = (skip,) if isinstance(skip, str) else tuple(skip)
    report = QuantizationReport()
    todo = []
    for module, places in linear_sites(model).values():
        name = places[0][0]
        hit = name_matches(name, skip)
        if hit is None:
            reason = ineligible_reason(module, group_size)
        else:
            reason = "skipped by name" if hit == name else f"skipped by name '{hit}'"
        if reason is None:
            todo.append((module, places))
        else:
            report.skipped[name] = reason
    for module, places in tqdm(todo, desc="w4a16: quantizing", unit="layer", disable=not progress):
        name = places[0][0]
        try:
            new = W4A16Linear.from_linear(module, group_size=group_size, symmetric=symmetric, dtype=dtype)
        except W4A16Error as e:  # e.g. NaN/Inf weights: leave the layer as it is
            report.skipped[name] = str(e)
            continue
        for _, parent, attr in places:
            setattr(parent, attr, new)
        report.replaced.append(name)
        report.bytes_before += linear_weight_bytes(module)
        report.bytes_after += linear_weight_bytes(new)
    if experts:
        from .moe.module import quantize_experts

        done, left = quantize_experts(model, group_size, symmetric, dtype, skip)
        for name, before, after in done:
            report.replaced.append(name)
            report.experts.append(name)
            report.bytes_before += before
            report.bytes_after += after
        report.skipped.update(left)
        for name, m in model.named_modules():
            if "router" in type(m).__name__.lower() and name not in report.skipped:
                report.skipped[name] = "router (kept in floating point: its top-k choice is sensitive)"
    if fuse:
        report.fused = fuse_projections(model)
    if fuse == "layers":
        report.fused_layers = fuse_decoder_layers(model)
    return report
