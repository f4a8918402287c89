"""The RMSNorm prologue (``gemm(input_norm=(weight, eps))``: x is read RMS-normalized): the reference,
the Triton kernel in the CPU interpreter (fp16; tile and split-K, K a multiple of the chunk or not,
act-order, with the residual + RMSNorm epilogue), a backend without it (the norm then runs in torch
first), the custom op (fake, autograd), torch.compile, the eager fast path and bad arguments."""
import pytest
import torch

from epilogue_cases import CONFIG_IDS, CONFIGS, close_everywhere, needs_interpreter

import w4a16
from w4a16 import epilogue as E
from w4a16.errors import W4A16Error
from w4a16.measure import random_weight


def _case(M, N, K, g, gen, zeros="int"):
    """(x [M, K] with rows of different scales, w [N, K], the norm (weight [K], eps))."""
    w = random_weight(N, K, g, zeros, torch.float16, "cpu", gen)
    x = (torch.randn(M, K, generator=gen) * torch.rand(M, 1, generator=gen) * 8).half()
    return x, w, ((torch.rand(K, generator=gen) + 0.5).half(), 1e-5)


def _ref(x, w, norm, **kw):
    return w4a16.reference.gemm(E.rms_norm(x, *norm), w, **kw)


def test_reference_normalizes_x_first(gen):
    x, w, norm = _case(5, 48, 128, 32, gen)
    assert torch.equal(w4a16.reference.gemm(x, w, input_norm=norm), _ref(x, w, norm))


@needs_interpreter
@pytest.mark.parametrize("cfg", CONFIGS, ids=CONFIG_IDS)
@pytest.mark.parametrize("M,N,K,g", [(1, 40, 128, 32), (7, 72, 192, 64), (20, 50, 200, -1)])
def test_triton_reads_x_normalized(cfg, M, N, K, g):
    gen = torch.Generator().manual_seed(M * 100 + K)
    x, w, norm = _case(M, N, K, g, gen)
    bias = (torch.randn(N, generator=gen) * 0.1).half()
    want = _ref(x, w, norm, bias=bias, alpha=0.5)
    b = w4a16.backends.selection.get("triton")
    out = torch.full((M, N), float("nan"), dtype=torch.float16)   # poisoned: every element must be written
    b.run(x, w.prepared(b), bias, 0.5, cfg, True, out, input_norm=E.Norm(*norm))
    close_everywhere(out, want, torch.float16)
    y = w4a16.gemm(x, w, bias, 0.5, config=cfg, backend="triton", input_norm=norm)
    assert torch.equal(y, out)


@needs_interpreter
def test_triton_prologue_with_act_order_and_the_norm_epilogue(gen):
    """An act-order weight (x's columns gathered: the norm weight follows them) and both norms in
    one call."""
    x, w, norm = _case(3, 48, 128, 32, gen)
    perm = torch.randperm(128, generator=gen)
    w = w4a16.QuantizedWeight.from_plain(w.plain_codes(), w.params.scales, w.params.zeros, 32, perm)
    r = torch.randn(3, 48, generator=gen).half()
    nw = (torch.rand(48, generator=gen) + 0.5).half()
    kw = dict(epilogue="residual_rmsnorm", residual=r, norm_weight=nw, norm_eps=1e-6)
    h, n = w4a16.gemm(x, w, config=CONFIGS[2], backend="triton", input_norm=norm, **kw)
    h_ref, _ = _ref(x, w, norm, **kw)
    close_everywhere(h, h_ref, torch.float16)
    close_everywhere(n, E.rms_norm(h, nw, 1e-6), torch.float16)


def test_a_backend_without_it_normalizes_in_torch_first(gen):
    from w4a16.backends.selection import get

    class Plain(type(get("reference"))):
        input_norm = False

        def run(self, x2, prepared, bias, alpha, cfg, deterministic=True, out=None, epilogue=None, residual=None,
                norm=None, input_norm=None):
            assert input_norm is None, "a backend without the prologue was handed the norm"
            return super().run(x2, prepared, bias, alpha, cfg, deterministic, out, epilogue, residual, norm)

    x, w, norm = _case(4, 24, 64, 32, gen)
    b = Plain()
    run = w4a16.ops.bound_run(b, w.prepared(b), 4, torch.float16, False, 1.0, "reference", True, None,
                              input_norm=True)
    assert torch.equal(run(x, None, None, None, E.Norm(*norm)), _ref(x, w, norm))


