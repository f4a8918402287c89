"""Load a Hugging Face style 4-bit checkpoint directory into a model of ``nn.Linear`` layers.

The directory holds ``config.json`` (with ``quantization_config``) and either ``model.safetensors``
or ``model.safetensors.index.json`` plus its shards. Only safetensors is read (nothing is
unpickled). Supported ``quantization_config`` (anything else raises :class:`W4A16Error` naming the
field, the expected and the actual value):

    quant_method "gptq"                bits 4; checkpoint_format "gptq" (v1) or "gptq_v2";
                                       sym and desc_act any (act-order via g_idx)
    quant_method "awq"                 bits 4; version "gemm"
    quant_method "compressed-tensors"  format "pack-quantized"; every config group: weights
                                       num_bits 4, type "int", strategy "group" or "channel",
                                       no input_activations quantization

Quantized layer tensors (``prefix`` = the Linear's module name; a mixture of experts' per-expert
layers ``{experts}.{e}.gate_proj`` / ``up_proj`` / ``down_proj`` (or Mixtral's ``w1`` / ``w3`` /
``w2``) go to the model's experts module, :mod:`w4a16.moe.checkpoint`):
    GPTQ / AWQ          {prefix}.qweight, .qzeros, .scales, [.g_idx (GPTQ)], [.bias]
    compressed-tensors  {prefix}.weight_packed, .weight_scale, .weight_shape,
                        [.weight_zero_point], [.weight_g_idx], [.bias]
"""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

import torch
from safetensors import SafetensorError
from torch import nn

from . import formats, spec
from .errors import W4A16Error, expect, fail
from .fused import fuse_projections
from .io import open_safetensors
from .model import QuantizationReport, linear_weight_bytes
from .moe.checkpoint import build_experts, expert_layers, experts_used_keys, loaded as put_experts
from .nn import W4A16Linear
from .weight import QuantizedWeight

METHODS = ("gptq", "awq", "compressed-tensors")
MARKER = {"gptq": "qweight", "awq": "qweight", "compressed-tensors": "weight_packed"}
PARTS = {
    "gptq": ("qweight", "qzeros", "scales", "g_idx"),
    "awq": ("qweight", "qzeros", "scales"),
    "compressed-tensors": ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point", "weight_g_idx"),
}
OPTIONAL = {"g_idx", "weight_zero_point", "weight_g_idx"}
QC = "quantization_config"


# ---------------------------------------------------------------------- configuration
def read_quantization_config(path: Union[str, os.PathLike]) -> dict:
    """``config.json["quantization_config"]`` of the checkpoint directory ``path``."""
    cfg_path = Path(path) / "config.json"
    expect(cfg_path.is_file(), "path", "a directory with config.json", os.fspath(path))
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        fail("config.json", "valid JSON", f"a parse error ({e})")
    qc = cfg.get(QC) if isinstance(cfg, dict) else None
    expect(isinstance(qc, dict), f"config.json {QC}", "a JSON object", type(qc).__name__ if qc is not None
           else "none (not a quantized checkpoint)")
    return qc


