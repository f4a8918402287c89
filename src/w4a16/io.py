"""Save and load quantized weights as safetensors (never pickle).

A file holds one of three contents, named in its metadata header:

    "weight"      one QuantizedWeight, stored under the name "weight"
    "weights"     a dict[str, QuantizedWeight]
    "state_dict"  the tensors of an nn.Module's state_dict (e.g. a model of W4A16Linear layers)

Tensors of a weight called ``name``: ``{name}.qweight`` (uint8 [N, K/2]), ``{name}.scales``
([N, K/g] fp16/bf16), and when present ``{name}.zeros`` ([N, K/g]) and ``{name}.perm`` (int64 [K]).
Metadata (str -> str): ``format = "w4a16"``, ``format_version = "1"``, ``content`` as above, and for
weights ``weights``: JSON ``{name: {"group_size", "shape", "symmetric", "has_perm"}}``.
"""
from __future__ import annotations

import json
import os
from typing import Dict, Union

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from . import spec
from .errors import expect, fail
from .weight import QuantizedWeight

FORMAT_NAME = "w4a16"
FORMAT_VERSION = "1"
CONTENTS = ("weight", "weights", "state_dict")
SINGLE_NAME = "weight"

PathLike = Union[str, "os.PathLike[str]"]


def _weight_tensors(name: str, w: QuantizedWeight) -> Dict[str, torch.Tensor]:
    out = {f"{name}.qweight": w.qweight, f"{name}.scales": w.scales}
    if w.zeros is not None:
        out[f"{name}.zeros"] = w.zeros
    if w.perm is not None:
        out[f"{name}.perm"] = w.perm
    return out


def _weight_info(w: QuantizedWeight) -> dict:
    return {"group_size": w.group_size, "shape": list(w.shape), "symmetric": w.zeros is None,
            "has_perm": w.perm is not None}


