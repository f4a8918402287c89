"""load_pretrained_quantized reads MoE checkpoints of GPTQ, AWQ and compressed-tensors, whose experts
are per-expert layers (``experts.{e}.gate_proj`` ..., Mixtral's ``block_sparse_moe.experts.{e}.w1``
...), into the model's experts module: the loaded weights equal the written ones exactly and the
model's output equals the float model with those weights; bad checkpoints are refused by name."""
import copy

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the e2e extra (pip install 'w4a16[e2e]') is not installed")

import w4a16  # noqa: E402
from tiny_models import write_moe_checkpoint  # noqa: E402
from w4a16.errors import W4A16Error  # noqa: E402
from w4a16.moe import W4A16Experts  # noqa: E402

pytestmark = pytest.mark.usefixtures("reference_gemm")

COMMON = dict(vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=64, intermediate_size=128)


def _model(kind):
    torch.manual_seed(0)
    cfg = (transformers.Qwen3MoeConfig(**COMMON, head_dim=16, moe_intermediate_size=64, num_experts=4,
                                       num_experts_per_tok=2, decoder_sparse_step=1) if kind == "qwen3"
           else transformers.MixtralConfig(**COMMON, num_local_experts=4, num_experts_per_tok=2))
    return transformers.AutoModelForCausalLM.from_config(cfg).eval().half()


def _write(folder, method, model, mixtral_names):
    return write_moe_checkpoint(folder, method, model, mixtral_names)


@pytest.mark.parametrize("method", ["gptq", "awq", "compressed-tensors"])
@pytest.mark.parametrize("kind,mixtral_names", [("qwen3", False), ("mixtral", True)])
def test_moe_checkpoint_loads_into_experts(tmp_path, method, kind, mixtral_names):
    model = _model(kind)
    written = _write(tmp_path, method, model, mixtral_names)
    loaded = copy.deepcopy(model)
    report = w4a16.load_pretrained_quantized(loaded, tmp_path)
    assert not report.unexpected_keys and not [k for k in report.missing_keys if "experts" in k]
    for name, ws in written.items():
        m = loaded.get_submodule(name)
        assert isinstance(m, W4A16Experts) and name in report.replaced
        gu, dn = m.weights()
        want_gu = torch.stack([torch.cat([g.dequantize(torch.float32), u.dequantize(torch.float32)]) for g, u, _ in ws])
        want_dn = torch.stack([d.dequantize(torch.float32) for _, _, d in ws])
        assert torch.equal(gu.dequantize(), want_gu) and torch.equal(dn.dequantize(), want_dn)
    ref = copy.deepcopy(model)
    w4a16.load_pretrained_quantized(ref, tmp_path)
    for name, ws in written.items():                        # the float experts module with the same weights
        f = loaded.get_submodule(name).dequantize_into(copy.deepcopy(model.get_submodule(name)))
        parent, _, attr = name.rpartition(".")
        setattr(ref.get_submodule(parent), attr, f)
    ids = torch.randint(0, 96, (2, 6))
    with torch.no_grad():
        got, want = loaded(ids).logits.float(), ref(ids).logits.float()
    assert float((got - want).norm() / want.norm()) < 2e-2


def test_missing_expert_projection_is_refused(tmp_path):
    model = _model("qwen3")
    _write(tmp_path, "gptq", model, False)
    from safetensors.torch import load_file, save_file

    t = load_file(str(tmp_path / "model.safetensors"))
    t = {k: v for k, v in t.items() if ".experts.2.up_proj." not in k}
    save_file(t, str(tmp_path / "model.safetensors"))
    with pytest.raises(W4A16Error, match=r"experts.2: expected gate, up and down projections in the checkpoint, got no \['up'\]"):
        w4a16.load_pretrained_quantized(copy.deepcopy(model), tmp_path)


def test_expert_biases_are_reported_not_dropped(tmp_path):
    """W4A16Experts has no biases: an expert layer's bias in the checkpoint is an unexpected key."""
    model = _model("qwen3")
    _write(tmp_path, "gptq", model, False)
    from safetensors.torch import load_file, save_file

    t = load_file(str(tmp_path / "model.safetensors"))
    t["model.layers.0.mlp.experts.1.down_proj.bias"] = torch.full((64,), 5.0, dtype=torch.float16)
    save_file(t, str(tmp_path / "model.safetensors"))
    report = w4a16.load_pretrained_quantized(copy.deepcopy(model), tmp_path)
    assert report.unexpected_keys == ["model.layers.0.mlp.experts.1.down_proj.bias"]
