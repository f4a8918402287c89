"""Fused projections: q/k/v and gate/up of a decoder layer run as one W4A16 GEMM each, with the
model's own forward, save/load and the checkpoint importers (CPU; kernels on the reference path
except where said)."""
import pytest
import torch
from torch import nn

import w4a16
from w4a16 import W4A16Linear, quantize_model
from w4a16.fused import FusedW4A16Linear, W4A16Slice, fuse_projections
from w4a16.measure import rel_error

pytestmark = pytest.mark.usefixtures("reference_gemm")


class Attn(nn.Module):
    """q, k, v projections of one input, as decoder layers have them (k and v narrower)."""

    def __init__(self, d, kv, bias):
        super().__init__()
        self.q_proj = nn.Linear(d, d, bias=bias)
        self.k_proj = nn.Linear(d, kv, bias=bias)
        self.v_proj = nn.Linear(d, kv, bias=bias)
        self.o_proj = nn.Linear(d, d, bias=False)

    def forward(self, h):
        q, k, v = self.q_proj(h), self.k_proj(h), self.v_proj(h)
        return self.o_proj(q * torch.cat([k, v], -1).sum(-1, keepdim=True))


class Mlp(nn.Module):
    def __init__(self, d, f):
        super().__init__()
        self.gate_proj = nn.Linear(d, f, bias=False)
        self.up_proj = nn.Linear(d, f, bias=False)
        self.down_proj = nn.Linear(f, d, bias=False)

    def forward(self, h):
        return self.down_proj(nn.functional.silu(self.gate_proj(h)) * self.up_proj(h))


class Layer(nn.Module):
    def __init__(self, d=128, kv=64, f=256, bias=False):
        super().__init__()
        self.self_attn = Attn(d, kv, bias)
        self.mlp = Mlp(d, f)

    def forward(self, h):
        return h + self.mlp(h + self.self_attn(h))


def _model(seed=0, bias=False):
    torch.manual_seed(seed)
    return nn.Sequential(Layer(bias=bias), Layer(bias=bias)).half()


def _x(seed=1):
    return torch.randn(2, 3, 128, generator=torch.Generator().manual_seed(seed)).half()


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("symmetric", [True, False])
def test_fused_model_matches_the_unfused_one(bias, symmetric):
    plain, fused = _model(bias=bias), _model(bias=bias)
    r0 = quantize_model(plain, group_size=64, symmetric=symmetric, skip=(), progress=False, fuse=False)
    r1 = quantize_model(fused, group_size=64, symmetric=symmetric, skip=(), progress=False)
    assert r0.fused == [] and r1.fused == ["0.self_attn.qkv_proj", "0.mlp.gate_up_proj",
                                           "1.self_attn.qkv_proj", "1.mlp.gate_up_proj"]
    attn = fused[0].self_attn
    assert isinstance(attn.qkv_proj, FusedW4A16Linear) and attn.qkv_proj.splits == (128, 64, 64)
    assert all(isinstance(getattr(attn, n), W4A16Slice) for n in ("q_proj", "k_proj", "v_proj"))
    assert isinstance(attn.o_proj, W4A16Linear) and "fused 4 projection groups" in str(r1)
    x = _x()
    assert rel_error(fused(x), plain(x)) <= 1e-3
    # the fused weight is the members' rows, bit for bit
    members = [plain[0].self_attn.q_proj, plain[0].self_attn.k_proj, plain[0].self_attn.v_proj]
    assert torch.equal(attn.qkv_proj.weight_q.dequantize(), torch.cat([m.weight_q.dequantize() for m in members]))


def test_one_gemm_per_group_and_views_without_copies(monkeypatch):
    model = _model()
    quantize_model(model, group_size=64, skip=(), progress=False)
    calls = []
    real = w4a16.ops.gemm
    monkeypatch.setattr("w4a16.nn.gemm", lambda x, w, b=None, *a, **k: calls.append(w.shape) or real(x, w, b, *a, **k))
    attn = model[0].self_attn
    x = _x()
    q, k = attn.q_proj(x), attn.k_proj(x)
    v = attn.v_proj(x)
    assert calls == [(256, 128)]                   # q, k and v: one GEMM
    base = q.untyped_storage().data_ptr()
    assert k.untyped_storage().data_ptr() == base == v.untyped_storage().data_ptr()
    assert attn.qkv_proj._cache is None            # nothing held once every member has read
    attn.q_proj(x)
    assert calls == [(256, 128)] * 2               # a new call computes again
    x.add_(1)                                      # an in-place edit of the input is a new input
    attn.q_proj(x)
    attn.k_proj(x)                                 # ... whose result k then shares
    assert len(calls) == 3 and q.shape == (2, 3, 128) and k.shape == (2, 3, 64)


