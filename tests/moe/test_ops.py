"""The grouped GEMM and the fused MoE layer against the reference on random routings (experts with
no tokens, all tokens on one expert, k = 1, T not a multiple of a block), fp16 on the CPU in
Triton's interpreter (bf16 on a GPU); the kernel writes every routed row of a poisoned output; bad
input is refused by name."""
import pytest
import torch

from conftest import DEVICE, KERNEL_DTYPES
from w4a16.backends.triton import moe as kernel
from w4a16.errors import W4A16Error
from w4a16.moe import QuantizedExperts, align, fused_moe, grouped_gemm
from w4a16.moe import reference
from w4a16.moe.ops import block_m_for

TOL = {torch.float16: 2e-3, torch.bfloat16: 1e-2}


def _rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def _experts(gen, E, N, K, g, zeros, dtype):
    w = torch.randn(E, N, K, generator=gen)
    return QuantizedExperts.quantize(w, g, not zeros, dtype).to(DEVICE)


def _routing(gen, T, k, E, kind):
    if kind == "one":
        ids = torch.full((T, k), 1)
        if k > 1:
            ids[:, 1:] = torch.arange(2, 1 + k)
    elif kind == "few":          # only experts 0 and E-1 get tokens
        ids = torch.stack([torch.tensor([0, E - 1][:k]) for _ in range(T)])
    else:
        ids = torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(T)])
    w = torch.rand(T, k, generator=gen) + 0.1
    return ids.to(DEVICE), (w / w.sum(1, keepdim=True)).to(DEVICE)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("T,k,E,g,zeros,kind", [(1, 1, 4, 32, False, "random"), (37, 2, 8, 64, True, "random"),
                                                 (16, 4, 6, -1, False, "one"), (9, 2, 8, 32, True, "few"),
                                                 (3, 8, 8, 32, False, "random")])
def test_fused_moe_matches_reference(gen, dtype, T, k, E, g, zeros, kind):
    H, I = 64, 128
    gu, dn = _experts(gen, E, 2 * I, H, g, zeros, dtype), _experts(gen, E, H, I, g, zeros, dtype)
    x = torch.randn(T, H, generator=gen).to(DEVICE, dtype)
    ids, w = _routing(gen, T, k, E, kind)
    y = fused_moe(x, gu, dn, ids, w, backend="triton")
    ref = reference.fused_moe(x, gu, dn, ids, w)
    assert y.shape == (T, H) and y.dtype == dtype
    assert torch.isfinite(y).all() and _rel(y, ref) < TOL[dtype]


@pytest.mark.parametrize("wide", [False, True])
def test_fused_moe_over_many_slots_matches_reference(gen, monkeypatch, wide):
    """More slots than the one-launch align kernel takes (1040 > ALIGN_MAX_SLOTS): the grouping by
    the torch operations and by the two-launch align kernels (ops.WIDE_ALIGN) both give the
    reference's layer."""
    from w4a16.moe import ops

    monkeypatch.setattr(ops, "WIDE_ALIGN", wide)
    T, k, E, H, I = 130, 8, 16, 64, 32
    gu, dn = _experts(gen, E, 2 * I, H, 32, False, torch.float16), _experts(gen, E, H, I, 32, False, torch.float16)
    x = torch.randn(T, H, generator=gen).to(DEVICE, torch.float16)
    ids, w = _routing(gen, T, k, E, "random")
    ids[3, 0] = E                                   # another rank's choice
    y = fused_moe(x, gu, dn, ids, w, backend="triton")
    ref = reference.fused_moe(x, gu, dn, ids, w)
    assert torch.isfinite(y).all() and _rel(y, ref) < TOL[torch.float16]


@pytest.mark.parametrize("gather", [True, False])
def test_kernel_writes_every_routed_row_of_a_poisoned_output(gen, gather):
    E, N, K, T, k = 5, 72, 64, 11, 3
    ex = _experts(gen, E, N, K, 32, True, torch.float16)
    ids, w = _routing(gen, T, k, E, "random")
    x = torch.randn(T if gather else T * k, K, generator=gen).to(DEVICE, torch.float16)
    r = align(ids, E, block_m_for(T * k, E))
    out = torch.full((T * k, N), float("nan"), dtype=torch.float32, device=DEVICE)
    kernel.grouped_gemm(x, ex, r, k, gather, out, w.reshape(-1).float())
    ref = reference.grouped_gemm(x, ex, ids, gather, w)
    assert torch.isfinite(out).all()                                      # every element written
    assert _rel(out, ref) < TOL[torch.float16]


