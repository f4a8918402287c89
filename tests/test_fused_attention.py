"""w4a16.fused_attention: the decode step's rotary embedding, cache write and attention in one
kernel (Triton's interpreter on the CPU, the GPU where present) against the torch reference, and
a tiny Llama / Qwen2 on a static cache converted against the same model unconverted."""
import copy

import pytest
import torch

from w4a16 import fused_attention as fa
from w4a16.backends.triton import decode_attention as kernel_module
from w4a16.backends.workspace import tile_counters
from w4a16.errors import W4A16Error

from conftest import DEVICE, KERNEL_DTYPES


def _norms(D, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    return dict(q_norm=(1 + torch.randn(D, generator=gen) / 4).to(DEVICE, dtype),
                k_norm=(1 + torch.randn(D, generator=gen) / 4).to(DEVICE, dtype), norm_eps=(1e-6, 3e-5))


def _problem(B, Hq, Hkv, S, D, pos, mask, dtype, seed):
    """Random q, k, v, rotary cos/sin, a cache whose slots past pos hold NaN, the mask."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(DEVICE, dtype)

    angle = torch.rand(B, D // 2, generator=gen) * 6
    cos, sin = (torch.cat([f(angle)] * 2, -1).to(DEVICE, dtype) for f in (torch.cos, torch.sin))
    keys, values = rand(B, Hkv, S, D), rand(B, Hkv, S, D)
    keys[:, :, pos + 1:] = float("nan")    # never read: nothing past the new token is attended
    values[:, :, pos + 1:] = float("nan")
    m = None
    if mask == "bool":
        m = torch.rand(B, S, generator=gen) < 0.7
        m[:, pos] = True
        m = m.to(DEVICE)
    elif mask == "additive":
        m = (torch.rand(1, S, generator=gen) * -3).to(DEVICE, dtype)
    return (rand(B, Hq * D), rand(B, Hkv * D), rand(B, Hkv * D), cos, sin, keys, values,
            torch.tensor(pos, device=DEVICE), m)


def _tolerance(dtype):
    return dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=4e-3, atol=4e-3)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("qk_norm", [False, True])
@pytest.mark.parametrize("B,Hq,Hkv,S,D,pos,mask", [
    (1, 8, 2, 300, 32, 250, None),         # several splits, the combine
    (1, 8, 2, 300, 32, 5, "bool"),         # one split holds every slot, the others nothing
    (1, 8, 2, 300, 32, 100, "additive"),   # two of the splits hold slots
    (3, 16, 4, 100, 16, 99, "additive"),   # the last slot, a mask row shared by the batch
    (2, 6, 3, 64, 64, 0, None),            # the first token
    (2, 40, 8, 129, 128, 128, "bool"),     # 5 query heads per cache head, Llama's head width
])
def test_kernel_equals_reference(B, Hq, Hkv, S, D, pos, mask, qk_norm, dtype):
    args = _problem(B, Hq, Hkv, S, D, pos, mask, dtype, seed=B * 1000 + pos)
    norms = _norms(D, dtype, pos) if qk_norm else {}
    mine = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
    ref = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
    out = kernel_module.decode_attention(*mine, scale=0.17, out=torch.full((B, Hq * D), float("nan"),
                                                                            dtype=dtype, device=DEVICE), **norms)
    expected = fa.decode_attention_reference(*ref, scale=0.17, **norms)
    torch.testing.assert_close(out.float(), expected.float(), **_tolerance(dtype))
    # the cache: the new key (roped) and value at pos, every other slot as it was (NaN included)
    torch.testing.assert_close(mine[5], ref[5], rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(mine[6], ref[6], rtol=0, atol=0, equal_nan=True)
    assert int(mine[7]) == pos + 1 == int(ref[7])
    assert not tile_counters(args[0].device, B * Hkv + 1)[:B * Hkv + 1].any()   # left at zero


def test_full_cache_gives_nan_and_writes_nothing():
    args = list(_problem(1, 4, 2, 64, 16, 63, None, torch.float16, seed=7))
    args[7] = torch.tensor(64, device=DEVICE)
    keys, values = args[5].clone(), args[6].clone()
    out = fa.decode_attention(*args)
    assert out.isnan().all() and int(args[7]) == 65
    torch.testing.assert_close(args[5], keys, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(args[6], values, rtol=0, atol=0, equal_nan=True)


def test_consecutive_steps_on_one_cache():
    """Three steps in a row: each writes its slot and attends over every slot written so far."""
    q, k, v, cos, sin, keys, values, length, _ = _problem(2, 8, 4, 80, 32, 40, None, torch.float16, seed=3)
    rk, rv, rlen = keys.clone(), values.clone(), length.clone()
    for step in range(3):
        out = fa.decode_attention(q + step, k - step, v * (step + 1), cos, sin, keys, values, length)
        ref = fa.decode_attention_reference(q + step, k - step, v * (step + 1), cos, sin, rk, rv, rlen, None,
                                            32 ** -0.5)
        torch.testing.assert_close(out, ref, **_tolerance(torch.float16))
    assert int(length) == 43


@pytest.mark.parametrize("change,message", [
    (lambda a: a.__setitem__(5, a[5][..., :24]), r"keys.shape\[3\] \(head dim\): expected one of"),
    (lambda a: a.__setitem__(0, a[0][:, :-1]), r"q: expected \[2, Hq \* 32\] with Hq a multiple of 4"),
    (lambda a: a.__setitem__(3, a[3].float()), r"cos.dtype: expected torch.float16, got torch.float32"),
    (lambda a: a.__setitem__(7, a[7].int()), r"length: expected an int64 scalar tensor"),
    (lambda a: a.__setitem__(8, torch.ones(2, 79, dtype=torch.bool, device=DEVICE)),
     r"mask: expected \[2 or 1, 80\] with contiguous rows, got \(2, 79\)"),
    (lambda a: a.__setitem__(6, a[6].transpose(1, 2).contiguous().transpose(1, 2)), r"values: expected shape"),
    (lambda a: a.append(None) or a.append(None) or a.append(a[3][0]), r"q_norm, k_norm: expected both given or "
                                                                      r"neither, got q_norm None, k_norm given"),
    (lambda a: a.append(None) or a.extend([a[3][0, :16]] * 2), r"q_norm.shape: expected \(32,\) contiguous"),
])
def test_bad_arguments_are_named(change, message):
    args = list(_problem(2, 8, 4, 80, 32, 40, None, torch.float16, seed=5))
    change(args)
    with pytest.raises(W4A16Error, match=message):
        fa.decode_attention(*args)


# --- models ---------------------------------------------------------------------------------------

def _tiny(kind):
    import transformers

    torch.manual_seed(0)
    common = dict(hidden_size=128, intermediate_size=256, num_attention_heads=8, num_key_value_heads=2,
                  num_hidden_layers=2, vocab_size=300, max_position_embeddings=128)
    if kind == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
    elif kind == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common))
    else:
        model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**common, head_dim=32))
        for name, p in model.named_parameters():   # norms that are not all ones
            if name.endswith(("q_norm.weight", "k_norm.weight")):
                p.data = 1 + torch.randn_like(p) / 4
    model.config._attn_implementation = "sdpa"
    return model.eval().to(DEVICE, torch.float16)


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3"])
def test_model_decode_steps_equal_unconverted(kind, monkeypatch):
    """Prefill (the model's own path) and three decode steps (the fused kernel) of a converted tiny
    model on a static cache equal the unconverted model's."""
    pytest.importorskip("transformers", reason="the e2e extra (pip install 'w4a16[e2e]') is not installed")
    from w4a16.e2e.decoder import StaticDecoder

    plain = _tiny(kind)
    fused = copy.deepcopy(plain)
    names = fa.use_fused_decode_attention(fused)
    assert names == [f"model.layers.{i}.self_attn" for i in range(2)]
    assert fa.use_fused_decode_attention(fused) == []
    calls = []
    real = fa.decode_attention_op
    monkeypatch.setattr(fa, "decode_attention_op", lambda *a: (calls.append(1), real(*a))[1])
    prompt = torch.randint(0, 300, (3, 10), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    outs = []
    for model in (plain, fused):
        d = StaticDecoder(model, 3, 32, 10, DEVICE)
        logits = [d.prefill(prompt)]
        for step in range(3):
            d.ids.copy_(torch.randint(0, 300, (3, 1), generator=torch.Generator().manual_seed(step)))
            logits.append(d.step())
        outs.append(torch.stack(logits))
    assert len(calls) == 3 * 2   # every decode step of every layer, not the prefill
    torch.testing.assert_close(outs[1].float(), outs[0].float(), rtol=2e-2, atol=2e-2)


def test_other_attention_is_left_alone():
    class Other(torch.nn.Module):
        pass

    assert "is not one of" in fa.why_not_fused_attention(Other())
    assert fa.use_fused_decode_attention(torch.nn.Sequential(Other())) == []


def test_kernel_compiles_for_sm90a_without_spills():
    """``w4a16 sass --kernels triton-attention`` (the kernel's shipped variants, fp16 and bf16,
    compiled for sm_90a with the installed Triton as its launches run it; no GPU needed): every
    variant compiles, spill-free, with a main loop."""
    import subprocess
    import sys
    from pathlib import Path

    from w4a16.backends.triton.env import interpreter_unset

    pytest.importorskip("triton.backends.nvidia", reason="Triton's NVIDIA backend is not installed")
    src = str(Path(__file__).resolve().parents[1] / "src")
    with interpreter_unset():
        r = subprocess.run([sys.executable, "-m", "w4a16", "sass", "--kernels", "triton-attention"],
                           capture_output=True, text=True, timeout=900, env={**__import__("os").environ,
                                                                            "PYTHONPATH": src})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "10 configs ok" in r.stdout or "10 of 10" in r.stdout, r.stdout[-2000:]
