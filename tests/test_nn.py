"""W4A16Linear against the reference GEMM, state_dict round trips, conversions and errors (CPU)."""
import importlib.util

import pytest
import torch
from torch import nn

import w4a16
from w4a16 import QuantizedWeight, W4A16Error, W4A16Linear, reference

DTYPES = [torch.float16, torch.bfloat16]


# The module is checked against w4a16.reference on the reference path; one test goes through the
# kernels (it turns the interpreter back on itself).
pytestmark = pytest.mark.usefixtures("reference_gemm")


def make_linear(K, N, bias=True, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(K, N, bias=bias).to(dtype)
    with torch.no_grad():
        if bias:
            lin.bias.normal_(0, 0.5)
    return lin


def rand_x(*shape, dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group_size", [32, -1])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_forward_matches_reference(dtype, group_size, symmetric, bias):
    K, N = 128, 48
    lin = make_linear(K, N, bias=bias)
    mod = W4A16Linear.from_linear(lin, group_size=group_size, symmetric=symmetric, dtype=dtype)
    assert mod.dtype == dtype and mod.symmetric == symmetric
    assert (mod.bias is None) == (not bias)
    w = reference.quantize(lin.weight, group_size=group_size, symmetric=symmetric, dtype=dtype)
    b = lin.bias.detach().to(dtype) if bias else None
    x = rand_x(2, 3, K, dtype=dtype)
    y = mod(x)
    assert y.shape == (2, 3, N) and y.dtype == dtype
    torch.testing.assert_close(y, reference.gemm(x, w, b), rtol=1e-2, atol=1e-2)
    assert float(y.float().abs().max()) > 0
    # and close to the float layer it came from (quantization error only)
    y_float = torch.nn.functional.linear(x.float(), lin.weight.float(), None if b is None else b.float())
    rel = (y.float() - y_float).norm() / y_float.norm()
    assert rel < 0.2


def test_from_linear_default_dtype():
    assert W4A16Linear.from_linear(make_linear(128, 8)).dtype == torch.float16
    assert W4A16Linear.from_linear(make_linear(64, 8, dtype=torch.bfloat16), group_size=32).dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", DTYPES)
def test_from_quantized_act_order_shares_tensors(dtype):
    K, N, g = 64, 24, 32
    torch.manual_seed(2)
    base = reference.quantize(torch.randn(N, K), group_size=g, symmetric=False, dtype=dtype)
    perm = torch.randperm(K)
    w = QuantizedWeight.from_plain(base.qweight, base.scales, base.zeros, g, perm)
    bias = torch.randn(N)
    mod = W4A16Linear.from_quantized(w, bias)
    assert mod.act_order and not mod.symmetric
    shares = lambda a, b: a.data_ptr() == b.data_ptr() and a.shape == b.shape  # noqa: E731 (aliases)
    assert shares(mod.qweight, w.qweight) and shares(mod.scales, w.scales) and shares(mod.perm, w.perm)
    assert mod.bias.dtype == dtype and not mod.bias.requires_grad
    view = mod.weight_q
    assert view.qweight.data_ptr() == mod.qweight.data_ptr()
    x = rand_x(5, K, dtype=dtype)
    torch.testing.assert_close(mod(x), reference.gemm(x, w, bias.to(dtype)), rtol=0, atol=0)


def test_weight_follows_load_state_dict_and_dtype():
    mod = W4A16Linear.from_linear(make_linear(64, 16), group_size=32)
    x = rand_x(3, 64, dtype=torch.float16)
    y = mod(x)
    other = W4A16Linear.from_linear(make_linear(64, 16, seed=5), group_size=32)
    mod.load_state_dict(other.state_dict())
    assert torch.equal(mod(x), other(x)) and not torch.equal(mod(x), y)
    assert mod.weight_q.scales is mod.scales
    mod.to(torch.bfloat16)
    assert mod.dtype == torch.bfloat16 and mod.weight_q.dtype == torch.bfloat16
    assert mod(x.bfloat16()).dtype == torch.bfloat16


def test_built_and_run_under_inference_mode():
    with torch.inference_mode():
        mod = W4A16Linear.from_linear(make_linear(64, 16), group_size=32)
        x = rand_x(3, 64, dtype=torch.float16)
        y = mod(x)
        mod.load_state_dict(W4A16Linear.from_linear(make_linear(64, 16, seed=6), group_size=32).state_dict())
        assert not torch.equal(mod(x), y)
    assert mod(rand_x(3, 64, dtype=torch.float16)).shape == (3, 16)


@pytest.mark.parametrize("symmetric,act_order,bias", [(True, False, True), (False, True, False)])
def test_state_dict_round_trip(symmetric, act_order, bias):
    K, N, g = 64, 40, 32
    torch.manual_seed(3)
    w = reference.quantize(torch.randn(N, K), group_size=g, symmetric=symmetric, dtype=torch.bfloat16)
    if act_order:
        w = QuantizedWeight.from_plain(w.qweight, w.scales, w.zeros, g, torch.randperm(K))
    src = W4A16Linear.from_quantized(w, torch.randn(N) if bias else None)
    expected = {"qweight", "scales"} | ({"bias"} if bias else set()) | \
        (set() if symmetric else {"zeros"}) | ({"perm"} if act_order else set())
    assert set(src.state_dict()) == expected
    fresh = W4A16Linear(K, N, bias=bias, group_size=g, symmetric=symmetric, dtype=torch.bfloat16,
                        act_order=act_order)
    x = rand_x(2, 3, K, dtype=torch.bfloat16)
    assert not torch.equal(fresh(x), src(x))
    fresh.load_state_dict(src.state_dict())
    assert torch.equal(fresh(x), src(x))


def test_fresh_module_is_well_defined():
    mod = W4A16Linear(64, 8, group_size=-1, symmetric=False)
    assert mod.qweight.shape == (8, 32) and mod.qweight.dtype == torch.uint8
    assert mod.scales.shape == (8, 1) and mod.zeros.shape == (8, 1) and mod.perm is None
    assert torch.equal(mod(rand_x(4, 64, dtype=torch.float16)), torch.zeros(4, 8, dtype=torch.float16))
    assert torch.equal(mod.weight_q.dequantize(), torch.zeros(8, 64, dtype=torch.float16))


def test_extra_repr():
    r = repr(W4A16Linear(256, 32, bias=False, group_size=64, dtype=torch.bfloat16, act_order=True))
    for part in ("in_features=256", "out_features=32", "bias=False", "group_size=64", "symmetric=True",
                 "dtype=bf16", "act_order=True"):
        assert part in r


def test_forward_dtype_and_shape_errors():
    mod = W4A16Linear.from_linear(make_linear(64, 8), group_size=32)
    with pytest.raises(W4A16Error, match=r"x\.dtype"):
        mod(rand_x(2, 64, dtype=torch.float32))
    with pytest.raises(W4A16Error, match=r"scales\.dtype"):
        mod(rand_x(2, 64, dtype=torch.bfloat16))
    with pytest.raises(W4A16Error, match=r"x\.shape\[-1\]"):
        mod(rand_x(2, 32, dtype=torch.float16))


@pytest.mark.parametrize("kwargs,arg", [
    (dict(in_features=63, out_features=8), "in_features"),
    (dict(in_features=64, out_features=0), "out_features"),
    (dict(in_features=64, out_features=8, group_size=100), "group_size"),
    (dict(in_features=96, out_features=8, group_size=64), "K"),
    (dict(in_features=64, out_features=8, group_size=32, dtype=torch.float32), "dtype"),
])
def test_constructor_errors_name_the_argument(kwargs, arg):
    with pytest.raises(W4A16Error, match=rf"^{arg}: expected"):
        W4A16Linear(**kwargs)


def test_conversion_errors_name_the_argument():
    w = reference.quantize(torch.randn(8, 64), group_size=32)
    with pytest.raises(W4A16Error, match=r"^bias\.shape"):
        W4A16Linear.from_quantized(w, torch.zeros(9))
    with pytest.raises(W4A16Error, match=r"^w: expected"):
        W4A16Linear.from_quantized(w.dequantize())
    with pytest.raises(W4A16Error, match=r"^linear: expected"):
        W4A16Linear.from_linear(nn.Conv1d(4, 4, 1))
    with pytest.raises(W4A16Error, match=r"^weight.shape\[1\] \(K\)"):
        W4A16Linear.from_linear(nn.Linear(7, 4), group_size=-1)


def test_exported_at_top_level():
    assert w4a16.W4A16Linear is W4A16Linear


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton (kernels in the interpreter)")
def test_kernel_path_fp16_prepares_once(monkeypatch):
    """Through the kernels (on a GPU where there is one, else Triton's interpreter on CPU, fp16):
    same result as the reference, and the kernels' layout is prepared once for the module, not
    once per call."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    if dev == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    K, N, g = 128, 32, 32
    torch.manual_seed(4)
    base = reference.quantize(torch.randn(N, K), group_size=g, symmetric=False, dtype=torch.float16)
    w = QuantizedWeight.from_plain(base.qweight, base.scales, base.zeros, g, torch.randperm(K))
    mod = W4A16Linear.from_quantized(w, torch.randn(N)).to(dev)
    x = rand_x(2, 3, K, dtype=torch.float16).to(dev)
    if w4a16.ops.describe_path(x.device)[0] == "reference":
        pytest.skip("no kernel backend runs here")
    y = mod(x)
    ref = reference.gemm(x, mod.weight_q, mod.bias)
    assert (y.float() - ref.float()).norm() / ref.float().norm() < 2e-3
    prepared = dict(mod.weight_q._layouts)
    assert len(prepared) == 1
    assert torch.equal(mod(x), y)
    assert all(mod.weight_q._layouts[k] is v for k, v in prepared.items())


def test_backend_setting_reaches_gemm(monkeypatch):
    """W4A16Linear(..., backend=...) / module.backend: every forward asks gemm for that backend;
    a name outside the registry is refused, naming the argument."""
    import w4a16.nn as wnn

    seen = []
    real = wnn.gemm
    monkeypatch.setattr(wnn, "gemm", lambda x, w, b, backend="auto": seen.append(backend) or real(x, w, b, backend=backend))
    lin = torch.nn.Linear(64, 32).half()
    mod = W4A16Linear.from_linear(lin, group_size=32, backend="reference")
    x = rand_x(3, 64, dtype=torch.float16)
    ref = reference.gemm(x, mod.weight_q, mod.bias)
    assert torch.equal(mod(x), ref) and seen == ["reference"]
    mod.backend = "auto"
    mod(x)
    assert seen[-1] == "auto" and "backend" not in repr(mod)
    mod.backend = "reference"
    assert "backend='reference'" in repr(mod)
    with pytest.raises(w4a16.W4A16Error, match="backend"):
        mod.backend = "cutlass"
    with pytest.raises(w4a16.W4A16Error, match="backend"):
        W4A16Linear(64, 32, backend="fast")
