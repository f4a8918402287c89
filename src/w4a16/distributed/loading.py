"""load_sharded: read a saved quantized model straight into its tensor-parallel shards.

Each rank opens the safetensors file (memory-mapped) and, for every layer the plan shards, reads
only its own rows (column-wise) or its own code-byte and group columns (row-wise) with
``safe_open(...).get_slice(name)[a:b]`` / ``[:, a:b]``: the other ranks' parts of those tensors
are never copied into memory. Everything else (embeddings, norms, unsharded layers) is read whole.
"""
from __future__ import annotations

import os
from typing import Dict, Optional, Union

import torch
from torch import nn
from torch.distributed.tensor import DeviceMesh
from torch.distributed.tensor.parallel.style import ParallelStyle

from .. import io
from ..errors import expect
from ..nn import W4A16Linear
from ..weight import QuantizedWeight
from .plan import DEFAULT_TP_PLAN, Plan, apply_tp_plan, resolve_plan
from .shard import COLWISE, LocalShard, Split, code_bytes, split_for
from .styles import W4A16Parallel

PARTS = ("qweight", "scales", "zeros", "perm", "bias")


def _read_shard(f, prefix: str, module: W4A16Linear, split: Split, device) -> LocalShard:
    """The LocalShard of layer ``prefix`` for ``split``, reading only those bytes from ``f``."""
    keys = set(f.keys())
    N, K = module.out_features, module.in_features
    stored = tuple(f.get_slice(prefix + "qweight").get_shape()) if prefix + "qweight" in keys else None
    expect(stored == (N, K // 2), f"{prefix}qweight.shape", (N, K // 2), stored or "missing")
    has = {part: prefix + part in keys for part in PARTS}
    expect(has["scales"], f"tensor {prefix}scales", "present", "missing")
    expect(has["zeros"] != module.symmetric, f"tensor {prefix}zeros",
           "absent (the layer is symmetric)" if module.symmetric else "present (the layer has zero points)",
           "present" if has["zeros"] else "missing")
    expect(has["bias"] == (module.bias is not None), f"tensor {prefix}bias",
           "present" if module.bias is not None else "absent (the layer has no bias)",
           "present" if has["bias"] else "missing")
    rows = lambda part, sls: torch.cat([f.get_slice(prefix + part)[sl] for sl in sls]).to(device)  # noqa: E731
    cols = lambda part, sl: f.get_slice(prefix + part)[:, sl].to(device)  # noqa: E731
    whole = lambda part: f.get_tensor(prefix + part).to(device) if has[part] else None  # noqa: E731
    if split.style == COLWISE:
        w = QuantizedWeight.from_plain(rows("qweight", split.rows), rows("scales", split.rows),
                                       rows("zeros", split.rows) if has["zeros"] else None,
                                       module.group_size, whole("perm"))
        return LocalShard(w, rows("bias", split.rows) if has["bias"] else None)
    w = QuantizedWeight.from_plain(cols("qweight", code_bytes(split.cols)), cols("scales", split.groups),
                                   cols("zeros", split.groups) if has["zeros"] else None, module.group_size)
    perm = whole("perm")
    return LocalShard(w, whole("bias"), perm, None if perm is None else perm[split.cols].clone())


def mesh_device(mesh: DeviceMesh) -> torch.device:
    """Where this rank's tensors go by default: "cpu" for a CPU mesh, else the mesh's device type
    at this process's current device (e.g. ``cuda:{torch.cuda.current_device()}``)."""
    if mesh.device_type == "cpu":
        return torch.device("cpu")
    return torch.device(mesh.device_type, torch.get_device_module(mesh.device_type).current_device())


def load_sharded(path: Union[str, "os.PathLike[str]"], model: nn.Module, mesh: DeviceMesh,
                 plan: Optional[Plan] = None, device: Union[str, torch.device, None] = None
                 ) -> Dict[str, ParallelStyle]:
    """Load a file written by ``w4a16.save(model, path)`` into ``model`` and shard it over ``mesh``.

    Args:
        path: a safetensors file of content "state_dict" (``w4a16.save`` of a quantized model).
        model: the same architecture with W4A16Linear layers of the saved shapes, group sizes,
            zero-point kinds and act-order (e.g. built and passed through ``quantize_model``, or
            built on the meta device, where non-persistent buffers such as rotary tables are
            the caller's to materialize); its weights are replaced.
        mesh: a 1-D DeviceMesh; this rank reads its own shard of every sharded layer.
        plan: as for :func:`apply_tp_plan` (default: :data:`DEFAULT_TP_PLAN`).
        device: where the tensors go (default: the mesh's device type and this process's
            current device, e.g. ``cuda:{torch.cuda.current_device()}``, or "cpu").

    Returns:
        module name -> style applied, as :func:`apply_tp_plan`. Raises W4A16Error for a file that
        is not a w4a16 state dict, a tensor missing or of the wrong shape, or a split that is
        impossible. Tensors of modules the plan does not shard are loaded whole (strictly: every
        model key must be in the file and vice versa).
    """
    path = os.fspath(path)
    plan = DEFAULT_TP_PLAN if plan is None else plan
    if device is None:
        device = mesh_device(mesh)
    rank, tp = mesh.get_local_rank(), mesh.size()
    modules = dict(model.named_modules())
    with io.open_safetensors(path) as f:
        meta = f.metadata() or {}
        expect(meta.get("format") == io.FORMAT_NAME, "metadata 'format'", repr(io.FORMAT_NAME),
               repr(meta.get("format")))
        expect(meta.get("content") == "state_dict", "metadata 'content'", "'state_dict' (w4a16.save of a model)",
               repr(meta.get("content")))
        shards, sharded_keys = {}, set()
        for name, style in resolve_plan(model, plan, tp).items():
            module = modules[name]
            if not isinstance(style, W4A16Parallel):
                continue
            split = split_for(style.style, (module.out_features, module.in_features), module.group_size, rank, tp,
                              name, getattr(module, "splits", None))
            shards[name] = _read_shard(f, name + ".", module, split, device)
            sharded_keys.update(name + "." + p for p in PARTS)
        rest = {k: f.get_tensor(k).to(device) for k in f.keys() if k not in sharded_keys}
    current = model.state_dict(keep_vars=True)
    expected = {k for k in current if k not in sharded_keys}
    missing, unexpected = sorted(expected - rest.keys()), sorted(rest.keys() - expected)
    expect(not missing and not unexpected, "path", "a file holding exactly the model's tensors",
           f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    # A model built on the meta device takes the loaded tensors as they are (assign).
    model.load_state_dict(rest, strict=False, assign=any(t.is_meta for t in current.values()))
    return apply_tp_plan(model, mesh, plan, shards=shards)
