"""GEMM epilogues (w4a16.epilogue): SiLU(gate) * up of a paired gate/up weight and a residual
added before the cast, in the reference, the Triton kernel (CPU interpreter, fp16) and the custom
op (fake, autograd); the errors of bad arguments."""

import pytest
import torch

from epilogue_cases import (CONFIG_IDS, CONFIGS, close_everywhere, needs_interpreter, paired_weight, run_epilogue,
                            silu_mul_close)

import w4a16
from w4a16 import epilogue as E
from w4a16.errors import W4A16Error
from w4a16.measure import random_weight


def test_interleave_and_split_rows_are_inverse(gen):
    g, u = torch.randn(24, 5, generator=gen), torch.randn(24, 5, generator=gen)
    t = E.interleave_rows(g, u)
    assert torch.equal(t[0:8], g[0:8]) and torch.equal(t[8:16], u[0:8]) and torch.equal(t[16:24], g[8:16])
    g2, u2 = E.split_rows(t)
    assert torch.equal(g2, g) and torch.equal(u2, u)
    g3, u3 = E.split_rows(t.t().contiguous(), dim=1)
    assert torch.equal(g3, g.t()) and torch.equal(u3, u.t())


def test_pair_gate_up_dequantizes_to_the_interleaved_rows(gen):
    gate, up, w = paired_weight(32, 128, 64, "int", torch.float16, gen)
    assert torch.equal(w.dequantize(torch.float32), E.interleave_rows(gate.dequantize(torch.float32),
                                                                        up.dequantize(torch.float32)))


@pytest.mark.parametrize("zeros", [None, "int"])
def test_reference_silu_mul_is_silu_of_gate_times_up(gen, zeros):
    gate, up, w = paired_weight(48, 256, 64, zeros, torch.float16, gen)
    x = torch.randn(5, 256, generator=gen).half()
    y = w4a16.reference.gemm(x, w, epilogue="silu_mul", alpha=0.5)
    g32 = x.float() @ gate.dequantize(torch.float32).t() * 0.5
    u32 = x.float() @ up.dequantize(torch.float32).t() * 0.5
    assert y.shape == (5, 48)
    close_everywhere(y, torch.nn.functional.silu(g32) * u32, torch.float16)


def test_reference_residual_is_added_in_fp32(gen):
    w = random_weight(40, 128, 32, None, torch.float16, "cpu", gen)
    x = torch.randn(2, 3, 128, generator=gen).half()
    r = torch.randn(2, 3, 40, generator=gen).half() * 4
    bias = torch.randn(40, generator=gen).half()
    y = w4a16.reference.gemm(x, w, bias, residual=r)
    ref = (x.float() @ w.dequantize(torch.float32).t() + bias.float() + r.float()).half()
    assert y.shape == (2, 3, 40) and torch.equal(y, ref)


@needs_interpreter
@pytest.mark.parametrize("cfg", CONFIGS, ids=CONFIG_IDS)
@pytest.mark.parametrize("M,I,K,g,zeros", [(1, 16, 128, 32, None), (5, 40, 256, 64, "int"), (17, 24, 192, -1, "float")])
def test_triton_silu_mul(cfg, M, I, K, g, zeros):
    gen = torch.Generator().manual_seed(M * 100 + I)
    _, _, w = paired_weight(I, K, g, zeros, torch.float16, gen)
    x = torch.randn(M, K, generator=gen).half()
    bias = (torch.randn(2 * I, generator=gen) * 0.1).half() if M % 2 else None
    y = run_epilogue(x, w, "silu_mul", bias=bias, alpha=0.75, config=cfg, backend="triton")
    silu_mul_close(y, x, w, bias, 0.75, torch.float16)


