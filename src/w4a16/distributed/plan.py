"""apply_tp_plan: shard a quantized model's layers over a tensor-parallel mesh by name.

The default plan is the Megatron split of Llama / Qwen2 / Mistral-style decoder layers (the same
as transformers' ``base_model_tp_plan`` for Llama): q/k/v and gate/up column-wise, o and down
row-wise, so each attention block and each MLP needs one all-reduce, after o_proj and down_proj. The
output head (``lm_head``, usually left in fp16) is split over the vocabulary and its logits
gathered ("colwise_rep", as transformers calls it): it is the largest single weight a decode
step reads (1 GB in fp16 for a 128K vocabulary at hidden 4096), so replicating it would cap
what tensor parallelism saves.

Attention heads: with q/k/v split column-wise each rank holds num_heads/tp query heads and
num_key_value_heads/tp key/value heads. transformers' current attention modules infer the head
count from the projection's width (``view(*shape, -1, head_dim)``) and keep the ratio
``num_key_value_groups``, which the split leaves unchanged, so they need nothing; a module that
stores its head counts as integers (``num_heads``, ``num_key_value_heads``, as older versions
did) has them divided by tp here. Either way tp must divide both head counts, which is checked
(``head_dim`` read from the attention module). The model's ``config`` is left alone: a KV cache
sized from it (e.g. a ``StaticCache``) must be built for the local head count by the caller.
"""
from __future__ import annotations

from fnmatch import fnmatch
from typing import Dict, List, Optional, Tuple, Union

from torch import nn
from torch.distributed.tensor import DeviceMesh, Replicate
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
from torch.distributed.tensor.parallel.style import ParallelStyle

from ..errors import expect, fail
from ..fused import W4A16Slice
from ..fused_layer import DeferredW4A16Linear, W4A16GatedMLP
from ..moe.module import W4A16Experts
from ..nn import W4A16Linear
from .module import ShardedW4A16Linear
from .shard import COLWISE, ROWWISE, LocalShard, split_for

COLWISE_REP = "colwise_rep"   # column-wise, the output gathered on every rank (Replicate)
from .experts import EXPERTS, W4A16ExpertsParallel, check_split
from .styles import STYLES, W4A16Parallel

DEFAULT_TP_PLAN: Dict[str, str] = {
    "self_attn.q_proj": COLWISE,
    "self_attn.k_proj": COLWISE,
    "self_attn.v_proj": COLWISE,
    "self_attn.o_proj": ROWWISE,
    "mlp.gate_proj": COLWISE,
    "mlp.up_proj": COLWISE,
    "mlp.down_proj": ROWWISE,
    "mlp.experts": EXPERTS,
    "lm_head": COLWISE_REP,
}
HEAD_ATTRS = ("num_heads", "num_key_value_heads")
Plan = Dict[str, Union[str, ParallelStyle]]


def pattern_matches(name: str, pattern: str) -> bool:
    """``pattern`` (fnmatch, e.g. ``"layers.*.mlp.up_proj"`` or ``"mlp.up_proj"``) names the module
    ``name`` whole or as its trailing dotted components."""
    return fnmatch(name, pattern) or fnmatch(name, "*." + pattern)


def resolve_style(value: Union[str, ParallelStyle], module: nn.Module, key: str) -> ParallelStyle:
    """The style object for a plan entry: "colwise" / "rowwise" / "colwise_rep" (column-wise with
    the output gathered) give the W4A16 styles for a W4A16Linear and torch's own for an
    ``nn.Linear`` (e.g. an unquantized lm_head)."""
    if isinstance(value, ParallelStyle):
        return value
    expect(value in (COLWISE, ROWWISE, COLWISE_REP, EXPERTS), f"plan[{key!r}]",
           f"{COLWISE!r}, {ROWWISE!r}, {COLWISE_REP!r}, {EXPERTS!r} or a ParallelStyle", repr(value))
    if value == EXPERTS or isinstance(module, W4A16Experts):
        expect(value == EXPERTS and isinstance(module, W4A16Experts), f"plan[{key!r}]",
               f"{EXPERTS!r} for a W4A16Experts module and for it only", f"{value!r} on a {type(module).__name__}")
        return W4A16ExpertsParallel()
    gather = dict(output_layouts=Replicate()) if value == COLWISE_REP else {}
    if isinstance(module, W4A16Linear):
        return STYLES[ROWWISE if value == ROWWISE else COLWISE](**gather)
    expect(isinstance(module, nn.Linear), f"plan[{key!r}]", "to name W4A16Linear or nn.Linear layers only",
           f"a match on a {type(module).__name__}")
    return RowwiseParallel() if value == ROWWISE else ColwiseParallel(**gather)