def parse_quantization_config(qc: dict) -> Tuple[str, dict]:
    """Check ``qc`` is a supported 4-bit configuration; return (quant_method, options) where
    options has ``group_size`` (GPTQ/AWQ; None when not given or compressed-tensors), and for
    GPTQ ``checkpoint_format`` and ``desc_act``."""
    method = str(qc.get("quant_method", "")).lower()
    expect(method in METHODS, f"{QC}.quant_method", f"one of {METHODS}", repr(qc.get("quant_method")))
    if method == "compressed-tensors":
        _check_compressed_tensors(qc)
        return method, {"group_size": None}
    bkey = "bits" if "bits" in qc or "w_bit" not in qc else "w_bit"
    expect(qc.get(bkey) == 4, f"{QC}.{bkey}", 4, qc.get(bkey))
    gkey = "group_size" if "group_size" in qc or "q_group_size" not in qc else "q_group_size"
    group_size = qc.get(gkey)
    expect(group_size is None or group_size in spec.SUPPORTED_GROUP_SIZES, f"{QC}.{gkey}",
           f"one of {spec.SUPPORTED_GROUP_SIZES}", group_size)
    if method == "awq":
        version = str(qc.get("version", "gemm")).lower()
        expect(version == "gemm", f"{QC}.version", "'gemm'", repr(qc.get("version")))
        return method, {"group_size": group_size}
    expect(not qc.get("is_marlin_format", False), f"{QC}.is_marlin_format", False, qc.get("is_marlin_format"))
    fkey = "checkpoint_format" if "checkpoint_format" in qc or "format" not in qc else "format"
    ckpt_format = str(qc.get(fkey, "gptq")).lower()
    expect(ckpt_format in formats.gptq.CHECKPOINT_FORMATS, f"{QC}.{fkey}",
           f"one of {formats.gptq.CHECKPOINT_FORMATS}", repr(qc.get(fkey)))
    return method, {"group_size": group_size, "checkpoint_format": ckpt_format,
                    "desc_act": bool(qc.get("desc_act", False))}


def _check_compressed_tensors(qc: dict) -> None:
    groups = qc.get("config_groups")
    expect(isinstance(groups, dict) and groups, f"{QC}.config_groups", "a non-empty JSON object", groups)
    for name, grp in groups.items():
        arg = f"{QC}.config_groups.{name}"
        expect(isinstance(grp, dict), arg, "a JSON object", grp)
        fkey = f"{arg}.format" if grp.get("format") else f"{QC}.format"
        fmt = grp.get("format") or qc.get("format")
        expect(fmt == "pack-quantized", fkey, "'pack-quantized'", repr(fmt))
        w = grp.get("weights")
        expect(isinstance(w, dict), f"{arg}.weights", "a JSON object", w)
        expect(w.get("num_bits") == 4, f"{arg}.weights.num_bits", 4, w.get("num_bits"))
        expect(w.get("type", "int") == "int", f"{arg}.weights.type", "'int'", repr(w.get("type")))
        expect(w.get("strategy") in ("group", "channel"), f"{arg}.weights.strategy", "'group' or 'channel'",
               repr(w.get("strategy")))
        if w.get("strategy") == "group":
            expect(w.get("group_size") in spec.SUPPORTED_GROUP_SIZES, f"{arg}.weights.group_size",
                   f"one of {spec.SUPPORTED_GROUP_SIZES}", w.get("group_size"))
        expect(grp.get("input_activations") is None, f"{arg}.input_activations",
               "None (weight-only quantization)", grp.get("input_activations"))


# ---------------------------------------------------------------------- tensors on disk
def checkpoint_files(path: Union[str, os.PathLike]) -> List[Path]:
    """The safetensors files of the checkpoint directory: the index's shards or model.safetensors."""
    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map")
        expect(isinstance(weight_map, dict), "model.safetensors.index.json weight_map", "a JSON object",
               type(weight_map).__name__)
        files = [path / f for f in sorted(set(weight_map.values()))]
        for f in files:
            expect(f.is_file(), "model.safetensors.index.json shard", "an existing file", f.name)
        return files
    single = path / "model.safetensors"
    expect(single.is_file(), "path", "a directory with model.safetensors or model.safetensors.index.json",
           os.fspath(path))
    return [single]