@needs_interpreter
@pytest.mark.parametrize("cfg", CONFIGS, ids=CONFIG_IDS)
@pytest.mark.parametrize("M,N,K,g", [(1, 40, 128, 32), (7, 33, 256, 128), (18, 64, 192, -1)])
def test_triton_residual(cfg, M, N, K, g):
    gen = torch.Generator().manual_seed(M * 100 + N)
    w = random_weight(N, K, g, "int", torch.float16, "cpu", gen)
    x = torch.randn(M, K, generator=gen).half()
    r = torch.randn(M, N, generator=gen).half()
    y = run_epilogue(x, w, "residual", residual=r, config=cfg, backend="triton")
    close_everywhere(y, w4a16.reference.gemm(x, w, residual=r), torch.float16)


@needs_interpreter
def test_triton_epilogue_with_nondeterministic_split_k_sums_in_order(gen):
    """Atomic split-K is for the plain epilogue: with an epilogue the partials are summed in split
    order, so deterministic=False still gives the deterministic result."""
    _, _, w = paired_weight(16, 512, 128, None, torch.float16, gen)
    x = torch.randn(3, 512, generator=gen).half()
    a = w4a16.gemm(x, w, epilogue="silu_mul", config=CONFIGS[2], deterministic=False, backend="triton")
    b = w4a16.gemm(x, w, epilogue="silu_mul", config=CONFIGS[2], deterministic=True, backend="triton")
    assert torch.equal(a, b)


def test_eager_fast_path_keeps_the_epilogue(gen):
    """Repeated calls (the bound fast path) with and without epilogues on one weight stay apart."""
    _, _, w = paired_weight(16, 128, 64, None, torch.float16, gen)
    x = torch.randn(2, 128, generator=gen).half()
    r = torch.randn(2, 32, generator=gen).half()
    for _ in range(2):
        plain = w4a16.gemm(x, w, backend="reference")
        act = w4a16.gemm(x, w, epilogue="silu_mul", backend="reference")
        res = w4a16.gemm(x, w, residual=r, backend="reference")
        assert plain.shape == (2, 32) and act.shape == (2, 16)
        assert torch.equal(plain, w4a16.reference.gemm(x, w))
        assert torch.equal(act, w4a16.reference.gemm(x, w, epilogue="silu_mul"))
        assert torch.equal(res, w4a16.reference.gemm(x, w, residual=r))
        r2 = torch.randn(2, 32, generator=gen).half()   # a new residual: not the one bound before
        assert torch.equal(w4a16.gemm(x, w, residual=r2, backend="reference"), w4a16.reference.gemm(x, w, residual=r2))


@pytest.mark.parametrize("epilogue", ["silu_mul", "residual"])
def test_gradients_flow_through_the_epilogue(gen, epilogue):
    _, _, w = paired_weight(16, 64, 32, "int", torch.float16, gen)
    x = torch.randn(3, 64, generator=gen).half().requires_grad_()
    bias = (torch.randn(32, generator=gen) * 0.1).half().requires_grad_()
    r = torch.randn(3, 32, generator=gen).half().requires_grad_() if epilogue == "residual" else None
    y = w4a16.gemm(x, w, bias, 0.5, epilogue=epilogue, residual=r, backend="reference")
    dy = torch.randn(y.shape, generator=gen).half()
    y.backward(dy)
    # the same function in fp32 autograd on the dequantized weight
    x32 = x.detach().float().requires_grad_()
    b32 = bias.detach().float().requires_grad_()
    pre = x32 @ w.dequantize(torch.float32).t() * 0.5 + b32
    r32 = None
    if epilogue == "silu_mul":
        out = E.silu_mul(pre)
    else:
        r32 = r.detach().float().requires_grad_()
        out = pre + r32
    out.backward(dy.float())
    close_everywhere(x.grad, x32.grad, torch.float16)
    close_everywhere(bias.grad, b32.grad, torch.float16)
    if r32 is not None:
        close_everywhere(r.grad, r32.grad, torch.float16)