def plan_targets(model: nn.Module, plan: Plan) -> Dict[str, tuple]:
    """module name -> (style value, plan key) for every module a plan entry names (first entry wins)."""
    out = {}
    for name, _ in model.named_modules():
        if not name:
            continue
        for key, value in plan.items():
            if pattern_matches(name, key):
                out[name] = (value, key)
                break
    return out


def _check_heads(modules: Dict[str, nn.Module], styles: Dict[str, ParallelStyle], tp: int) -> List[nn.Module]:
    """Refuse a column split of q/k/v that cuts a head; return the attention modules to adjust."""
    found = []
    for name, style in styles.items():
        parent_name, _, leaf = name.rpartition(".")
        colwise = isinstance(style, ColwiseParallel) or getattr(style, "style", None) == COLWISE
        if leaf not in ("q_proj", "k_proj", "v_proj") or not colwise:
            continue
        parent = modules.get(parent_name)
        head_dim = getattr(parent, "head_dim", None)
        if not isinstance(head_dim, int) or head_dim <= 0:
            continue
        width = getattr(modules[name], "out_features", 0)
        heads = width // head_dim
        expect(heads % tp == 0, f"{name}: tp",
               f"a divisor of its {heads} heads ({width} outputs / head_dim {head_dim}): a split may not cut a head",
               tp)
        if parent not in found:
            found.append(parent)
    return found


def _fused_targets(modules: Dict[str, nn.Module], planned: Dict[str, ParallelStyle]) -> Dict[str, ParallelStyle]:
    """Plan entries naming the slices of a fused projection (``quantize_model`` fuses q/k/v and
    gate/up by default) become one entry for the fused module: column-wise, member by member.
    Every slice of it must be planned column-wise."""
    out = {}
    for name, style in planned.items():
        module = modules[name]
        if not isinstance(module, W4A16Slice):
            out[name] = style
            continue
        fused = module.fused
        fused_name = next(n for n, m in modules.items() if m is fused)
        siblings = sorted(n for n, m in modules.items() if isinstance(m, W4A16Slice) and m.fused is fused)
        for n in siblings:
            kind = getattr(planned.get(n), "style", None)
            expect(kind == COLWISE, n, f"planned column-wise like the other projections fused into "
                   f"{fused_name} (or quantize_model(..., fuse=False))", repr(planned.get(n)))
        out.setdefault(fused_name, style)
    return out


def resolve_plan(model: nn.Module, plan: Plan, tp: int) -> Dict[str, ParallelStyle]:
    """module name -> style for every module ``plan`` shards (fused projections by the fused
    module's name), after checking that every split is possible (W4A16Error otherwise)."""
    return _resolve(model, plan, tp)[0]