def test_state_dict_save_and_load_of_the_fused_form(tmp_path):
    model = _model(bias=True)
    quantize_model(model, group_size=64, symmetric=False, skip=(), progress=False)
    keys = set(model.state_dict())
    assert "0.self_attn.qkv_proj.qweight" in keys and not any(".q_proj." in k for k in keys)
    w4a16.save(model, tmp_path / "m.safetensors")
    fresh = _model(seed=5, bias=True)
    quantize_model(fresh, group_size=64, symmetric=False, skip=(), progress=False)
    fresh.load_state_dict(w4a16.load(tmp_path / "m.safetensors"))
    x = _x()
    assert torch.equal(fresh(x), model(x))


def test_groups_that_cannot_be_fused_are_left_alone():
    model = _model()
    quantize_model(model, group_size=64, skip=("0.self_attn.k_proj",), progress=False)
    assert "0.self_attn.qkv_proj" not in [n for n, _ in model.named_modules()]
    assert isinstance(model[0].self_attn.q_proj, W4A16Linear) and isinstance(model[0].mlp.gate_up_proj,
                                                                              FusedW4A16Linear)
    assert fuse_projections(model) == []           # nothing left to fuse; running again is a no-op


def test_act_order_members_are_refused_by_from_members():
    lin = nn.Linear(128, 64).half()
    a = W4A16Linear.from_linear(lin, group_size=64)
    w = a.weight_q
    b = W4A16Linear.from_quantized(w4a16.QuantizedWeight.from_plain(w.qweight, w.scales, None, 64, torch.randperm(128)))
    with pytest.raises(w4a16.W4A16Error, match=r"members\[1\].perm"):
        FusedW4A16Linear.from_members([a, b])


def test_compiled_forward_matches_eager():
    """torch.compile (aot_eager: no C++ compiler needed) traces the shared-input cache."""
    model = _model()
    quantize_model(model, group_size=64, skip=(), progress=False)
    x = _x()
    eager = model(x)
    assert torch.equal(torch.compile(model, backend="aot_eager", fullgraph=True)(x), eager)


def test_llama_decoder_layers_fuse_and_match():
    """A tiny transformers Llama: its own attention and MLP code runs on the slices unchanged."""
    pytest.importorskip("transformers")
    from w4a16.e2e.speed import build_model, llama_config, llama_dims

    dims = llama_dims(2, hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2,
                      vocab_size=300)
    plain = build_model(llama_config(dims), "cpu")
    fused = build_model(llama_config(dims), "cpu")
    quantize_model(plain, group_size=64, progress=False, fuse=False)
    report = quantize_model(fused, group_size=64, progress=False)
    assert report.fused == [f"model.layers.{i}.{g}" for i in range(2) for g in ("self_attn.qkv_proj", "mlp.gate_up_proj")]
    ids = torch.randint(0, 300, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = plain(input_ids=ids).logits, fused(input_ids=ids).logits
    assert rel_error(b, a) <= 1e-3


def test_a_gptq_checkpoint_loads_into_the_fused_form(tmp_path):
    import json

    from safetensors.torch import save_file

    src = _model(seed=3)
    quantize_model(src, group_size=64, symmetric=False, skip=(), progress=False, fuse=False)
    tensors = {}
    for name, mod in src.named_modules():
        if isinstance(mod, W4A16Linear):
            tensors.update({f"{name}.{k}": v.contiguous() for k, v in w4a16.formats.to_gptq(mod.weight_q).items()})
    save_file(tensors, str(tmp_path / "model.safetensors"))
    qc = {"quant_method": "gptq", "bits": 4, "group_size": 64, "desc_act": False, "sym": False,
          "checkpoint_format": "gptq"}
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "tiny", "quantization_config": qc}))
    plain, fused = _model(seed=9), _model(seed=9)
    w4a16.load_pretrained_quantized(plain, tmp_path, fuse=False)
    report = w4a16.load_pretrained_quantized(fused, tmp_path)
    assert len(report.fused) == 4 and isinstance(fused[1].mlp.gate_proj, W4A16Slice)
    x = _x()
    assert torch.equal(plain(x), src(x)) and rel_error(fused(x), plain(x)) <= 1e-3
