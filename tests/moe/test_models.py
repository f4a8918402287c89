"""quantize_model on tiny transformers MoE models (Qwen3-MoE, Qwen2-MoE with a shared expert,
Mixtral, DeepSeek-V3 with shared experts): every experts module becomes a W4A16Experts that the
model's own forward runs, the report names the routers left in floating point, and the logits
equal those of the same model with the experts' weights replaced by their dequantized values."""
import copy

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the e2e extra (pip install 'w4a16[e2e]') is not installed")

import w4a16  # noqa: E402
from w4a16.moe import W4A16Experts, with_dequantized_experts  # noqa: E402

pytestmark = pytest.mark.usefixtures("reference_gemm")

COMMON = dict(vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=64)


def _qwen3():
    return transformers.Qwen3MoeConfig(**COMMON, head_dim=16, intermediate_size=128, moe_intermediate_size=64,
                                       num_experts=8, num_experts_per_tok=2, decoder_sparse_step=1, norm_topk_prob=True)


def _qwen2():
    return transformers.Qwen2MoeConfig(**COMMON, intermediate_size=128, moe_intermediate_size=64,
                                       shared_expert_intermediate_size=64, num_experts=6, num_experts_per_tok=2)


def _mixtral():
    return transformers.MixtralConfig(**COMMON, intermediate_size=128, num_local_experts=4, num_experts_per_tok=2)


def _deepseek():
    return transformers.DeepseekV3Config(**{**COMMON, "num_key_value_heads": 4}, intermediate_size=128, moe_intermediate_size=64,
                                         n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
                                         first_k_dense_replace=1, n_group=2, topk_group=1, kv_lora_rank=32,
                                         q_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16)


@pytest.mark.parametrize("make", [_qwen3, _qwen2, _mixtral, _deepseek], ids=["qwen3", "qwen2", "mixtral", "deepseek"])
def test_experts_quantized_and_used(make):
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(make()).eval().half()
    q = copy.deepcopy(model)
    report = w4a16.quantize_model(q, group_size=32, progress=False)
    experts = [n for n, m in q.named_modules() if isinstance(m, W4A16Experts)]
    assert experts and all(n in report.replaced for n in experts)
    assert not any(isinstance(getattr(m, "gate_up_proj", None), torch.nn.Parameter) for m in q.modules())
    assert any("router" in why for why in report.skipped.values())
    ref = with_dequantized_experts(model, q)
    w4a16.quantize_model(ref, group_size=32, progress=False, experts=False)   # same dense layers as q
    ids = torch.randint(0, 96, (2, 7))
    with torch.no_grad():
        got, want = q(ids).logits.float(), ref(ids).logits.float()
    calls = []
    real = W4A16Experts.forward
    W4A16Experts.forward = lambda self, *a: (calls.append(1), real(self, *a))[1]
    try:
        with torch.no_grad():
            q(ids)
    finally:
        W4A16Experts.forward = real
    assert len(calls) == len(experts)                                      # the model's forward runs them
    assert float((got - want).norm() / want.norm()) < 2e-2


def test_unconvertible_experts_are_reported():
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(_mixtral()).eval()
    report = w4a16.quantize_model(model, group_size=256, progress=False)   # H = 64: no group of 256
    left = {n: why for n, why in report.skipped.items() if n.endswith("experts")}
    assert left and all("not a multiple of group_size 256" in why for why in left.values())
    report = w4a16.quantize_model(transformers.AutoModelForCausalLM.from_config(_mixtral()), group_size=32,
                                  progress=False, skip=("lm_head", "model.layers.1.mlp.experts"))
    assert report.skipped["model.layers.1.mlp.experts"].startswith("skipped by name")


def test_save_and_load_round_trip(tmp_path):
    """A quantized MoE model's state (experts included) saved with w4a16.save loads into a freshly
    quantized model of the same structure and gives the same output."""
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(_qwen3()).eval().half()
    q = copy.deepcopy(model)
    w4a16.quantize_model(q, group_size=32, symmetric=False, progress=False)
    w4a16.save(q, tmp_path / "moe.safetensors")
    torch.manual_seed(1)
    fresh = transformers.AutoModelForCausalLM.from_config(_qwen3()).eval().half()   # other random weights
    w4a16.quantize_model(fresh, group_size=32, symmetric=False, progress=False)
    fresh.load_state_dict(w4a16.load(tmp_path / "moe.safetensors"))
    ids = torch.randint(0, 96, (1, 5))
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, q(ids).logits)


def test_layouts_it_does_not_read_are_left_alone():
    """Experts stored transposed or with interleaved gate/up rows (transformers' flags) stay in
    floating point, with the reason, rather than being read in the wrong order."""
    from w4a16.moe.module import experts_reason

    torch.manual_seed(0)
    experts = transformers.AutoModelForCausalLM.from_config(_mixtral()).model.layers[0].mlp.experts
    assert experts_reason(experts, 32) is None
    experts.is_transposed = True
    assert "transposed" in experts_reason(experts, 32)
    experts.is_transposed, experts.is_concatenated = False, False
    assert "interleaved" in experts_reason(experts, 32)
