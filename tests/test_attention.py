"""w4a16.attention: one decode token's query heads folded onto a grouped-query cache, against
transformers' own SDPA attention (which repeats the cache), on the CPU; the GPU variant in fp16 and
bf16 where a GPU is present."""
import copy

import pytest
import torch

pytest.importorskip("transformers", reason="the e2e extra (pip install 'w4a16[e2e]') is not installed")

from w4a16 import attention  # noqa: E402
from w4a16.e2e.decoder import StaticDecoder  # noqa: E402

from conftest import DEVICE  # noqa: E402


class _Module(torch.nn.Module):
    def __init__(self, groups):
        super().__init__()
        self.num_key_value_groups = groups
        self.is_causal = True


def _sdpa(*args, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(*args, **kwargs)


@pytest.mark.parametrize("B,Hq,Hkv,S,D", [(1, 8, 2, 37, 16), (3, 32, 8, 64, 32), (2, 6, 3, 5, 8)])
@pytest.mark.parametrize("mask", ["bool", "additive", None])
def test_one_token_equals_transformers_sdpa(B, Hq, Hkv, S, D, mask):
    gen = torch.Generator().manual_seed(B * 100 + Hq)
    q = torch.randn(B, Hq, 1, D, generator=gen)
    k, v = torch.randn(B, Hkv, S, D, generator=gen), torch.randn(B, Hkv, S, D, generator=gen)
    valid = torch.arange(S)[None, :] < torch.randint(1, S + 1, (B, 1), generator=gen)
    m = {"bool": valid[:, None, None, :], None: None,
         "additive": torch.where(valid, 0.0, float("-inf"))[:, None, None, :]}[mask]
    mod = _Module(Hq // Hkv)
    out, none = attention.packed_gqa_sdpa(mod, q, k, v, m, scaling=0.3)
    ref, _ = _sdpa(mod, q, k, v, m, scaling=0.3)
    assert none is None and out.shape == (B, 1, Hq, D) and out.is_contiguous()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_other_calls_go_to_transformers_sdpa(monkeypatch):
    """Several query tokens, a per-head mask or no groups: transformers' function, with the same arguments."""
    seen = []
    import transformers.integrations.sdpa_attention as sa

    real = sa.sdpa_attention_forward
    monkeypatch.setattr(sa, "sdpa_attention_forward", lambda *a, **k: (seen.append(a[1].shape), real(*a, **k))[1])
    gen = torch.Generator().manual_seed(3)
    k, v = torch.randn(1, 2, 9, 8, generator=gen), torch.randn(1, 2, 9, 8, generator=gen)
    attention.packed_gqa_sdpa(_Module(2), torch.randn(1, 4, 3, 8, generator=gen), k, v, None)
    attention.packed_gqa_sdpa(_Module(2), torch.randn(1, 4, 1, 8, generator=gen), k, v,
                              torch.ones(1, 4, 1, 9, dtype=torch.bool))
    attention.packed_gqa_sdpa(_Module(1), torch.randn(1, 2, 1, 8, generator=gen), k, v, None)
    assert seen == [(1, 4, 3, 8), (1, 4, 1, 8), (1, 2, 1, 8)]


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=128, intermediate_size=256, num_attention_heads=8, num_key_value_heads=2,
                      num_hidden_layers=2, vocab_size=300, max_position_embeddings=128)
    cfg._attn_implementation = "sdpa"
    return LlamaForCausalLM(cfg).eval()


def test_model_decode_step_equals_sdpa_model():
    """A tiny GQA Llama on a static cache: prefill and a decode step through the packed attention
    equal the same model on transformers' SDPA; the packed path runs for the decode step."""
    plain = _tiny_llama()
    packed = copy.deepcopy(plain)
    attention.use_packed_gqa(packed)
    assert packed.config._attn_implementation == attention.NAME
    prompt = torch.randint(0, 300, (3, 10), generator=torch.Generator().manual_seed(1))
    step_ids = torch.randint(0, 300, (3, 1), generator=torch.Generator().manual_seed(2))
    outs = []
    for model in (plain, packed):
        d = StaticDecoder(model, 3, 32, 10, "cpu")
        first = d.prefill(prompt)
        d.ids.copy_(step_ids)
        outs.append((first, d.step()))
    torch.testing.assert_close(outs[1][0], outs[0][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(outs[1][1], outs[0][1], rtol=1e-5, atol=1e-5)


def test_use_packed_gqa_refuses_other_attention():
    model = _tiny_llama()
    model.config._attn_implementation = "eager"
    with pytest.raises(ValueError, match=r"model: expected a transformers model with SDPA attention.*got attention "
                                         r"implementation 'eager'"):
        attention.use_packed_gqa(model)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_one_token_on_the_gpu(dtype):
    """Llama-3-8B heads (32 query, 8 key/value, 128 wide) on a 256-slot cache in fp16 / bf16."""
    gen = torch.Generator().manual_seed(4)
    q = torch.randn(16, 32, 1, 128, generator=gen).to(DEVICE, dtype)
    k, v = (torch.randn(16, 8, 256, 128, generator=gen).to(DEVICE, dtype) for _ in range(2))
    valid = (torch.arange(256)[None, :] < torch.randint(1, 257, (16, 1), generator=gen)).to(DEVICE)
    mod = _Module(4)
    out, _ = attention.packed_gqa_sdpa(mod, q, k, v, valid[:, None, None, :], scaling=128 ** -0.5)
    ref, _ = _sdpa(mod, q.float(), k.float(), v.float(), valid[:, None, None, :], scaling=128 ** -0.5)
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)
