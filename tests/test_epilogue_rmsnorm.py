"""The "residual_rmsnorm" epilogue (w4a16.epilogue): h = x @ W^T + bias + residual and n = RMSNorm(h)
* weight, in the reference, the Triton kernel (CPU interpreter, fp16: several N tiles, row blocks
and K splits, so the row reduction across tiles is exercised), a backend without it (the norm
then runs in torch), the custom op (fake, autograd), torch.compile and the eager fast path."""

import pytest
import torch

from epilogue_cases import CONFIG_IDS, CONFIGS, close_everywhere, needs_interpreter, run_epilogue

import w4a16
from w4a16 import epilogue as E
from w4a16.config import GemmConfig
from w4a16.errors import W4A16Error
from w4a16.measure import random_weight


def _case(M, N, K, g, gen, dtype=torch.float16):
    """(x [M, K], w [N, K], residual [M, N], bias [N], Norm) of random values."""
    w = random_weight(N, K, g, "int", dtype, "cpu", gen)
    x = torch.randn(M, K, generator=gen).to(dtype)
    r = (torch.randn(M, N, generator=gen) * 2).to(dtype)
    bias = (torch.randn(N, generator=gen) * 0.1).to(dtype)
    norm = E.Norm((torch.rand(N, generator=gen) + 0.5).to(dtype), 1e-5)
    return x, w, r, bias, norm


def check_pair(h, n, x, w, r, bias, alpha, norm, dtype):
    """h within rounding of the reference's, and n within rounding of the norm of the h computed
    (the kernel normalizes h as it stored it)."""
    h_ref, _ = w4a16.reference.gemm(x, w, bias, alpha, epilogue="residual_rmsnorm", residual=r,
                                    norm_weight=norm.weight, norm_eps=norm.eps)
    close_everywhere(h, h_ref, dtype)
    close_everywhere(n, E.rms_norm(h.cpu(), norm.weight.cpu(), norm.eps), dtype)


def test_reference_is_the_residual_epilogue_then_the_norm(gen):
    x, w, r, bias, norm = _case(5, 48, 128, 32, gen)
    h, n = w4a16.reference.gemm(x, w, bias, 0.5, epilogue="residual_rmsnorm", residual=r, norm_weight=norm.weight,
                                norm_eps=norm.eps)
    assert torch.equal(h, w4a16.reference.gemm(x, w, bias, 0.5, residual=r))
    assert torch.equal(n, E.rms_norm(h, norm.weight, norm.eps))


def test_rms_norm_is_the_models_own_norm(gen):
    """E.rms_norm computes what Llama's RMSNorm module does, bitwise (fp16 and bf16)."""
    transformers = pytest.importorskip("transformers")
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    for dtype in (torch.float16, torch.bfloat16):
        mod = LlamaRMSNorm(64, eps=1e-5).to(dtype)
        with torch.no_grad():
            mod.weight.copy_(torch.rand(64, generator=gen) + 0.5)
        h = (torch.randn(7, 64, generator=gen) * 3).to(dtype)
        with torch.no_grad():
            assert torch.equal(E.rms_norm(h, mod.weight, 1e-5), mod(h)), transformers.__version__


@needs_interpreter
@pytest.mark.parametrize("cfg", CONFIGS, ids=CONFIG_IDS)
@pytest.mark.parametrize("M,N,K,g", [(1, 40, 128, 32), (7, 72, 256, 128), (20, 50, 192, -1)])
def test_triton_residual_rmsnorm(cfg, M, N, K, g):
    gen = torch.Generator().manual_seed(M * 100 + N)
    x, w, r, bias, norm = _case(M, N, K, g, gen)
    bias = bias if M % 2 else None
    h, n = run_epilogue(x, w, "residual_rmsnorm", residual=r, bias=bias, alpha=0.75, norm=norm, config=cfg,
                        backend="triton")
    check_pair(h, n, x, w, r, bias, 0.75, norm, torch.float16)
    # the row-block counters were left at 0: a second call (a new residual) is right too
    r2 = torch.randn(M, N, generator=gen).half()
    h2, n2 = w4a16.gemm(x, w, bias, 0.75, config=cfg, backend="triton", epilogue="residual_rmsnorm", residual=r2,
                        norm_weight=norm.weight, norm_eps=norm.eps)
    check_pair(h2, n2, x, w, r2, bias, 0.75, norm, torch.float16)


