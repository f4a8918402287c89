"""safetensors save / load: round trips are exact, headers are checked, nothing is unpickled."""
import json
import re

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import w4a16
from w4a16 import formats
from w4a16.errors import W4A16Error


def _quantized(N, K, g, symmetric, dtype, seed=0):
    return w4a16.quantize(torch.randn(N, K, generator=torch.Generator().manual_seed(seed)), g, symmetric, dtype)


def _act_order(seed=0):
    w = _quantized(16, 128, 32, False, torch.bfloat16, seed)
    g_idx = torch.tensor(np.random.default_rng(seed).permutation(np.arange(128) // 32), dtype=torch.int32)
    ckpt = formats.to_gptq(w, "gptq_v2")
    ckpt["g_idx"] = g_idx
    out = formats.from_gptq(**ckpt, checkpoint_format="gptq_v2")
    assert out.perm is not None
    return out


def assert_same(a, b):
    assert a.shape == b.shape and a.group_size == b.group_size
    for name in ("qweight", "scales", "zeros", "perm"):
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), name
        if x is not None:
            assert x.dtype == y.dtype and torch.equal(x, y), name


WEIGHTS = {
    "sym-fp16-g128": lambda: _quantized(24, 256, 128, True, torch.float16),
    "asym-bf16-g32": lambda: _quantized(8, 64, 32, False, torch.bfloat16, 1),
    "sym-per-channel": lambda: _quantized(5, 96, -1, True, torch.float16, 2),
    "act-order": _act_order,
}


@pytest.mark.parametrize("kind", list(WEIGHTS))
def test_single_weight_round_trip(tmp_path, kind):
    w = WEIGHTS[kind]()
    path = tmp_path / "w.safetensors"
    w4a16.save(w, path)
    back = w4a16.load(path)
    assert isinstance(back, w4a16.QuantizedWeight)
    assert_same(back, w)
    assert torch.equal(back.dequantize(torch.float32), w.dequantize(torch.float32))


def test_header_and_tensor_names(tmp_path):
    w = _act_order()
    path = tmp_path / "w.safetensors"
    w4a16.save({"layers.0.q_proj": w}, str(path))
    with safe_open(str(path), framework="pt") as f:
        meta, keys = f.metadata(), set(f.keys())
    assert meta["format"] == "w4a16" and meta["format_version"] == "1" and meta["content"] == "weights"
    assert json.loads(meta["weights"]) == {
        "layers.0.q_proj": {"group_size": 32, "shape": [16, 128], "symmetric": False, "has_perm": True}}
    assert keys == {f"layers.0.q_proj.{p}" for p in ("qweight", "scales", "zeros", "perm")}


def test_dict_round_trip_keeps_names_and_order(tmp_path):
    ws = {name: make() for name, make in WEIGHTS.items()}
    ws = {f"model.{name}.proj": w for name, w in reversed(list(ws.items()))}
    path = tmp_path / "ws.safetensors"
    w4a16.save(ws, path)
    back = w4a16.load(path)
    assert list(back) == list(ws)
    for name in ws:
        assert_same(back[name], ws[name])


def test_module_state_dict_round_trip(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Linear(16, 16, bias=False))
    model[1].weight = model[0].weight                              # shared storage
    model.register_buffer("codes", torch.randint(0, 256, (4, 8), dtype=torch.uint8))
    model.register_buffer("scales", torch.rand(4, 2).to(torch.bfloat16) + 0.5)
    path = tmp_path / "m.safetensors"
    w4a16.save(model, path)
    state = w4a16.load(path)
    assert set(state) == set(model.state_dict())
    for key, t in model.state_dict().items():
        assert state[key].dtype == t.dtype and torch.equal(state[key], t), key
    fresh = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Linear(16, 16, bias=False))
    fresh.register_buffer("codes", torch.zeros(4, 8, dtype=torch.uint8))
    fresh.register_buffer("scales", torch.zeros(4, 2, dtype=torch.bfloat16))
    fresh.load_state_dict(state)
    assert torch.equal(fresh[0].weight, model[0].weight)


# ----------------------------------------------------------------------------- errors
def _write(path, tensors, **meta):
    save_file(tensors, str(path), metadata=meta or None)
    return path


def _valid_meta(**overrides):
    w = _quantized(8, 64, 32, True, torch.float16)
    meta = {"format": "w4a16", "format_version": "1", "content": "weight",
            "weights": json.dumps({"weight": {"group_size": 32, "shape": [8, 64], "symmetric": True,
                                              "has_perm": False}})}
    meta.update(overrides)
    return {"weight.qweight": w.qweight, "weight.scales": w.scales}, meta


def _raises(arg):
    return pytest.raises(W4A16Error, match="^" + re.escape(arg + ": expected"))


def test_valid_hand_written_file_loads(tmp_path):
    tensors, meta = _valid_meta()
    assert w4a16.load(_write(tmp_path / "a", tensors, **meta)).shape == (8, 64)


@pytest.mark.parametrize("key,value", [("format", "gguf"), ("format_version", "2"), ("content", "model")])
def test_wrong_header_field(tmp_path, key, value):
    tensors, meta = _valid_meta(**{key: value})
    with _raises(f"metadata '{key}'"):
        w4a16.load(_write(tmp_path / "a", tensors, **meta))


def test_missing_header(tmp_path):
    tensors, _ = _valid_meta()
    with _raises("metadata 'format'"):
        w4a16.load(_write(tmp_path / "a", tensors))


def test_bad_weights_json(tmp_path):
    tensors, meta = _valid_meta(weights="{not json")
    with _raises("metadata 'weights'"):
        w4a16.load(_write(tmp_path / "a", tensors, **meta))


def test_missing_tensor(tmp_path):
    tensors, meta = _valid_meta(weights=json.dumps({"weight": {"group_size": 32, "shape": [8, 64],
                                                               "symmetric": False, "has_perm": False}}))
    with _raises("tensor weight.zeros"):
        w4a16.load(_write(tmp_path / "a", tensors, **meta))


def test_extra_tensor(tmp_path):
    tensors, meta = _valid_meta()
    tensors["stray"] = torch.ones(3)
    with _raises("tensors"):
        w4a16.load(_write(tmp_path / "a", tensors, **meta))


def test_shape_mismatch(tmp_path):
    tensors, meta = _valid_meta(weights=json.dumps({"weight": {"group_size": 32, "shape": [8, 128],
                                                               "symmetric": True, "has_perm": False}}))
    with _raises("weight.qweight.shape"):
        w4a16.load(_write(tmp_path / "a", tensors, **meta))


def test_not_a_safetensors_file(tmp_path):
    path = tmp_path / "junk.bin"
    path.write_bytes(b"\x80\x04 definitely not safetensors")
    with _raises("path"):
        w4a16.load(path)


def test_save_rejects_other_objects(tmp_path):
    with _raises("obj"):
        w4a16.save(torch.zeros(3), tmp_path / "a")
    with _raises("obj['a']"):
        w4a16.save({"a": torch.zeros(3)}, tmp_path / "a")
    with _raises("obj key"):
        w4a16.save({"": _quantized(8, 64, 32, True, torch.float16)}, tmp_path / "a")