def _independent(tensors: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """``tensors`` as contiguous CPU tensors of their own: safetensors refuses two names on one
    storage (a tied weight, or one weight saved under two names), so repeats are copied."""
    out, seen = {}, set()
    for key, t in tensors.items():
        t = t.detach().cpu().contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen and t.numel():
            t = t.clone()
        seen.add(ptr)
        out[key] = t
    return out


def _state_dict_tensors(module: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """The module's state_dict as independent contiguous CPU tensors (shared storage is copied)."""
    state = module.state_dict()
    for key, t in state.items():
        expect(isinstance(t, torch.Tensor), f"state_dict[{key!r}]", "a torch.Tensor", type(t).__name__)
    return _independent(state)


def save(obj: Union[QuantizedWeight, Dict[str, QuantizedWeight], torch.nn.Module], path: PathLike) -> None:
    """Write ``obj`` to ``path`` as safetensors with a ``w4a16`` metadata header.

    Args:
        obj: a QuantizedWeight, a dict[str, QuantizedWeight], or an nn.Module (its state_dict).
        path: the file to write (replaced atomically if it exists); missing parent folders are
            created.
    """
    meta = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION}
    if isinstance(obj, torch.nn.Module):
        meta["content"] = "state_dict"
        tensors = _state_dict_tensors(obj)
    else:
        if isinstance(obj, QuantizedWeight):
            meta["content"], weights = "weight", {SINGLE_NAME: obj}
        elif isinstance(obj, dict):
            meta["content"], weights = "weights", obj
        else:
            fail("obj", "a QuantizedWeight, a dict[str, QuantizedWeight] or an nn.Module", type(obj).__name__)
        tensors, info = {}, {}
        for name, w in weights.items():
            expect(isinstance(name, str) and name != "", "obj key", "a non-empty str", repr(name))
            expect(isinstance(w, QuantizedWeight), f"obj[{name!r}]", "a QuantizedWeight", type(w).__name__)
            tensors.update(_weight_tensors(name, w))
            info[name] = _weight_info(w)
        meta["weights"] = json.dumps(info)
        tensors = _independent(tensors)
    path = os.fspath(path)
    expect(not os.path.isdir(path), "path", "a file to write", f"{path!r} (a directory)")
    parent = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as e:
        fail("path", "a file in a folder that exists or can be created", f"{path!r} ({e})")
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        save_file(tensors, tmp, metadata=meta)
        os.replace(tmp, path)
    except (OSError, SafetensorError) as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        fail("path", "a writable file", f"{path!r} ({e})")


def _load_weight(f, name: str, info, keys: set, device) -> QuantizedWeight:
    arg = f"weights[{name!r}]"
    ok = isinstance(info, dict) and {"group_size", "shape", "symmetric", "has_perm"} <= info.keys()
    expect(ok, f"metadata {arg}", "group_size, shape, symmetric and has_perm", info)
    get = lambda part: f.get_tensor(f"{name}.{part}").to(device)  # noqa: E731
    for part, present in (("qweight", True), ("scales", True), ("zeros", not info["symmetric"]),
                          ("perm", info["has_perm"])):
        expect((f"{name}.{part}" in keys) == bool(present), f"tensor {name}.{part}",
               "present" if present else "absent (per the metadata)", "present" if not present else "missing")
    shape = info["shape"]
    ok = (isinstance(shape, list) and len(shape) == 2 and all(spec.is_int(v) for v in shape)
          and shape[0] >= 1 and shape[1] >= 2 and shape[1] % 2 == 0)
    expect(ok, f"metadata {arg}['shape']", "[N >= 1, K >= 2] with K even", shape)
    N, K = shape
    stored = tuple(f.get_slice(f"{name}.qweight").get_shape())
    expect(stored == (N, K // 2), f"{name}.qweight.shape",
           f"(N, K / 2) = {(N, K // 2)} for the metadata's shape (N, K) = {(N, K)}", stored)
    w = QuantizedWeight.from_plain(get("qweight"), get("scales"), None if info["symmetric"] else get("zeros"),
                                   info["group_size"], get("perm") if info["has_perm"] else None)
    return w


def load(path: PathLike, device: Union[str, torch.device] = "cpu"
         ) -> Union[QuantizedWeight, Dict[str, QuantizedWeight], Dict[str, torch.Tensor]]:
    """Read a file written by :func:`save` (safetensors only; nothing is unpickled).

    Returns:
        what was saved: a QuantizedWeight, a dict[str, QuantizedWeight], or, for a module, its
        state_dict as dict[str, Tensor] (pass it to ``module.load_state_dict``). Tensors land on
        ``device``.
    """
    path = os.fspath(path)
    _check_device(device)
    with open_safetensors(path) as f:
        return _read(f, device)


def open_safetensors(path: str):
    """``safe_open(path)`` (tensors read to the CPU), or W4A16Error naming ``path`` when it is not a
    file or not a safetensors file."""
    expect(os.path.isfile(path), "path", "a safetensors file",
           f"{path!r} ({'a directory' if os.path.isdir(path) else 'no such file'})")
    try:
        return safe_open(path, framework="pt", device="cpu")
    except (SafetensorError, OSError) as e:
        fail("path", "a safetensors file", f"{path!r} ({e})")


def _check_device(device) -> None:
    """Raise unless torch can allocate on ``device`` (e.g. "cuda" without a CUDA build or GPU)."""
    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError, TypeError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        fail("device", "a device torch can use here", f"{device!r} ({reason})")


def _read(f, device):
    meta = f.metadata() or {}
    keys = set(f.keys())
    expect(meta.get("format") == FORMAT_NAME, "metadata 'format'", repr(FORMAT_NAME), repr(meta.get("format")))
    expect(meta.get("format_version") == FORMAT_VERSION, "metadata 'format_version'", repr(FORMAT_VERSION),
           repr(meta.get("format_version")))
    content = meta.get("content")
    expect(content in CONTENTS, "metadata 'content'", f"one of {CONTENTS}", repr(content))
    if content == "state_dict":
        return {k: f.get_tensor(k).to(device) for k in sorted(keys)}
    try:
        info = json.loads(meta.get("weights", ""))
    except json.JSONDecodeError:
        info = None
    expect(isinstance(info, dict), "metadata 'weights'", "a JSON object", repr(meta.get("weights")))
    expected_keys, weights = set(), {}
    for name, item in info.items():
        weights[name] = _load_weight(f, name, item, keys, device)
        expected_keys.update(_weight_tensors(name, weights[name]).keys())
    extra = sorted(keys - expected_keys)
    expect(not extra, "tensors", "only those named in metadata 'weights'", extra)
    if content == "weight":
        expect(list(weights) == [SINGLE_NAME], "metadata 'weights'", f"one weight named {SINGLE_NAME!r}",
               list(weights))
        return weights[SINGLE_NAME]
    return weights