@pytest.mark.parametrize("K,g,zeros", [(96, 32, False), (80, -1, True), (256, 256, True)])
def test_grouped_gemm_api_matches_reference(gen, K, g, zeros):
    E, N, T, k = 4, 40, 7, 2
    ex = _experts(gen, E, N, K, g, zeros, torch.float16)
    ids, _ = _routing(gen, T, k, E, "random")
    x = torch.randn(T, K, generator=gen).to(DEVICE, torch.float16)
    y = grouped_gemm(x, ex, ids, backend="triton")
    assert y.shape == (T * k, N) and _rel(y, reference.grouped_gemm(x, ex, ids)) < TOL[torch.float16]


def test_quantized_experts_round_trip(gen):
    w = torch.randn(3, 16, 64, generator=gen)
    ex = QuantizedExperts.quantize(w, 32, False, torch.float16)
    assert ex.shape == (3, 16, 64) and ex.unpack().max() <= 15
    deq = ex.dequantize()
    assert _rel(deq, w) < 0.15                                             # 4-bit rounding
    assert torch.equal(ex.dequantize(experts=[2])[0], deq[2])
    assert "E=3, N=16, K=64" in repr(ex)


def _bad_call(gen):
    E, H, I, T, k = 4, 64, 32, 3, 2
    gu, dn = _experts(gen, E, 2 * I, H, 32, False, torch.float16), _experts(gen, E, H, I, 32, False, torch.float16)
    x = torch.randn(T, H, generator=gen).to(DEVICE, torch.float16)
    ids, w = _routing(gen, T, k, E, "random")
    return x, gu, dn, ids, w


@pytest.mark.parametrize("change,match", [
    (lambda a: {**a, "x": a["x"].float()}, "x.dtype: expected torch.float16 or torch.bfloat16"),
    (lambda a: {**a, "x": a["x"][:, :32]}, r"x.shape\[1\] \(H\): expected gate_up's K = 64, got 32"),
    (lambda a: {**a, "topk_weights": a["topk_weights"][:, :1]}, "topk_weights.shape: expected"),
    (lambda a: {**a, "topk_ids": a["topk_ids"].float()}, "topk_ids.dtype: expected an integer dtype"),
    (lambda a: {**a, "down": a["gate_up"]}, "down.shape: expected"),
    (lambda a: {**a, "backend": "cuda"}, "backend: expected one of"),
])
def test_bad_input_is_refused_by_name(gen, change, match):
    x, gu, dn, ids, w = _bad_call(gen)
    args = change({"x": x, "gate_up": gu, "down": dn, "topk_ids": ids, "topk_weights": w})
    with pytest.raises(W4A16Error, match=match):
        fused_moe(**args)


@pytest.mark.parametrize("make,match", [
    (lambda: QuantizedExperts(torch.zeros(2, 4, 8, dtype=torch.int32), torch.ones(2, 4, 1).half(), None, -1),
     "qweight.dtype: expected torch.uint8"),
    (lambda: QuantizedExperts(torch.zeros(2, 4, 8, dtype=torch.uint8), torch.ones(2, 4, 2).half(), None, -1),
     r"scales.shape: expected \(2, 4, 1\), got \(2, 4, 2\)"),
    (lambda: QuantizedExperts(torch.zeros(2, 4, 8, dtype=torch.uint8), torch.ones(2, 4, 1).half(), None, 48),
     "group_size: expected one of"),
    (lambda: QuantizedExperts(torch.zeros(4, 8, dtype=torch.uint8), torch.ones(4, 1).half()),
     r"qweight: expected a 3-D tensor \[E, N, K/2\], got 2-D"),
])
def test_bad_experts_are_refused_by_name(make, match):
    with pytest.raises(W4A16Error, match=match):
        make()