def _resolve(model: nn.Module, plan: Plan, tp: int) -> Tuple[Dict[str, ParallelStyle], List[nn.Module]]:
    expect(isinstance(plan, dict), "plan", "a dict {name pattern: style}", type(plan).__name__)
    modules = dict(model.named_modules())
    planned = {}
    for name, (value, key) in plan_targets(model, plan).items():
        module = modules[name]
        if isinstance(module, ShardedW4A16Linear):
            fail(name, "a layer not yet sharded", "a ShardedW4A16Linear (apply_tp_plan ran twice?)")
        target = module.fused if isinstance(module, W4A16Slice) else module
        planned[name] = resolve_style(value, target, key)
    attention = _check_heads(modules, planned, tp)
    styles = _fused_targets(modules, planned)
    for name, style in styles.items():
        module = modules[name]
        if isinstance(style, W4A16ExpertsParallel):
            check_split(module, tp, name)
        if isinstance(style, W4A16Parallel):
            style.check_fused(module, name)
            w = module.weight_q
            split_for(style.style, w.shape, w.group_size, 0, tp, name, getattr(module, "splits", None))
    return styles, attention


def apply_tp_plan(model: nn.Module, mesh: DeviceMesh, plan: Optional[Plan] = None,
                  shards: Optional[Dict[str, LocalShard]] = None) -> Dict[str, ParallelStyle]:
    """Shard ``model``'s layers over the 1-D ``mesh``, in place, following ``plan``.

    Args:
        model: a quantized model (``w4a16.quantize_model``, ``load_pretrained_quantized``), on
            the mesh's device type (each rank's device, e.g. ``cuda:{local_rank}``). Fused
            projections (``quantize_model`` fuses q/k/v and gate/up by default) are split member
            by member when all their members are planned column-wise.
        mesh: a 1-D DeviceMesh (``init_device_mesh("cuda", (tp,))``).
        plan: {name pattern: "colwise" | "rowwise" | "colwise_rep" | "experts" | a ParallelStyle}
            ("experts": a W4A16Experts split as :mod:`w4a16.distributed.experts` says); a pattern names a module
            whole or as its trailing components, with fnmatch wildcards (``"mlp.up_proj"``,
            ``"model.layers.*.mlp.up_proj"``). Default :data:`DEFAULT_TP_PLAN`. Strings give
            the W4A16 styles for W4A16Linear layers and torch's styles for ``nn.Linear``.
        shards: pre-read local shards by module name (used by ``load_sharded`` and
            ``load_pretrained_quantized``): a LocalShard per layer, a dict of buffers
            (``w4a16.distributed.experts.take``) per experts module.

    Returns:
        module name -> the style applied. Modules no entry names stay replicated (every rank
        runs them whole). A model with fused decoder layers (``quantize_model(fuse="layers")``)
        is refused. Raises W4A16Error, before anything is changed, when a named module
        cannot be split (tp not dividing N, K or the head counts, K/tp not a multiple of the
        group size, a per-channel weight row-wise).
    """
    expect(isinstance(model, nn.Module), "model", "a torch.nn.Module", type(model).__name__)
    fused = next((n for n, m in model.named_modules() if isinstance(m, (W4A16GatedMLP, DeferredW4A16Linear))), None)
    expect(fused is None, "model", "no fused decoder layers (quantize with fuse=True: tensor parallelism splits the "
           "projections, not a layer's epilogue GEMMs)", f"fused decoder layers ({fused})")
    expect(isinstance(mesh, DeviceMesh), "mesh", "a torch.distributed DeviceMesh", type(mesh).__name__)
    expect(mesh.ndim == 1, "mesh", "a 1-D DeviceMesh (slice a larger mesh, e.g. mesh['tp'])", f"{mesh.ndim}-D")
    plan = DEFAULT_TP_PLAN if plan is None else plan
    styles, attention = _resolve(model, plan, mesh.size())
    modules = dict(model.named_modules())
    shards = shards or {}
    for name, style in styles.items():
        if isinstance(style, W4A16Parallel):
            style.apply_shard(modules[name], mesh, shards.get(name), name)
        elif isinstance(style, W4A16ExpertsParallel):
            style.apply_shard(modules[name], mesh, name, shards.get(name))
        else:
            parallelize_module(modules[name], mesh, style)
    tp = mesh.size()
    for attn in attention:
        for attr in HEAD_ATTRS:
            value = attn.__dict__.get(attr)
            if isinstance(value, int) and not isinstance(value, bool):
                setattr(attn, attr, value // tp)
    return styles