@needs_interpreter
def test_triton_norm_of_rows_longer_than_one_step(gen):
    """Rows of more columns than the norm reads per step (8192 elements: 512 columns of 16 rows)."""
    x, w, r, bias, norm = _case(3, 1100, 64, 32, gen)
    h, n = run_epilogue(x, w, "residual_rmsnorm", residual=r, bias=bias, norm=norm,
                        config=GemmConfig("splitk", 16, 128, split_k=2, num_warps=4, num_stages=2), backend="triton")
    check_pair(h, n, x, w, r, bias, 1.0, norm, torch.float16)


@needs_interpreter
def test_triton_residual_rmsnorm_is_deterministic_with_atomic_split_k_asked(gen):
    x, w, r, _, norm = _case(3, 48, 256, 64, gen)
    kw = dict(config=CONFIGS[2], backend="triton", epilogue="residual_rmsnorm", residual=r, norm_weight=norm.weight,
              norm_eps=norm.eps)
    a = w4a16.gemm(x, w, deterministic=False, **kw)
    b = w4a16.gemm(x, w, deterministic=True, **kw)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_a_backend_without_the_norm_runs_it_in_torch(gen):
    """bound_run over a backend whose kernels stop at the residual gives the reference's pair."""
    from w4a16.backends.selection import get

    class ResidualOnly(type(get("reference"))):
        epilogues = (None, "silu_mul", "residual")

    b = ResidualOnly()
    x, w, r, bias, norm = _case(4, 24, 64, 32, gen)
    pw = w.prepared(b)
    for packed in (False, True):
        run = w4a16.ops.bound_run(b, pw, 4, torch.float16, True, 1.0, "reference", True, "residual_rmsnorm", packed)
        got = run(x, bias, r, norm)
        h, n = (got[0], got[1])
        assert (got.shape == (2, 4, 24)) if packed else isinstance(got, tuple)
        h_ref, n_ref = w4a16.reference.gemm(x, w, bias, epilogue="residual_rmsnorm", residual=r,
                                            norm_weight=norm.weight, norm_eps=norm.eps)
        assert torch.equal(h, h_ref) and torch.equal(n, n_ref)


def test_eager_fast_path_takes_each_calls_norm(gen):
    """Repeated calls (the bound fast path) with other residuals, norm weights and epsilons."""
    x, w, r, bias, norm = _case(3, 32, 64, 32, gen)
    for i in range(3):
        weight = norm.weight * (i + 1)
        eps = 1e-5 * (i + 1)
        got = w4a16.gemm(x, w, bias, epilogue="residual_rmsnorm", residual=r + i, norm_weight=weight, norm_eps=eps,
                         backend="reference")
        ref = w4a16.reference.gemm(x, w, bias, epilogue="residual_rmsnorm", residual=r + i, norm_weight=weight,
                                   norm_eps=eps)
        assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
    x3 = x.reshape(1, 3, 64)   # leading dims: both results take x's
    h, n = w4a16.gemm(x3, w, epilogue="residual_rmsnorm", residual=r.reshape(1, 3, 32), norm_weight=norm.weight,
                      backend="reference")
    assert h.shape == n.shape == (1, 3, 32)


def test_gradients_flow_to_x_bias_residual_and_the_norm_weight(gen):
    x, w, r, bias, norm = _case(3, 32, 64, 32, gen)
    x, bias, r = (t.clone().requires_grad_() for t in (x, bias, r))
    nw = norm.weight.clone().requires_grad_()
    h, n = w4a16.gemm(x, w, bias, 0.5, epilogue="residual_rmsnorm", residual=r, norm_weight=nw, norm_eps=1e-5,
                      backend="reference")
    dh, dn = torch.randn(h.shape, generator=gen).half(), torch.randn(n.shape, generator=gen).half()
    (h.float() * dh.float()).sum().add((n.float() * dn.float()).sum()).backward()
    # the same function in fp32 autograd on the dequantized weight
    leaves = [t.detach().float().requires_grad_() for t in (x, bias, r, nw)]
    x32, b32, r32, w32 = leaves
    h32 = x32 @ w.dequantize(torch.float32).t() * 0.5 + b32 + r32
    n32 = w32 * (h32 * torch.rsqrt(h32.pow(2).mean(-1, keepdim=True) + 1e-5))
    (h32 * dh.float()).sum().add((n32 * dn.float()).sum()).backward()
    for got, want in zip((x.grad, bias.grad, r.grad, nw.grad), (t.grad for t in leaves)):
        close_everywhere(got, want, torch.float16)