class _Tensors:
    """Lazy access to the tensors of a set of safetensors files (kept open inside a ``with``)."""

    def __init__(self, files: List[Path]):
        self.files = files
        self.handles: list = []
        self.where: Dict[str, int] = {}  # key -> index of its file
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> "_Tensors":
        for i, f in enumerate(self.files):
            handle = self._stack.enter_context(open_safetensors(os.fspath(f)))
            self.handles.append(handle)
            for key in handle.keys():
                self.where[key] = i
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def __contains__(self, key: str) -> bool:
        return key in self.where

    def _read(self, key: str, read):
        """``read(handle)`` of ``key``'s file; a file that cannot give the bytes (truncated,
        corrupt) raises W4A16Error naming it and the tensor."""
        i = self.where[key]
        try:
            return read(self.handles[i])
        except (SafetensorError, OSError, RuntimeError) as e:
            fail(f"checkpoint tensor {key!r}", f"readable from {os.fspath(self.files[i])!r}", f"{type(e).__name__}: {e}")

    def get(self, key: str) -> torch.Tensor:
        return self._read(key, lambda h: h.get_tensor(key))

    def shape(self, key: str) -> tuple:
        """The stored shape of ``key`` (from the file header; nothing is read)."""
        return self._read(key, lambda h: tuple(h.get_slice(key).get_shape()))

    def part(self, key: str, index) -> torch.Tensor:
        """``key``[index] (a slice or a tuple of slices), reading only those bytes."""
        return self._read(key, lambda h: h.get_slice(key)[index])

    def keys_by_file(self) -> List[List[str]]:
        out: List[List[str]] = [[] for _ in self.files]
        for key, i in self.where.items():
            out[i].append(key)
        return out


# ---------------------------------------------------------------------- loading
def _build_weight(method: str, opts: dict, t: Dict[str, torch.Tensor]) -> QuantizedWeight:
    if method == "gptq":
        return formats.from_gptq(t["qweight"], t["qzeros"], t["scales"], t.get("g_idx"),
                                 checkpoint_format=opts["checkpoint_format"])
    if method == "awq":
        return formats.from_awq(t["qweight"], t["qzeros"], t["scales"])
    return formats.from_compressed_tensors(t["weight_packed"], t["weight_scale"], t["weight_shape"],
                                           t.get("weight_zero_point"), t.get("weight_g_idx"))


def _present_parts(prefix: str, method: str, opts: dict, ckpt: "_Tensors") -> List[str]:
    """The parts of layer ``prefix`` the checkpoint holds, after checking that every required
    one is there (and g_idx where desc_act says so)."""
    present = [p for p in PARTS[method] if f"{prefix}.{p}" in ckpt]
    for p in PARTS[method]:
        expect(p in present or p in OPTIONAL, f"{prefix}.{p}", "a tensor in the checkpoint", "none")
    expect("g_idx" in present or not opts.get("desc_act"), f"{prefix}.g_idx",
           "a tensor in the checkpoint (desc_act is true)", "none")
    return present


def _built(prefix: str, method: str, opts: dict, tensors: Dict[str, torch.Tensor]) -> QuantizedWeight:
    """The importer's QuantizedWeight of layer ``prefix`` (its errors name the layer)."""
    try:
        return _build_weight(method, opts, tensors)
    except W4A16Error as e:
        raise W4A16Error(f"{prefix}: {e}") from e


def _check_groups(prefix: str, w: QuantizedWeight, opts: dict) -> None:
    """The weight's groups are those quantization_config.group_size names (when it names one)."""
    g_cfg = opts.get("group_size")
    if g_cfg is not None:
        expect(w.group_size_effective == (w.shape[1] if g_cfg == -1 else g_cfg), f"{prefix}.scales",
               f"groups of {g_cfg} (quantization_config.group_size)", f"groups of {w.group_size_effective}")