def test_eager_fast_path_takes_each_calls_norm(gen):
    x, w, norm = _case(3, 32, 64, 32, gen)
    for i in range(3):
        nrm = (norm[0] * (i + 1), 1e-5 * (i + 1))
        assert torch.equal(w4a16.gemm(x, w, backend="reference", input_norm=nrm), _ref(x, w, nrm))
    x3 = x.reshape(1, 3, 64)
    assert w4a16.gemm(x3, w, backend="reference", input_norm=norm).shape == (1, 3, 32)


@pytest.mark.parametrize("through", ["gemm", "op"])
def test_gradients_flow_to_x_and_the_norm_weight(gen, through):
    """Through gemm (the norm then runs in torch, autograd differentiates it) and through the custom
    op called with the norm (its own backward)."""
    x, w, (nw, eps) = _case(3, 32, 64, 32, gen)
    xg, nwg = x.clone().requires_grad_(), nw.clone().requires_grad_()
    if through == "gemm":
        y = w4a16.gemm(xg, w, backend="reference", input_norm=(nwg, eps))
    else:
        b = w4a16.backends.selection.get("reference")
        y = w4a16.ops.gemm_op(xg, b.op_tensors(w.prepared(b)), None, 1.0, [32, 64, 32], "reference", "reference",
                              True, "", None, None, 0.0, nwg, eps)
    dy = torch.randn(y.shape, generator=gen).half()
    y.backward(dy)
    x32, w32 = x.float().requires_grad_(), nw.float().requires_grad_()
    xn = w32 * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps))
    (xn @ w.dequantize(torch.float32).t()).backward(dy.float())
    close_everywhere(xg.grad, x32.grad, torch.float16)
    close_everywhere(nwg.grad, w32.grad, torch.float16)


def test_custom_op_fake_and_schema(gen):
    x, w, (nw, eps) = _case(3, 32, 64, 32, gen)
    b = w4a16.backends.selection.get("reference")
    args = (x, b.op_tensors(w.prepared(b)), None, 1.0, [32, 64, 32], "reference", "reference", True, "", None,
            None, 0.0, nw, eps)
    torch.library.opcheck(w4a16.ops.gemm_op, args, test_utils=("test_schema", "test_faketensor"))
    assert torch.equal(w4a16.ops.gemm_op(*args), _ref(x, w, (nw, eps)))


def test_compiled_call(gen):
    x, w, norm = _case(3, 32, 64, 32, gen)

    def f(x):
        return w4a16.gemm(x, w, backend="reference", input_norm=norm)

    f(x)   # prepared by an eager call first (preparing inside a traced call is a graph break)
    assert torch.equal(torch.compile(f, backend="eager", fullgraph=True)(x), _ref(x, w, norm))


@pytest.mark.parametrize("value,match", [
    ("weight", r"input_norm: expected None or \(weight \[K\], eps\), got Tensor"),
    (("short", 1e-5), r"input_norm\[0\].shape: expected \(64,\), got \(63,\)"),
    (("fp32", 1e-5), r"input_norm\[0\].dtype: expected torch.float16, got torch.float32"),
    (("ok", -1.0), r"input_norm\[1\] \(eps\): expected a finite float >= 0, got -1.0"),
])
def test_bad_input_norm(gen, value, match):
    x, w, (nw, _) = _case(3, 32, 64, 32, gen)
    tensors = {"weight": nw, "ok": nw, "short": nw[:63], "fp32": nw.float()}
    value = tensors[value] if isinstance(value, str) else (tensors[value[0]], value[1])
    for fn in (w4a16.gemm, w4a16.reference.gemm):
        with pytest.raises(W4A16Error, match=match):
            fn(x, w, input_norm=value)