def test_custom_op_fake_and_schema(gen):
    x, w, r, bias, norm = _case(3, 32, 64, 32, gen)
    b = w4a16.backends.selection.get("reference")
    args = (x, b.op_tensors(w.prepared(b)), bias, 1.0, [32, 64, 32], "reference", "reference", True,
            "residual_rmsnorm", r, norm.weight, norm.eps)
    torch.library.opcheck(w4a16.ops.gemm_op, args, test_utils=("test_schema", "test_faketensor"))
    y = w4a16.ops.gemm_op(*args)
    ref = w4a16.reference.gemm(x, w, bias, epilogue="residual_rmsnorm", residual=r, norm_weight=norm.weight,
                               norm_eps=norm.eps)
    assert y.shape == (2, 3, 32) and torch.equal(y[0], ref[0]) and torch.equal(y[1], ref[1])


def test_compiled_call(gen):
    x, w, r, _, norm = _case(3, 32, 64, 32, gen)

    def f(x, r):
        return w4a16.gemm(x, w, epilogue="residual_rmsnorm", residual=r, norm_weight=norm.weight, norm_eps=1e-5,
                          backend="reference")

    f(x, r)   # prepared by an eager call first (preparing inside a traced call is a graph break)
    h, n = torch.compile(f, backend="eager", fullgraph=True)(x, r)
    ref = w4a16.reference.gemm(x, w, epilogue="residual_rmsnorm", residual=r, norm_weight=norm.weight, norm_eps=1e-5)
    assert torch.equal(h, ref[0]) and torch.equal(n, ref[1])


@pytest.mark.parametrize("kwargs,match", [
    (dict(residual="r"), "norm_weight: expected a tensor"),
    (dict(residual="r", norm_weight="short"), r"norm_weight.shape: expected \(32,\), got \(31,\)"),
    (dict(residual="r", norm_weight="fp32"), "norm_weight.dtype: expected torch.float16, got torch.float32"),
    (dict(residual="r", norm_weight="ok", norm_eps=-1.0), "norm_eps: expected a finite float >= 0, got -1.0"),
    (dict(norm_weight="ok"), "residual: expected a tensor"),
    (dict(epilogue="residual", residual="r", norm_weight="ok"), "norm_weight: expected None with epilogue='residual'"),
])
def test_bad_norm_arguments(gen, kwargs, match):
    x, w, r, _, norm = _case(3, 32, 64, 32, gen)
    values = {"r": r, "ok": norm.weight, "short": norm.weight[:31], "fp32": norm.weight.float()}
    kwargs = {k: values.get(v, v) if isinstance(v, str) and k != "epilogue" else v for k, v in kwargs.items()}
    kwargs.setdefault("epilogue", "residual_rmsnorm")
    for fn in (w4a16.gemm, w4a16.reference.gemm):
        with pytest.raises(W4A16Error, match=match):
            fn(x, w, **kwargs)


def test_traced_call_on_a_backend_without_the_norm_leaves_it_to_torch(gen, monkeypatch):
    """Under torch.compile (and with gradients) a backend without the norm gets the residual
    epilogue in the op and the norm as traced torch code after it: Inductor can fuse it, and no
    op call carries the norm."""
    from w4a16.backends.selection import get

    ref = get("reference")
    monkeypatch.setattr(type(ref), "epilogues", (None, "silu_mul", "residual"))
    seen = []
    real = w4a16.ops.gemm_op

    def spy(*args):
        seen.append(args[8:])
        return real(*args)

    monkeypatch.setattr(w4a16.ops, "gemm_op", spy)
    x, w, r, bias, norm = _case(3, 32, 64, 32, gen)
    xg = x.clone().requires_grad_()
    h, n = w4a16.gemm(xg, w, bias, epilogue="residual_rmsnorm", residual=r, norm_weight=norm.weight,
                      norm_eps=norm.eps, backend="reference")
    assert len(seen) == 1 and seen[0][0] == "residual" and torch.equal(seen[0][1], r) and len(seen[0]) == 2
    want = w4a16.reference.gemm(x, w, bias, epilogue="residual_rmsnorm", residual=r, norm_weight=norm.weight,
                                norm_eps=norm.eps)
    assert torch.equal(h, want[0]) and torch.equal(n, want[1])
    n.float().sum().backward()
    assert xg.grad is not None and torch.isfinite(xg.grad).all()