def _experts(model: nn.Module, name: str, layers: dict, method: str, opts: dict, ckpt: "_Tensors", dtype, reader):
    """The W4A16Experts of the experts module ``name`` from its checkpoint ``layers``; with a
    ``reader`` (a mesh) whose plan splits it, the meta placeholder, the reader keeping this rank's
    part, read as slices of each expert's layers."""
    build = lambda p: _checkpoint_weight(p, method, opts, ckpt)  # noqa: E731
    if reader is None:
        return build_experts(model, name, layers, build, dtype)
    from .distributed.loading import mesh_device
    from .distributed.shard import take
    if not reader.splits_experts(name, layers):   # replicated: whole on every rank
        return build_experts(model, name, layers, build, dtype, torch.device("cpu")).to(mesh_device(reader.mesh))
    E, I2, H = model.get_submodule(name).gate_up_proj.shape
    shape = {p: (H, I2 // 2) if proj == "down" else (I2 // 2, H) for e in layers.values() for proj, p in e.items()}

    def part(prefix: str) -> QuantizedWeight:
        tensors, split, whole = _read_layer(prefix, method, _present_parts(prefix, method, opts, ckpt), ckpt, reader,
                                            *shape[prefix])
        w = _built(prefix, method, opts, tensors)
        _check_groups(prefix, w, opts)
        if whole:
            reader.read_whole.append(prefix)
            w = take(w, None, split).weight
        return w
    return reader.experts(name, build_experts(model, name, layers, part, dtype, torch.device("cpu"), reader.tp))


def _checkpoint_weight(prefix: str, method: str, opts: dict, ckpt: "_Tensors") -> QuantizedWeight:
    """The QuantizedWeight of the checkpoint layer ``prefix``, read whole (an expert's projection)."""
    present = _present_parts(prefix, method, opts, ckpt)
    w = _built(prefix, method, opts, {p: ckpt.get(f"{prefix}.{p}") for p in present})
    _check_groups(prefix, w, opts)
    return w


def _target_module(model: nn.Module, prefix: str) -> Optional[nn.Module]:
    try:
        module = model.get_submodule(prefix)
    except AttributeError:
        return None
    expect(isinstance(module, nn.Linear), f"model module {prefix!r}", "an nn.Linear (the checkpoint quantizes it)",
           type(module).__name__)
    return module


def _read_layer(prefix, method, present, ckpt: _Tensors, reader, N: int, K: int):
    """(the layer's tensors, its Split or None, read whole?): everything when the layer is not
    sharded (``reader`` None or the plan leaves it alone), else this rank's slices when the
    format allows (see :mod:`w4a16.distributed.hf_shards`)."""
    split = None if reader is None else reader.split_of(prefix, method, ckpt.shape, N, K)
    if split is not None:
        from .distributed.hf_shards import G_IDX, groups_in_checkpoint, sliced_tensors
        from .formats._common import perm_from_g_idx
        gi = G_IDX[method]
        g_idx = ckpt.get(f"{prefix}.{gi}") if gi in present else None
        G = groups_in_checkpoint(method, ckpt.shape, prefix)
        if g_idx is not None and perm_from_g_idx(g_idx, K, G, K // G, f"{prefix}.{gi}") is None:
            g_idx = None   # the default order: not act-order
        tensors = sliced_tensors(method, lambda p, index: ckpt.part(f"{prefix}.{p}", index), present, split, N, K,
                                 g_idx)
        if tensors is not None:
            return tensors, split, False
    return {p: ckpt.get(f"{prefix}.{p}") for p in present}, split, split is not None


def _quantized_layer(model, prefix, method, opts, ckpt: _Tensors, dtype, report,
                     reader=None) -> Optional[W4A16Linear]:
    """Build the W4A16Linear for ``prefix`` (None when the model has no such module); with a
    ``reader`` (a tensor-parallel load) a layer the plan shards becomes a placeholder and its
    local shard goes to the reader."""
    module = _target_module(model, prefix)
    if module is None:
        return None
    present = _present_parts(prefix, method, opts, ckpt)
    N, K = module.out_features, module.in_features
    tensors, split, whole = _read_layer(prefix, method, present, ckpt, reader, N, K)
    w = _built(prefix, method, opts, tensors)
    local = split is not None and not whole   # what was read is this rank's part only
    rows = split.rows[0] if local and split.style == "colwise" else slice(0, N)
    cols = split.cols if local and split.style != "colwise" else slice(0, K)
    shape = (rows.stop - rows.start, cols.stop - cols.start)
    expect(w.shape == shape, f"{prefix}.{MARKER[method]}", f"a weight of shape (N, K) = {(N, K)} (the model's)",
           w.shape if not local else f"a part of shape {w.shape} (expected {shape})")
    _check_groups(prefix, w, opts)
    target = dtype or (module.weight.dtype if module.weight.dtype in spec.ACTIVATION_DTYPES else w.dtype)
    if split is not None:
        device = reader.device(module)
    else:
        device = torch.device("cpu") if module.weight.is_meta else module.weight.device
    scales, zeros, perm = w.params   # validated by the importer: moved and converted, not checked again
    w = QuantizedWeight(w.plain_codes().to(device), scales.to(device, target),
                        None if zeros is None else zeros.to(device, target), w.group_size,
                        None if perm is None else perm.to(device))
    key = f"{prefix}.bias"
    bias = ckpt.part(key, rows) if key in ckpt else None
    if module.bias is None and bias is not None and bool((bias != 0).any()):
        report.unexpected_keys.append(key)
    if module.bias is not None and bias is None:
        report.missing_keys.append(key)
        bias = module.bias.detach()[rows]
    bias = bias if module.bias is not None else None
    if split is not None:
        bias = None if bias is None else bias.to(device, target)
        return reader.placeholder(prefix, module, reader.local(w, bias, split, whole), whole)
    return W4A16Linear.from_quantized(w, bias)


def _load_rest(model: nn.Module, ckpt: _Tensors, used: set, report: QuantizationReport) -> set:
    """Load every unused checkpoint tensor whose key the model has (one file at a time, like
    ``load_state_dict(strict=False)``); others go to ``report.unexpected_keys``. Returns the keys loaded."""
    own = model.state_dict(keep_vars=True)
    loaded: set = set()
    for keys in ckpt.keys_by_file():
        chunk = {}
        for key in sorted(keys):
            if key in used:
                continue
            if key not in own:
                report.unexpected_keys.append(key)
                continue
            t = ckpt.get(key)
            expect(tuple(t.shape) == tuple(own[key].shape), key, f"shape {tuple(own[key].shape)} (the model's)",
                   tuple(t.shape))
            chunk[key] = t
        if chunk:
            model.load_state_dict(chunk, strict=False)
            loaded.update(chunk)
    return loaded


def load_pretrained_quantized(model: nn.Module, path: Union[str, os.PathLike],
                              dtype: Optional[torch.dtype] = None, fuse: bool = True,
                              mesh=None, plan=None) -> QuantizationReport:
    """Load the 4-bit checkpoint directory ``path`` into ``model``, in place.

    Every ``nn.Linear`` whose quantized tensors the checkpoint holds (matched by module name) is
    replaced by a :class:`W4A16Linear` (with the checkpoint's bias, if any); every other tensor of
    the checkpoint is copied into the model as ``model.load_state_dict(..., strict=False)`` would.

    Args:
        model: the float model the checkpoint was made from (any device but meta); modified in place.
        path: the checkpoint directory (config.json + model.safetensors or an index and shards).
        dtype: fp16/bf16 for the new layers' scales, zeros and bias; default each Linear's dtype
            when that is fp16/bf16, else the checkpoint's scales dtype.
        fuse: then run sibling projections (q/k/v, gate/up) as one GEMM each, as
            :func:`w4a16.quantize_model` does (act-order layers stay separate).
        mesh: a 1-D ``DeviceMesh`` to shard the model over (tensor parallelism; call it on every
            rank with the same model): each rank reads only its part of every layer ``plan``
            shards (:mod:`w4a16.distributed.hf_shards` lists the slices; a mixture of experts'
            per-expert layers are split as its experts module is), then the model is sharded as
            :func:`w4a16.distributed.apply_tp_plan` does. None: no sharding.
        plan: the tensor-parallel plan (default ``w4a16.distributed.DEFAULT_TP_PLAN``); only
            with ``mesh``.

    Returns:
        QuantizationReport: replaced layers, Linear layers left alone (no quantized tensors),
        weight bytes before/after (of the whole layers), the missing / unexpected checkpoint
        keys, and with a mesh the styles applied (``sharded``) and the sharded layers that had
        to be read whole (``read_whole``).
    """
    expect(isinstance(model, nn.Module), "model", "a torch.nn.Module", type(model).__name__)
    if dtype is not None:
        expect(dtype in spec.ACTIVATION_DTYPES, "dtype", "torch.float16 or torch.bfloat16", dtype)
    expect(plan is None or mesh is not None, "plan", "None unless a mesh is given", "a plan without a mesh")
    method, opts = parse_quantization_config(read_quantization_config(path))
    report = QuantizationReport()
    reader = None
    if mesh is not None:
        from .distributed.hf_shards import ShardReader
        reader = ShardReader(model, mesh, plan)
    suffix = "." + MARKER[method]
    with _Tensors(checkpoint_files(path)) as ckpt:
        prefixes = [k[: -len(suffix)] for k in sorted(ckpt.where) if k.endswith(suffix)]
        expect(bool(prefixes), "checkpoint", f"tensors named '*{suffix}' ({method})", "none")
        order = {name: i for i, (name, _) in enumerate(model.named_modules())}
        prefixes.sort(key=lambda p: (order.get(p, len(order)), p))
        experts = expert_layers(model, prefixes)
        in_experts = {p for layers in experts.values() for p in experts_used_keys(layers)}
        first = prefixes[0]
        prefixes = [p for p in prefixes if p not in in_experts]
        # build every layer first, so that a bad tensor leaves the model untouched
        built_experts = [(name, _experts(model, name, layers, method, opts, ckpt, dtype, reader))
                         for name, layers in experts.items()]
        built = [(p, _quantized_layer(model, p, method, opts, ckpt, dtype, report, reader)) for p in prefixes]
        built = [(p, new) for p, new in built if new is not None]
        expect(bool(built) or bool(built_experts), "checkpoint tensor names",
               f"quantized layers named after the model's modules (e.g. {first!r})", "none matching")
        used: set = set()
        for name, new in built_experts:
            before, after = put_experts(model, name, new)
            report.replaced.append(name)
            report.experts.append(name)
            report.bytes_before += before
            report.bytes_after += after
            # an expert's bias has no place in W4A16Experts: left out of ``used``, it is reported unexpected
            used.update(f"{p}.{part}" for p in experts_used_keys(experts[name]) for part in PARTS[method]
                        if f"{p}.{part}" in ckpt)
        for prefix, new in built:
            parent_name, _, attr = prefix.rpartition(".")
            old = model.get_submodule(prefix)
            setattr(model.get_submodule(parent_name) if parent_name else model, attr, new)
            report.replaced.append(prefix)
            report.bytes_before += linear_weight_bytes(old)
            report.bytes_after += linear_weight_bytes(new)
            used.update(f"{prefix}.{p}" for p in PARTS[method] + ("bias",) if f"{prefix}.{p}" in ckpt)
        loaded = _load_rest(model, ckpt, used, report)
    replaced = set(report.replaced)
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            report.skipped[name] = "no quantized tensors in the checkpoint"
    for key in model.state_dict():
        owner = key.rpartition(".")[0]
        if key not in loaded and owner not in replaced and key not in report.missing_keys:
            report.missing_keys.append(key)
    if fuse:
        report.fused = fuse_projections(model)
    if reader is not None:
        report.sharded = {name: type(style).__name__ for name, style in reader.finish(model).items()}
        report.read_whole = list(reader.read_whole)
    return report