@pytest.mark.parametrize("epilogue", ["silu_mul", "residual"])
def test_custom_op_fake_and_schema(gen, epilogue):
    _, _, w = paired_weight(16, 64, 32, None, torch.float16, gen)
    b = w4a16.backends.selection.get("reference")
    pw = w.prepared(b)
    x = torch.randn(3, 64, generator=gen).half()
    r = torch.randn(3, 32, generator=gen).half() if epilogue == "residual" else None
    args = (x, b.op_tensors(pw), None, 1.0, [32, 64, 32], "reference", "reference", True, epilogue, r)
    torch.library.opcheck(w4a16.ops.gemm_op, args, test_utils=("test_schema", "test_faketensor"))
    y = w4a16.ops.gemm_op(*args)
    assert y.shape == (3, E.out_features(32, epilogue))
    close_everywhere(y, w4a16.reference.gemm(x, w, epilogue=epilogue, residual=r), torch.float16)


def test_compiled_call_with_epilogues(gen):
    _, _, w = paired_weight(16, 64, 32, None, torch.float16, gen)
    x = torch.randn(3, 64, generator=gen).half()
    r = torch.randn(3, 32, generator=gen).half()

    def f(x, r):
        h = w4a16.gemm(x, w, epilogue="silu_mul", backend="reference")
        return h, w4a16.gemm(x, w, residual=r, backend="reference")

    f(x, r)   # prepared by an eager call first (preparing inside a traced call is a graph break)
    h, y = torch.compile(f, backend="eager", fullgraph=True)(x, r)
    assert torch.equal(h, w4a16.reference.gemm(x, w, epilogue="silu_mul"))
    assert torch.equal(y, w4a16.reference.gemm(x, w, residual=r))


@pytest.mark.parametrize("kwargs,match", [
    (dict(epilogue="gelu"), "epilogue: expected None or 'silu_mul' or 'residual' or 'residual_rmsnorm', got 'gelu'"),
    (dict(epilogue="residual"), "residual: expected a tensor"),
    (dict(epilogue="silu_mul", residual="r"), "residual: expected None with epilogue='silu_mul'"),
    (dict(residual="short"), r"residual.shape: expected \(3, 32\), got \(3, 31\)"),
    (dict(residual="fp32"), "residual.dtype: expected torch.float16, got torch.float32"),
])
def test_bad_epilogue_arguments(gen, kwargs, match):
    _, _, w = paired_weight(16, 64, 32, None, torch.float16, gen)
    x = torch.randn(3, 64, generator=gen).half()
    res = {"r": torch.randn(3, 32).half(), "short": torch.randn(3, 31).half(), "fp32": torch.randn(3, 32)}
    if "residual" in kwargs:
        kwargs = dict(kwargs, residual=res[kwargs["residual"]])
    for fn in (w4a16.gemm, w4a16.reference.gemm):
        with pytest.raises(W4A16Error, match=match):
            fn(x, w, **kwargs)


def test_silu_mul_needs_rows_in_blocks_of_16(gen):
    w = random_weight(40, 64, 32, None, torch.float16, "cpu", gen)
    x = torch.randn(2, 64, generator=gen).half()
    with pytest.raises(W4A16Error, match=r"w.shape\[0\] \(N\) with epilogue='silu_mul': expected a multiple of 16"):
        w4a16.gemm(x, w, epilogue="silu_mul")
    with pytest.raises(W4A16Error, match=r"gate.shape\[0\]: expected a multiple of 8, got 12"):
        E.interleave_rows(torch.zeros(12, 2), torch.zeros(12, 2))


def test_a_backend_without_the_epilogue_is_skipped_with_the_reason():
    from w4a16.backends.base import Problem
    from w4a16.backends.selection import get, why_not

    ref = get("reference")
    p = Problem(1, 32, 64, 32, torch.float16, False, torch.device("cpu"), "silu_mul")
    assert why_not(ref, p) is None

    class Plain(type(ref)):
        epilogues = (None,)

    assert why_not(Plain(), p) == "no 'silu_mul' epilogue"
