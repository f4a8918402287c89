"""load_pretrained_quantized on tiny checkpoint directories written here (CPU).

The GPTQ tensors are packed in this file straight from the published GPTQ layout, independently of
``w4a16.formats``; the AWQ and compressed-tensors ones come from the formats' exporters.
"""
import json

import pytest
import torch
from torch import nn

import w4a16
from w4a16 import QuantizedWeight, W4A16Error, W4A16Linear, formats, load_pretrained_quantized, reference
from w4a16.pack import pack_nibbles

D, G = 64, 32
LINEARS = ("layers.0.q_proj", "layers.0.up", "layers.0.down", "layers.1.q_proj", "layers.1.up", "layers.1.down")


from tiny_models import Block, TinyLM, write_checkpoint  # noqa: E402,F401

pytestmark = pytest.mark.usefixtures("reference_gemm")


# ---------------------------------------------------------------------- a GPTQ packer from the spec
def to_int32(words: torch.Tensor) -> torch.Tensor:
    return torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32)


def pack_gptq(codes, zeros, scales, checkpoint_format="gptq"):
    """codes int [N, K] (0..15, input order), zeros int [N, G], scales [N, G] ->
    qweight int32 [K/8, N] (nibble j of row r is k = 8r + j), qzeros int32 [G, N/8], scales fp16 [G, N]."""
    N, K = codes.shape
    shifts = torch.arange(8, dtype=torch.int64) * 4
    qweight = (codes.t().to(torch.int64).reshape(K // 8, 8, N) << shifts.view(1, 8, 1)).sum(1)
    stored = zeros.t().to(torch.int64) - (1 if checkpoint_format == "gptq" else 0)  # [G, N]
    qzeros = (stored.reshape(-1, N // 8, 8) << shifts.view(1, 1, 8)).sum(2)
    return to_int32(qweight), to_int32(qzeros), scales.t().to(torch.float16).contiguous()


def random_layer(N, K, seed, symmetric=False, g_idx=None):
    """Random codes / zeros / scales and the weight they mean, W[n, k] = (q - z[g(k)]) * s[g(k)], as
    a function of the dtype the scales are held in."""
    gen = torch.Generator().manual_seed(seed)
    n_groups = K // G
    codes = torch.randint(0, 16, (N, K), generator=gen)
    zeros = torch.full((N, n_groups), 8) if symmetric else torch.randint(1, 16, (N, n_groups), generator=gen)
    scales = (torch.rand(N, n_groups, generator=gen) * 0.02 + 0.005).half()
    gi = torch.arange(K) // G if g_idx is None else g_idx
    def W(dtype=torch.float16):
        return (codes - zeros[:, gi]).float() * scales.to(dtype).float()[:, gi]
    return codes, zeros, scales, W


def float_tensors(seed=0):
    """The non-quantized tensors of a TinyLM checkpoint (and the biases of its Linear layers)."""
    torch.manual_seed(seed)
    src = TinyLM(vocab=48, d=D, norm=True).half()
    out = {k: v.detach().clone() for k, v in src.state_dict().items() if not k.endswith("proj.weight")
           and not k.endswith("up.weight") and not k.endswith("down.weight")}
    return out


def gptq_checkpoint(tmp_path, checkpoint_format="gptq", symmetric=False, desc_act=False, shards=1):
    tensors, expected = float_tensors(), {}
    for i, name in enumerate(LINEARS):
        N, K = (2 * D, D) if name.endswith("up") else (D, 2 * D) if name.endswith("down") else (D, D)
        g_idx = torch.randperm(K, generator=torch.Generator().manual_seed(i)) // G if desc_act else None
        codes, zeros, scales, W = random_layer(N, K, seed=10 + i, symmetric=symmetric, g_idx=g_idx)
        qweight, qzeros, sc = pack_gptq(codes, zeros, scales, checkpoint_format)
        tensors.update({f"{name}.qweight": qweight, f"{name}.qzeros": qzeros, f"{name}.scales": sc})
        tensors[f"{name}.g_idx"] = (torch.arange(K) // G if g_idx is None else g_idx).to(torch.int32)
        expected[name] = W
    qc = {"quant_method": "gptq", "bits": 4, "group_size": G, "desc_act": desc_act, "sym": symmetric,
          "checkpoint_format": checkpoint_format}
    return write_checkpoint(tmp_path, qc, tensors, shards), tensors, expected


def check_loaded(model, tensors, expected, dtype=torch.float16):
    for name, weight_of in expected.items():
        W = weight_of(dtype)
        mod = model.get_submodule(name)
        assert isinstance(mod, W4A16Linear) and mod.dtype == dtype
        assert torch.equal(mod.weight_q.dequantize(torch.float32), W)
        if f"{name}.bias" in tensors:
            assert torch.equal(mod.bias, tensors[f"{name}.bias"].to(dtype))
        x = torch.randn(2, 3, W.shape[1]).to(dtype)
        b = None if mod.bias is None else mod.bias
        ref = reference.gemm(x, QuantizedWeight.from_plain(mod.qweight, mod.scales, mod.zeros, mod.group_size,
                                                           mod.perm), b)
        assert torch.equal(mod(x), ref)
        y32 = x.float() @ W.t() + (0 if b is None else b.float())
        assert ((mod(x).float() - y32).norm() / y32.norm()) < 0.02
    assert torch.equal(model.embed.weight, tensors["embed.weight"].to(model.embed.weight.dtype))
    assert torch.equal(model.lm_head.weight, tensors["lm_head.weight"].to(model.lm_head.weight.dtype))


# ---------------------------------------------------------------------- GPTQ
@pytest.mark.parametrize("checkpoint_format,symmetric,desc_act,shards", [
    ("gptq", False, False, 1),
    ("gptq", True, False, 3),
    ("gptq_v2", False, True, 2),
])
def test_gptq(tmp_path, checkpoint_format, symmetric, desc_act, shards):
    path, tensors, expected = gptq_checkpoint(tmp_path, checkpoint_format, symmetric, desc_act, shards)
    model = TinyLM(vocab=48, d=D, norm=True).half()
    report = load_pretrained_quantized(model, path)
    assert report.replaced == list(LINEARS)
    assert report.skipped == {"lm_head": "no quantized tensors in the checkpoint"}
    assert report.missing_keys == [] and report.unexpected_keys == []
    check_loaded(model, tensors, expected)
    for name in LINEARS:
        mod = model.get_submodule(name)
        assert mod.symmetric == symmetric and mod.act_order == desc_act
    weights = sum(W().numel() for W in expected.values())
    assert report.bytes_before == 2 * weights
    zeros = 0 if symmetric else 2 * weights // G
    perm = 8 * sum(W().shape[1] for W in expected.values()) if desc_act else 0
    assert report.bytes_after == weights // 2 + 2 * weights // G + zeros + perm
    assert str(report).startswith("quantized 6 Linear layers, ")
    assert model(torch.randint(0, 48, (2, 5))).dtype == torch.float16


def test_gptq_into_bf16_model_and_dtype_override(tmp_path):
    path, tensors, expected = gptq_checkpoint(tmp_path)
    model = TinyLM(vocab=48, d=D, norm=True).bfloat16()
    load_pretrained_quantized(model, path)
    check_loaded(model, tensors, expected, dtype=torch.bfloat16)
    model32 = TinyLM(vocab=48, d=D, norm=True)
    load_pretrained_quantized(model32, path, dtype=torch.bfloat16)
    assert model32.layers[0].up.dtype == torch.bfloat16
    model32 = TinyLM(vocab=48, d=D, norm=True)
    load_pretrained_quantized(model32, path)  # fp32 Linear: keep the checkpoint's fp16
    assert model32.layers[0].up.dtype == torch.float16


def test_missing_and_unexpected_keys(tmp_path):
    path, tensors, _ = gptq_checkpoint(tmp_path)
    del tensors["layers.1.up.bias"], tensors["norm.weight"]
    tensors["extra.scale"] = torch.ones(3)
    tensors["layers.0.q_proj.bias"] = torch.zeros(D, dtype=torch.float16)  # a bias-less layer's zeros: fine
    tensors["layers.1.q_proj.bias"] = torch.ones(D, dtype=torch.float16)
    for k in [k for k in tensors if k.startswith("layers.1.down.")]:
        tensors[k.replace("layers.1.", "layers.9.")] = tensors.pop(k)
    qc = json.loads((path / "config.json").read_text())["quantization_config"]
    (path / "model.safetensors").unlink()
    write_checkpoint(path, qc, tensors)
    model = TinyLM(vocab=48, d=D, norm=True).half()
    report = load_pretrained_quantized(model, path)
    assert "layers.1.down" not in report.replaced and isinstance(model.layers[1].down, nn.Linear)
    assert report.skipped == {"layers.1.down": "no quantized tensors in the checkpoint",
                              "lm_head": "no quantized tensors in the checkpoint"}
    assert set(report.missing_keys) == {"layers.1.up.bias", "norm.weight", "layers.1.down.weight",
                                        "layers.1.down.bias"}
    assert model.layers[1].q_proj.bias is None
    assert set(report.unexpected_keys) == {"extra.scale", "layers.1.q_proj.bias"} | {f"layers.9.down.{p}" for p in
                                                             ("qweight", "qzeros", "scales", "g_idx", "bias")}
    assert "missing key" in str(report) and "unexpected key" in str(report)


# ---------------------------------------------------------------------- AWQ and compressed-tensors
def exported_checkpoint(tmp_path, method):
    tensors, expected = float_tensors(), {}
    for i, name in enumerate(LINEARS):
        N, K = (2 * D, D) if name.endswith("up") else (D, 2 * D) if name.endswith("down") else (D, D)
        codes, zeros, scales, W = random_layer(N, K, seed=20 + i)
        w = QuantizedWeight.from_plain(pack_nibbles(codes.to(torch.uint8)), scales, zeros.half(), G)
        parts = formats.to_awq(w) if method == "awq" else formats.to_compressed_tensors(w)
        tensors.update({f"{name}.{k}": v for k, v in parts.items()})
        expected[name] = W
    if method == "awq":
        qc = {"quant_method": "awq", "bits": 4, "group_size": G, "version": "gemm", "zero_point": True}
    else:
        qc = {"quant_method": "compressed-tensors", "format": "pack-quantized", "ignore": ["lm_head"],
              "config_groups": {"group_0": {"targets": ["Linear"], "input_activations": None,
                                            "weights": {"num_bits": 4, "type": "int", "symmetric": False,
                                                        "strategy": "group", "group_size": G}}}}
    return write_checkpoint(tmp_path, qc, tensors), tensors, expected


@pytest.mark.parametrize("method", ["awq", "compressed-tensors"])
def test_awq_and_compressed_tensors(tmp_path, method):
    path, tensors, expected = exported_checkpoint(tmp_path, method)
    model = TinyLM(vocab=48, d=D, norm=True).half()
    report = load_pretrained_quantized(model, path)
    assert report.replaced == list(LINEARS) and list(report.skipped) == ["lm_head"]
    assert report.missing_keys == [] and report.unexpected_keys == []
    check_loaded(model, tensors, expected)


# ---------------------------------------------------------------------- errors
GPTQ_QC = {"quant_method": "gptq", "bits": 4, "group_size": G, "desc_act": False, "sym": True}


@pytest.mark.parametrize("change,arg", [
    ({"bits": 8}, "quantization_config.bits"),
    ({"quant_method": "bitsandbytes"}, "quantization_config.quant_method"),
    ({"checkpoint_format": "marlin"}, "quantization_config.checkpoint_format"),
    ({"group_size": 100}, "quantization_config.group_size"),
    ({"quant_method": "awq", "version": "gemv"}, "quantization_config.version"),
])
def test_config_errors_name_the_field(tmp_path, change, arg):
    write_checkpoint(tmp_path, {**GPTQ_QC, **change}, {"x": torch.zeros(1)})
    with pytest.raises(W4A16Error, match=rf"^{arg}: expected .*, got "):
        load_pretrained_quantized(TinyLM(vocab=48, d=D, norm=True).half(), tmp_path)


@pytest.mark.parametrize("change,arg", [
    ({"format": "marlin-24"}, "quantization_config.config_groups.group_0.format"),
    ({"weights": {"num_bits": 8, "type": "int", "strategy": "group", "group_size": G}},
     "quantization_config.config_groups.group_0.weights.num_bits"),
    ({"weights": {"num_bits": 4, "type": "float", "strategy": "group", "group_size": G}},
     "quantization_config.config_groups.group_0.weights.type"),
    ({"input_activations": {"num_bits": 8}}, "quantization_config.config_groups.group_0.input_activations"),
])
def test_compressed_tensors_config_errors(tmp_path, change, arg):
    grp = {"targets": ["Linear"], "weights": {"num_bits": 4, "type": "int", "strategy": "group", "group_size": G},
           **change}
    qc = {"quant_method": "compressed-tensors", "format": "pack-quantized", "config_groups": {"group_0": grp}}
    write_checkpoint(tmp_path, qc, {"x": torch.zeros(1)})
    with pytest.raises(W4A16Error, match=rf"^{arg}: expected"):
        load_pretrained_quantized(TinyLM(vocab=48, d=D, norm=True).half(), tmp_path)
    qc["format"] = "float-quantized"
    qc["config_groups"]["group_0"].pop("format", None)
    write_checkpoint(tmp_path, qc, {"x": torch.zeros(1)})
    with pytest.raises(W4A16Error, match=r"^quantization_config.format: expected 'pack-quantized'"):
        load_pretrained_quantized(TinyLM(vocab=48, d=D, norm=True).half(), tmp_path)


def test_tensor_errors_name_the_tensor(tmp_path):
    path, tensors, _ = gptq_checkpoint(tmp_path)
    del tensors["layers.0.up.qzeros"]
    (path / "model.safetensors").unlink()
    write_checkpoint(path, {**GPTQ_QC, "sym": False}, tensors)
    model = TinyLM(vocab=48, d=D, norm=True).half()
    with pytest.raises(W4A16Error, match=r"^layers\.0\.up\.qzeros: expected a tensor"):
        load_pretrained_quantized(model, path)
    assert not any(isinstance(m, W4A16Linear) for m in model.modules())  # left untouched
    tensors["layers.0.up.qzeros"] = tensors["layers.0.down.qzeros"].clone()
    (path / "model.safetensors").unlink()
    write_checkpoint(path, {**GPTQ_QC, "sym": False}, tensors)
    with pytest.raises(W4A16Error, match=r"^layers\.0\.up: qzeros\.shape: expected"):
        load_pretrained_quantized(model, path)


def test_shape_and_layout_errors(tmp_path):
    path, _, _ = gptq_checkpoint(tmp_path)
    with pytest.raises(W4A16Error, match=r"^layers\.0\.q_proj\.qweight: expected a weight of shape"):
        load_pretrained_quantized(TinyLM(d=D * 2).half(), path)
    with pytest.raises(W4A16Error, match=r"^checkpoint tensor names: expected"):
        load_pretrained_quantized(nn.Sequential(nn.Linear(D, D)), path)
    qc = json.loads((path / "config.json").read_text())["quantization_config"]
    (path / "config.json").write_text(json.dumps({"quantization_config": {**qc, "group_size": 64}}))
    with pytest.raises(W4A16Error, match=r"^layers\.0\.q_proj\.scales: expected groups of 64"):
        load_pretrained_quantized(TinyLM(vocab=48, d=D, norm=True).half(), path)


def test_desc_act_needs_g_idx(tmp_path):
    path, tensors, _ = gptq_checkpoint(tmp_path, desc_act=True)
    for k in [k for k in tensors if k.endswith(".g_idx")]:
        del tensors[k]
    (path / "model.safetensors").unlink()
    write_checkpoint(path, {**GPTQ_QC, "desc_act": True, "sym": False}, tensors)
    with pytest.raises(W4A16Error, match=r"^layers\.0\.q_proj\.g_idx: expected a tensor .*desc_act"):
        load_pretrained_quantized(TinyLM(vocab=48, d=D, norm=True).half(), path)


def test_directory_errors(tmp_path):
    with pytest.raises(W4A16Error, match=r"^path: expected a directory with config.json"):
        load_pretrained_quantized(TinyLM(vocab=48, d=D, norm=True), tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "tiny"}))
    with pytest.raises(W4A16Error, match=r"^config.json quantization_config: expected"):
        load_pretrained_quantized(TinyLM(vocab=48, d=D, norm=True), tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": GPTQ_QC}))
    with pytest.raises(W4A16Error, match=r"^path: expected a directory with model.safetensors"):
        load_pretrained_quantized(TinyLM(vocab=48, d=D, norm=True), tmp_path)


def test_exported_at_top_level():
    assert w4a16.load_pretrained_quantized is load_pretrained_quantized
