"""Non-finite semantics of the contract, as ``reference.gemm`` defines them (CPU).

A NaN/inf scale, zero point or activation propagates as IEEE fp32 arithmetic of the contract
formula: W = (q - z) * s element by element, then the terms x[m, k] * W[n, k], summed. So
(q - z) * inf is NaN where q == z, 0 * inf is NaN, +inf + -inf is NaN, and a sum of infinite
terms of one sign is that infinity. The oracle below evaluates exactly that with an explicit
[M, N, K] product (independent of the reference's code and of any BLAS).
"""
import pytest
import torch

import w4a16
from w4a16.pack import pack_nibbles

INF, NAN = float("inf"), float("nan")


def oracle(x, codes, scales, zeros, g, bias=None, alpha=1.0):
    """IEEE fp32 evaluation of the contract, term by term; cast to x's dtype."""
    q = codes.float()
    s = scales.float().repeat_interleave(g, dim=1)
    z = 8.0 if zeros is None else zeros.float().repeat_interleave(g, dim=1)
    W = (q - z) * s                                           # [N, K]
    y = (x.float()[:, None, :] * W[None, :, :]).sum(-1) * alpha  # [M, N]
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def same(a, b):
    """Equal NaN positions, equal infinities (with sign), finite values close."""
    assert torch.equal(a.isnan(), b.isnan()), (a, b)
    assert torch.equal(a.isinf() & (a > 0), b.isinf() & (b > 0)), (a, b)
    assert torch.equal(a.isinf() & (a < 0), b.isinf() & (b < 0)), (a, b)
    fin = a.isfinite()
    torch.testing.assert_close(a[fin].float(), b[fin].float(), rtol=2e-3, atol=1e-3)


def weight(codes, scales, zeros=None, g=32):
    return w4a16.QuantizedWeight.from_plain(pack_nibbles(codes), scales, zeros, g)


def test_inf_scale_rules():
    N, K, g = 3, 32, 32
    codes = torch.full((N, K), 9, dtype=torch.uint8)  # q - z = 1 everywhere
    codes[1, 5] = 8                                     # row 1: one q == z -> (q - z) * inf = NaN
    codes[2, :16] = 7                                   # row 2: q - z = -1 on half: -inf and +inf terms
    scales = torch.full((N, 1), INF, dtype=torch.float16)
    w = weight(codes, scales, g=g)
    x = torch.ones(2, K, dtype=torch.float16)
    x[1, 3] = 0                                         # row 1 of x: 0 * inf = NaN for every output
    y = w4a16.reference.gemm(x, w)
    assert y[0, 0] == INF and y[0, 1].isnan() and y[0, 2].isnan()
    assert y[1].isnan().all()
    same(y, oracle(x, codes, scales, None, g))


def test_nan_and_inf_in_zeros_and_activations():
    N, K, g = 4, 64, 32
    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (N, K), generator=gen, dtype=torch.uint8)
    scales = (torch.rand(N, 2, generator=gen) * 0.01 + 0.005).half()
    zeros = torch.randint(0, 16, (N, 2), generator=gen).half()
    zeros[0, 1], zeros[1, 0], zeros[2, 0] = INF, NAN, -INF
    x = torch.randn(3, K, generator=gen).half()
    x[1, 40] = NAN
    x[2, 7] = INF
    w = weight(codes, scales, zeros, g)
    same(w4a16.reference.gemm(x, w), oracle(x, codes, scales, zeros, g))


