"""Decoder layers with the activation and residual adds in the GEMM epilogues
(``quantize_model(fuse="layers")``): tiny transformers Llama, Qwen2, Qwen3 and Mistral models give
the logits and the greedy generation of the same model quantized with ``fuse=True`` (CPU; the
kernels on the reference path)."""
import copy

import pytest
import torch

import w4a16
from w4a16.errors import W4A16Error
from w4a16.fused_layer import DeferredW4A16Linear, W4A16GatedMLP, why_not_fused
from w4a16.measure import rel_error

pytestmark = pytest.mark.usefixtures("reference_gemm")
transformers = pytest.importorskip("transformers")
SMALL = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2,
             num_hidden_layers=2, vocab_size=300, max_position_embeddings=256)


def _tiny(family: str, seed: int = 0):
    from w4a16.e2e.speed import build_model

    cfg = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
           "qwen3": transformers.Qwen3Config, "mistral": transformers.MistralConfig}[family](**SMALL)
    cfg._attn_implementation = "sdpa"
    return build_model(cfg, "cpu", seed=seed)


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "mistral"])
def test_fused_layers_match_the_quantized_model(family):
    plain = _tiny(family)
    fused = copy.deepcopy(plain)
    w4a16.quantize_model(plain, group_size=64, progress=False)
    report = w4a16.quantize_model(fused, group_size=64, progress=False, fuse="layers")
    assert report.fused_layers == ["model.layers.0", "model.layers.1"]
    layer = fused.model.layers[0]
    assert isinstance(layer.mlp, W4A16GatedMLP) and type(layer.self_attn.o_proj) is DeferredW4A16Linear
    assert type(layer).__name__.startswith("W4A16Fused")
    ids = torch.randint(0, 300, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = plain(input_ids=ids).logits, fused(input_ids=ids).logits
    # the same arithmetic; the residual adds round once (fp32 epilogue) instead of twice
    assert rel_error(b, a) <= 3e-3
    mask = torch.ones_like(ids)
    greedy = dict(max_new_tokens=6, do_sample=False, attention_mask=mask, pad_token_id=0)
    assert torch.equal(plain.generate(ids, **greedy), fused.generate(ids, **greedy))


def test_gated_mlp_is_silu_gate_times_up_then_down():
    model = _tiny("llama", seed=2)
    w4a16.quantize_model(model, group_size=64, progress=False)
    mlp = model.model.layers[0].mlp
    x = torch.randn(3, 128, generator=torch.Generator().manual_seed(3)).half()
    r = torch.randn(3, 128, generator=torch.Generator().manual_seed(4)).half()
    with torch.no_grad():
        want = mlp(x)
        w4a16.fused_layer.fuse_decoder_layers(model)
        got = model.model.layers[0].mlp(x)
        got_r = model.model.layers[0].mlp(x, r)
    assert rel_error(got, want) <= 2e-3
    assert rel_error(got_r, want.float() + r.float()) <= 2e-3


def test_state_dict_round_trips_between_fused_models(tmp_path):
    src, dst = _tiny("qwen3", seed=5), _tiny("qwen3", seed=6)
    for m in (src, dst):
        w4a16.quantize_model(m, group_size=64, progress=False, fuse="layers")
    w4a16.save(src, tmp_path / "m.safetensors")
    dst.load_state_dict(w4a16.load(tmp_path / "m.safetensors"))
    ids = torch.randint(0, 300, (1, 5), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        assert torch.equal(src(input_ids=ids).logits, dst(input_ids=ids).logits)


def test_a_state_dict_of_one_form_does_not_load_into_the_other():
    """The paired gate/up rows are stored under another name than [gate; up]: strict loading
    refuses instead of computing with the wrong rows."""
    plain, fused = _tiny("llama", seed=8), _tiny("llama", seed=8)
    w4a16.quantize_model(plain, group_size=64, progress=False)
    w4a16.quantize_model(fused, group_size=64, progress=False, fuse="layers")
    with pytest.raises(RuntimeError, match="gate_up_paired"):
        fused.load_state_dict(plain.state_dict())
    with pytest.raises(RuntimeError, match="gate_up_paired"):
        plain.load_state_dict(fused.state_dict())


def test_layers_that_do_not_fit_are_left_alone_with_the_reason():
    model = _tiny("llama")
    assert why_not_fused(model.model.layers[0]) == "self_attn.o_proj is not a W4A16Linear"
    w4a16.quantize_model(model, group_size=64, progress=False, fuse=False)
    assert "fused gate_up_proj" in why_not_fused(model.model.layers[0])
    assert why_not_fused(model.model) == f"LlamaModel is not one of {w4a16.fused_layer.LAYER_CLASSES}"
    report = w4a16.quantize_model(_tiny("llama"), group_size=64, progress=False, fuse="layers",
                                  skip=("lm_head", "model.layers.1.mlp.down_proj"))
    assert report.fused_layers == ["model.layers.0"]


def test_fuse_argument_is_checked():
    with pytest.raises(W4A16Error, match="fuse: expected True, False or 'layers', got 'all'"):
        w4a16.quantize_model(torch.nn.Linear(64, 64), fuse="all")


def test_tensor_parallel_refuses_fused_layers():
    pytest.importorskip("torch.distributed.tensor")
    from w4a16.distributed import apply_tp_plan

    model = _tiny("llama")
    w4a16.quantize_model(model, group_size=64, progress=False, fuse="layers")
    with pytest.raises(W4A16Error, match=r"model: expected no fused decoder layers .*got fused decoder layers "
                                         r"\(model.layers.0.self_attn.o_proj\)"):
        apply_tp_plan(model, None)


def test_a_fused_layer_takes_its_arguments_by_position_too():
    model = _tiny("mistral", seed=9)
    w4a16.quantize_model(model, group_size=64, progress=False, fuse="layers")
    layer = model.model.layers[0]
    h = torch.randn(1, 5, 128, generator=torch.Generator().manual_seed(10)).half()
    pos = torch.arange(5)[None]
    pe = model.model.rotary_emb(h, pos)
    with torch.no_grad():
        by_name = layer(h, attention_mask=None, position_ids=pos, position_embeddings=pe)
        # (hidden_states, attention_mask, position_ids, cache, use_cache, position_embeddings): the
        # rotary embedding reaches the attention only through its name
        by_position = layer(h, None, pos, None, False, pe)
    assert torch.equal(by_name, by_position)


def test_both_norms_run_in_the_gemms():
    """The o GEMM's "residual_rmsnorm" epilogue writes norm2(h) and the fused q/k/v GEMM reads its
    input through norm1: neither norm module is called; norms of another class are (the layers give
    the same logits either way)."""
    from w4a16.fused_layer import NormedFusedW4A16Linear

    model = _tiny("qwen3", seed=5)
    w4a16.quantize_model(model, group_size=64, progress=False, fuse="layers")
    assert all(type(layer.self_attn.qkv_proj) is NormedFusedW4A16Linear for layer in model.model.layers)
    ids = torch.randint(0, 300, (1, 7), generator=torch.Generator().manual_seed(6))
    calls = []
    norms = [m for layer in model.model.layers for m in (layer.input_layernorm, layer.post_attention_layernorm)]
    hooks = [m.register_forward_hook(lambda *a: calls.append(1)) for m in norms]
    with torch.no_grad():
        fused = model(input_ids=ids).logits
    assert calls == []

    class OtherNorm(type(norms[0])):
        pass

    for m in norms:
        m.__class__ = OtherNorm
    with torch.no_grad():
        other = model(input_ids=ids).logits
    assert len(calls) == 4
    for h in hooks:
        h.remove()
    assert rel_error(other, fused) <= 1e-3


def test_the_norm_after_each_layer_runs_in_its_down_projection(monkeypatch):
    """The down GEMM of each layer writes the layer's output and the norm that reads it (the next
    layer's input norm, the model's final norm after the last): no RMSNorm module computes
    anything, nothing handed is held after the forward, and the logits are the quantized model's."""
    from w4a16.fused_layer import HandedRMSNorm

    plain = _tiny("llama", seed=3)
    model = copy.deepcopy(plain)
    w4a16.quantize_model(plain, group_size=64, progress=False)
    w4a16.quantize_model(model, group_size=64, progress=False, fuse="layers")
    handed = [model.model.layers[1].input_layernorm, model.model.norm]
    assert all(isinstance(m, HandedRMSNorm) for m in handed)
    assert not isinstance(model.model.layers[0].input_layernorm, HandedRMSNorm)   # nothing before layer 0
    ids = torch.randint(0, 300, (2, 6), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = plain(input_ids=ids).logits
        computed = []
        base = transformers.models.llama.modeling_llama.LlamaRMSNorm
        original = base.forward
        monkeypatch.setattr(base, "forward", lambda self, x: computed.append(self) or original(self, x))
        got = model(input_ids=ids).logits
    assert computed == []
    assert all(m.__dict__["w4a16_handed"] is None for m in handed)
    assert rel_error(got, want) <= 3e-3


def test_a_handed_norm_serves_only_its_own_tensor():
    """What a down projection handed to a norm is returned for exactly that tensor; any other input
    is normalized by the module itself, and the handed pair is dropped either way."""
    from w4a16.fused_layer import HandedRMSNorm

    model = _tiny("qwen2", seed=8)
    w4a16.quantize_model(model, group_size=64, progress=False, fuse="layers")
    norm = model.model.norm
    assert isinstance(norm, HandedRMSNorm)
    gen = torch.Generator().manual_seed(9)
    h, other = (torch.randn(1, 3, 128, generator=gen).half() for _ in range(2))
    marker = torch.full_like(h, 7.0)
    norm.__dict__["w4a16_handed"] = (h, marker)
    assert torch.equal(norm(h), marker) and norm.__dict__["w4a16_handed"] is None
    norm.__dict__["w4a16_handed"] = (h, marker)
    with torch.no_grad():
        got = norm(other)
    assert norm.__dict__["w4a16_handed"] is None
    want = type(norm).__mro__[2].forward(norm, other)
    assert torch.equal(got, want) and not torch.equal(got, marker)
