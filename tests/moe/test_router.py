"""w4a16.moe.router: softmax, top-k and renormalization in one kernel (Triton's interpreter on the
CPU, the GPU where present) against transformers' operations, and MoE models with converted
routers against the same models unconverted."""
import copy

import pytest
import torch

from w4a16.backends.triton import moe_topk
from w4a16.errors import W4A16Error
from w4a16.moe import router

from conftest import DEVICE, KERNEL_DTYPES


def _distinct_logits(T, E, dtype, seed):
    """[T, E] logits without ties in any row (a shuffled ladder of values, exact in fp16)."""
    gen = torch.Generator().manual_seed(seed)
    ladder = torch.arange(E, dtype=torch.float32) / 8 - E / 16
    rows = [ladder[torch.randperm(E, generator=gen)] for _ in range(T)]
    return torch.stack(rows).to(DEVICE, dtype)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES + (torch.float32,))
@pytest.mark.parametrize("T,E,k", [(1, 128, 8), (5, 60, 4), (3, 8, 2), (2, 256, 8), (4, 16, 16)])
@pytest.mark.parametrize("renormalize,cast", [(True, True), (False, True), (True, False)])
def test_kernel_equals_torch(T, E, k, renormalize, cast, dtype):
    logits = _distinct_logits(T, E, dtype, seed=T * E + k)
    out_dtype = dtype if cast else torch.float32
    w = torch.full((T, k), float("nan"), dtype=out_dtype, device=DEVICE)
    ids = torch.full((T, k), -7, dtype=torch.int64, device=DEVICE)
    moe_topk.router_topk(logits, k, renormalize, out_dtype, out=(w, ids))
    w_ref, ids_ref = router.router_topk_reference(logits, k, renormalize, cast)
    assert torch.equal(ids, ids_ref)
    # fp32 softmax and sums in both (exp may differ in the last place): one unit of the output's
    # last place at most
    torch.testing.assert_close(w, w_ref, rtol=torch.finfo(out_dtype).eps if cast else 2e-6, atol=1e-7)


def test_ties_take_the_lowest_id_first():
    logits = torch.tensor([[0.5, 2.0, 2.0, -1.0, 2.0, 0.5, 0.0, 0.0]], device=DEVICE)
    w, ids = moe_topk.router_topk(logits, 4, False, torch.float32)
    assert ids.tolist() == [[1, 2, 4, 0]]


def test_other_k_go_to_torch(monkeypatch):
    """k not a power of two: torch's operations (the same result)."""
    logits = _distinct_logits(3, 64, torch.float16, seed=1)
    calls = []
    monkeypatch.setattr(moe_topk, "router_topk", lambda *a, **k: calls.append(1))
    w, ids = router.router_topk(logits, 6)
    w_ref, ids_ref = router.router_topk_reference(logits, 6, True, True)
    assert not calls and torch.equal(ids, ids_ref) and torch.equal(w, w_ref)


@pytest.mark.parametrize("logits,k,message", [
    (torch.zeros(2, 3, 4), 2, r"logits: expected a 2-D tensor \[T, E\], got \(2, 3, 4\)"),
    (torch.zeros(2, 8, dtype=torch.int32), 2, r"logits.dtype: expected a floating dtype"),
    (torch.zeros(2, 8), 9, r"k: expected 1..8 \(the experts\), got 9"),
])
def test_bad_arguments_are_named(logits, k, message):
    with pytest.raises(W4A16Error, match=message):
        router.router_topk(logits, k)


def _tiny_moe(kind):
    import transformers

    torch.manual_seed(0)
    common = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                  num_hidden_layers=2, vocab_size=200, max_position_embeddings=64)
    if kind == "qwen3_moe":
        cfg = transformers.Qwen3MoeConfig(**common, moe_intermediate_size=32, num_experts=16, num_experts_per_tok=4,
                                          norm_topk_prob=True, head_dim=16)
        return transformers.Qwen3MoeForCausalLM(cfg).eval()
    cfg = transformers.MixtralConfig(**common, num_local_experts=8, num_experts_per_tok=2)
    return transformers.MixtralForCausalLM(cfg).eval()


@pytest.mark.parametrize("kind", ["qwen3_moe", "mixtral"])
def test_model_with_fused_routers_equals_unconverted(kind, monkeypatch):
    pytest.importorskip("transformers", reason="the e2e extra (pip install 'w4a16[e2e]') is not installed")
    plain = _tiny_moe(kind).to(DEVICE)
    fused = copy.deepcopy(plain)
    names = router.use_fused_routers(fused)
    assert len(names) == 2 and router.use_fused_routers(fused) == []
    calls = []
    real = router.router_topk_op
    monkeypatch.setattr(router, "router_topk_op", lambda *a: (calls.append(1), real(*a))[1])
    ids = torch.randint(0, 200, (2, 7), generator=torch.Generator().manual_seed(3)).to(DEVICE)
    with torch.no_grad():
        want, got = plain(input_ids=ids).logits, fused(input_ids=ids).logits
    assert len(calls) == 2
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_other_modules_are_left_alone():
    assert "is not one of" in router.why_not_fused_router(torch.nn.Linear(2, 2))
    assert router.use_fused_routers(torch.nn.Sequential(torch.nn.Linear(2, 2))) == []


def test_kernel_compiles_for_sm90a():
    """The kernel lowers for sm_90a with the installed Triton (``offline.compile_router_topk``; a
    worker process without Triton's interpreter; no GPU needed)."""
    from kernel_cases import run_offline

    out = run_offline("from w4a16.backends.triton.offline import compile_router_topk; from w4a16.sass import disasm; "
                      "ks = [compile_router_topk(128, 8), compile_router_topk(8, 2, 'fp16'), "
                      "compile_router_topk(256, 8)]; "
                      "print('spills', sum(disasm.spills(disasm.instructions(k.asm['cubin'])) for k in ks))")
    assert "spills 0" in out, out