def test_custom_op_traces_whole_and_matches(gen):
    """The layer is one custom op: torch.compile traces it without a graph break (fake shapes),
    and torch.library.opcheck accepts its registration. (An eager call first packs the experts:
    tracing a call on experts no kernel has packed yet breaks the graph there, as for dense weights.)"""
    x, gu, dn, ids, w = _bad_call(gen)
    fused_moe(x, gu, dn, ids, w)
    f = torch.compile(lambda *a: fused_moe(*a), backend="aot_eager", fullgraph=True)
    y = f(x, gu, dn, ids, w)
    assert _rel(y, reference.fused_moe(x, gu, dn, ids, w)) < TOL[torch.float16]
    from w4a16.moe.ops import fused_moe_op

    E, I2, H = gu.shape
    args = (x, *gu.plain_parts(), *dn.plain_parts(), ids, w, [E, I2 // 2, H, 32, 32, 0, 0], "reference")
    torch.library.opcheck(fused_moe_op, args, test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_no_tokens(gen, backend):
    x, gu, dn, ids, w = _bad_call(gen)
    y = fused_moe(x[:0], gu, dn, ids[:0], w[:0], backend=backend)
    assert y.shape == (0, x.shape[1]) and y.dtype == x.dtype
    assert grouped_gemm(x[:0], gu, ids[:0], backend=backend).shape == (0, gu.shape[1])



@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_ids_outside_the_experts_contribute_nothing(gen, backend):
    """transformers marks a choice another rank owns with the id E: such a choice (or any id
    outside [0, E)) adds nothing, as if its weight were 0, on every backend (and no host read)."""
    x, gu, dn, ids, w = _bad_call(gen)
    E = gu.shape[0]
    skip = ids.clone()
    skip[0, 1], skip[2, 0] = E, -1
    got = fused_moe(x, gu, dn, skip, w, backend=backend)
    w0 = w.clone()
    w0[0, 1], w0[2, 0] = 0.0, 0.0
    want = reference.fused_moe(x, gu, dn, ids, w0)
    assert _rel(got, want) < TOL[torch.float16]
    rows = grouped_gemm(x, gu, skip, backend=backend)
    assert torch.equal(rows[1], torch.zeros_like(rows[1])) and rows[0].abs().sum() > 0


def test_stack_of_expert_weights(gen):
    """QuantizedExperts.stack: an expert without zero points gets z = 8 beside one with them (the
    same dequantized weights), and experts of other shapes or group sizes are refused by index."""
    import w4a16

    sym = w4a16.quantize(torch.randn(16, 64, generator=gen), 32, symmetric=True, dtype=torch.float16)
    asym = w4a16.quantize(torch.randn(16, 64, generator=gen), 32, symmetric=False, dtype=torch.float16)
    ex = QuantizedExperts.stack([sym, asym])
    assert ex.zeros is not None and torch.equal(ex.dequantize(experts=[0])[0], sym.dequantize(torch.float32))
    with pytest.raises(W4A16Error, match=r"weights\[1\].shape: expected \(16, 64\), got \(8, 64\)"):
        QuantizedExperts.stack([sym, w4a16.quantize(torch.randn(8, 64, generator=gen), 32)])
    with pytest.raises(W4A16Error, match=r"weights\[1\] group size: expected 32, got 64"):
        QuantizedExperts.stack([sym, w4a16.quantize(torch.randn(16, 64, generator=gen), 64)])


def test_module_weights_follow_in_place_edits_and_replaced_buffers(gen, monkeypatch):
    """W4A16Experts keeps its QuantizedExperts between calls: an in-place edit of a buffer is seen
    by the next call (the buffers are the experts' own tensors), an assigned buffer is checked (a
    wrong shape is refused by name) and one replaced behind the module's back is checked on the
    next call. Eager calls do not go through the custom op's dispatch."""
    from w4a16.moe import W4A16Experts
    from w4a16.moe import ops

    E, I, H, T, k = 4, 64, 64, 3, 2
    m = W4A16Experts(_experts(gen, E, 2 * I, H, 32, False, torch.float16),
                     _experts(gen, E, H, I, 32, False, torch.float16), backend="reference")
    x = torch.randn(T, H, generator=gen).to(DEVICE, torch.float16)
    ids, w = _routing(gen, T, k, E, "random")
    monkeypatch.setattr(ops, "fused_moe_op", lambda *a: pytest.fail("eager call dispatched the custom op"))
    y0 = m(x, ids, w)
    assert m.weights() is m.weights()
    m.down_scales.mul_(2)                                   # in place: seen
    torch.testing.assert_close(m(x, ids, w).float(), 2 * y0.float(), rtol=1e-2, atol=1e-2)
    with pytest.raises(W4A16Error, match="scales.shape"):
        m.down_scales = m.down_scales[:, :, :1].contiguous()   # assigned with a wrong shape: refused
    m._buffers["down_scales"] = m.down_scales[:, :, :1].contiguous()   # behind the module's back
    with pytest.raises(W4A16Error, match="scales.shape"):
        m(x, ids, w)