@pytest.mark.parametrize("seed", range(12))
def test_random_non_finite_inputs_follow_ieee(seed):
    gen = torch.Generator().manual_seed(seed)
    M, N, K, g = 5, 6, 64, 32
    codes = torch.randint(0, 16, (N, K), generator=gen, dtype=torch.uint8)
    scales = (torch.rand(N, K // g, generator=gen) * 0.01 + 0.005).half()
    zeros = torch.randint(0, 16, (N, K // g), generator=gen).half() if seed % 2 else None
    x = torch.randn(M, K, generator=gen).half()
    x[torch.rand(M, K, generator=gen) < 0.1] = 0
    specials = torch.tensor([INF, -INF, NAN]).half()
    for t, p in ((scales, 0.15), (x, 0.02)) + (((zeros, 0.1),) if zeros is not None else ()):
        hit = torch.rand(t.shape, generator=gen) < p
        t[hit] = specials[torch.randint(0, 3, (int(hit.sum()),), generator=gen)]
    bias = torch.randn(N, generator=gen).half()
    bias[seed % N] = (INF, -INF, NAN)[seed % 3]
    alpha = (1.0, 0.0, -0.5)[seed % 3]  # alpha = 0 keeps NaN and makes inf terms NaN
    w = weight(codes, scales, zeros, g)
    same(w4a16.reference.gemm(x, w, bias, alpha), oracle(x, codes, scales, zeros, g, bias, alpha))


def test_dequantize_fp32_is_the_formula():
    codes = torch.tensor([[8, 9, 7, 8] * 8], dtype=torch.uint8)
    scales = torch.tensor([[INF]], dtype=torch.float16)
    W = w4a16.reference.dequantize_fp32(weight(codes, scales))
    assert W[0, 0].isnan() and W[0, 1] == INF and W[0, 2] == -INF


def test_finite_inputs_take_the_plain_product():
    gen = torch.Generator().manual_seed(3)
    codes = torch.randint(0, 16, (16, 128), generator=gen, dtype=torch.uint8)
    scales = (torch.rand(16, 4, generator=gen) * 0.01).half()
    x = torch.randn(4, 128, generator=gen).half()
    w = weight(codes, scales)
    expect = (x.float() @ w.dequantize(torch.float32).T).half()
    assert torch.equal(w4a16.reference.gemm(x, w), expect)


@pytest.mark.skipif(__import__("importlib").util.find_spec("triton") is None, reason="needs triton (interpreter)")
def test_auto_runs_non_finite_weights_on_a_tile_config(monkeypatch):
    """backend="auto" sends a weight with an infinite scale to the tile config "128" (the configs
    that scale after a group's dot product, and the Gluon kernels, do not follow the rule); the
    kernel result then matches the term-by-term rule. Fixing the scales in place routes back."""
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator().manual_seed(3)
    N, K, g = 48, 256, 64
    codes = torch.randint(0, 16, (N, K), generator=gen, dtype=torch.uint8)
    scales = (torch.rand(N, K // g, generator=gen) * 0.01 + 0.005).half()
    scales[0::3, 1] = INF                               # groups with a code 8 somewhere: NaN rows
    codes[1::3, g:2 * g] = 9 + codes[1::3, g:2 * g] % 7
    scales[1::3, 1] = INF                               # codes 9..15 only: +inf
    w = weight(codes, scales, None, g).to(dev)
    x = torch.rand(1, K, generator=gen).add(0.1).half()  # x > 0, M = 1: "auto" would pick a decode config
    choice = w4a16.choose(x.to(dev), w)
    if choice.backend.name == "reference":
        pytest.skip("no kernel backend runs here")
    assert choice.reason.startswith("non-finite"), choice.reason
    assert choice.backend.name == "triton" and choice.config == choice.backend.named_configs()["128"]
    y = w4a16.gemm(x.to(dev), w).cpu()
    same(y, oracle(x, codes, scales, None, g))
    assert bool(y[0, 0::3].isnan().all()) and bool((y[0, 1::3] == INF).all())
    w.scales[:, 1] = 0.01                               # in place: every scale finite again
    assert not w4a16.choose(x.to(dev), w).reason.startswith("non-finite")
    same(w4a16.gemm(x.to(dev), w).cpu(), oracle(x, codes, w.scales.cpu(), None, g))
