"""One test per argument check: each error is a W4A16Error (a ValueError) whose message reads
``<argument>: expected <expected value>, got <actual value>``.

Documented behaviour for layouts: ``QuantizedWeight.from_plain`` stores contiguous copies of
non-contiguous inputs, and ``gemm`` accepts non-contiguous x (it copies it).
"""
import re

import pytest
import torch

import w4a16
from w4a16 import QuantizedWeight, config, reference
from w4a16.errors import W4A16Error
from w4a16.pack import pack_nibbles

N, K, G = 32, 256, 64


def raises_named(arg: str, expected: str = "", got: str = ""):
    """pytest.raises for a W4A16Error naming ``arg``, with ``expected`` / ``got`` substrings."""
    pattern = rf"^{re.escape(arg)}: expected .*{re.escape(expected)}.*, got .*{re.escape(got)}"
    return pytest.raises(W4A16Error, match=pattern)


@pytest.fixture
def parts(gen):
    """(qweight uint8 [N, K/2], scales fp16 [N, K/G], zeros fp16 [N, K/G]) with random values."""
    codes = torch.randint(0, 16, (N, K), generator=gen, dtype=torch.uint8)
    scales = (torch.rand(N, K // G, generator=gen) * 0.01 + 0.001).half()
    zeros = torch.randint(0, 16, (N, K // G), generator=gen).half()
    return pack_nibbles(codes), scales, zeros


@pytest.fixture
def w(parts):
    return QuantizedWeight.from_plain(parts[0], parts[1], parts[2], G)


@pytest.fixture
def x(gen):
    return torch.randn(3, K, generator=gen).half()


def test_error_is_a_value_error():
    assert issubclass(W4A16Error, ValueError)


# ------------------------------------------------------------------ gemm arguments
@pytest.mark.parametrize("fn", [w4a16.gemm, reference.gemm], ids=["gemm", "reference"])
def test_x_fp32(fn, w, x):
    with raises_named("x.dtype", "torch.float16 or torch.bfloat16", "torch.float32"):
        fn(x.float(), w)


def test_x_not_a_tensor(w, x):
    with raises_named("x", "a torch.Tensor", "ndarray"):
        w4a16.gemm(x.numpy(), w)


def test_w_not_a_quantized_weight(x):
    with raises_named("w", "QuantizedWeight", "Tensor"):
        w4a16.gemm(x, torch.zeros(N, K, dtype=torch.float16))


@pytest.mark.parametrize("fn", [w4a16.gemm, reference.gemm], ids=["gemm", "reference"])
def test_scales_dtype_differs_from_x(fn, w, x):
    with raises_named("w.scales.dtype", "torch.bfloat16", "torch.float16"):
        fn(x.bfloat16(), w)


@pytest.mark.parametrize("fn", [w4a16.gemm, reference.gemm], ids=["gemm", "reference"])
def test_x_last_dim_is_not_k(fn, w, gen):
    with raises_named("x.shape[-1]", f"K = {K}", f"{K + 2}"):
        fn(torch.randn(3, K + 2, generator=gen).half(), w)


def test_bias_shape(w, x):
    with raises_named("bias.shape", f"({N},)", f"({N + 1},)"):
        w4a16.gemm(x, w, torch.zeros(N + 1, dtype=torch.float16))


def test_bias_dtype(w, x):
    with raises_named("bias.dtype", "torch.float16", "torch.float32"):
        w4a16.gemm(x, w, torch.zeros(N))


@pytest.mark.parametrize("alpha", [float("nan"), float("inf"), -float("inf"), "1.0"])
def test_alpha_not_finite(alpha, w, x):
    with raises_named("alpha", "a finite float", str(alpha)):
        w4a16.gemm(x, w, alpha=alpha)


def test_config_unknown(w, x):
    with raises_named("config", "'auto'", "bogus"):
        w4a16.gemm(x, w, config="bogus")


def test_config_fields_are_checked():
    with raises_named("config.block_m", "a power of two", "100"):
        config.GemmConfig(block_m=100)


# ------------------------------------------------------------------ devices ('meta' stands in for a second device)
def test_weight_on_another_device(w, x):
    with raises_named("w.device", "cpu", "meta"):
        w4a16.gemm(x, w.to("meta"))


def test_bias_on_another_device(w, x):
    with raises_named("bias.device", "cpu", "meta"):
        w4a16.gemm(x, w, torch.zeros(N, dtype=torch.float16, device="meta"))


def test_scales_on_another_device(parts):
    with raises_named("scales.device", "cpu", "meta"):
        QuantizedWeight.from_plain(parts[0], parts[1].to("meta"), None, G)


def test_zeros_on_another_device(parts):
    with raises_named("zeros.device", "cpu", "meta"):
        QuantizedWeight.from_plain(parts[0], parts[1], parts[2].to("meta"), G)


# ------------------------------------------------------------------ from_plain arguments
@pytest.mark.parametrize("dtype", [torch.int8, torch.int32])
def test_qweight_wrong_dtype(dtype, parts):
    with raises_named("qweight.dtype", "torch.uint8", str(dtype)):
        QuantizedWeight.from_plain(parts[0].to(dtype), parts[1], None, G)


def test_qweight_not_2d(parts):
    with raises_named("qweight", "a 2-D tensor", "1-D"):
        QuantizedWeight.from_plain(parts[0].flatten(), parts[1], None, G)


def test_scales_shape(parts):
    with raises_named("scales.shape", f"({N}, {K // G})", f"({N}, {K // G + 1})"):
        QuantizedWeight.from_plain(parts[0], torch.ones(N, K // G + 1, dtype=torch.float16), None, G)


def test_scales_dtype(parts):
    with raises_named("scales.dtype", "torch.float16 or torch.bfloat16", "torch.float32"):
        QuantizedWeight.from_plain(parts[0], parts[1].float(), None, G)


def test_zeros_shape(parts):
    with raises_named("zeros.shape", f"({N}, {K // G})", f"({N}, {K // G - 1})"):
        QuantizedWeight.from_plain(parts[0], parts[1], parts[2][:, 1:], G)


def test_zeros_float_dtype_differs_from_scales(parts):
    with raises_named("zeros.dtype", "torch.float16", "torch.bfloat16"):
        QuantizedWeight.from_plain(parts[0], parts[1], parts[2].bfloat16(), G)


def test_group_size_unsupported(parts):
    with raises_named("group_size", "one of (32, 64, 128, 256, -1)", "96"):
        QuantizedWeight.from_plain(parts[0], parts[1], None, 96)
    with raises_named("group_size", "one of (32, 64, 128, 256, -1)", "96"):
        reference.quantize(torch.randn(N, 384), 96)


def test_k_not_a_multiple_of_group_size(gen):
    with raises_named("K", "a multiple of the group size 128", "320"):
        reference.quantize(torch.randn(N, 320, generator=gen), 128)
    with raises_named("K", "a multiple of the group size 128", "320"):
        QuantizedWeight.from_plain(torch.zeros(N, 160, dtype=torch.uint8),
                                   torch.ones(N, 2, dtype=torch.float16), None, 128)


def test_perm_not_a_permutation(parts):
    bad = torch.arange(K)
    bad[1] = 0
    with raises_named("perm", f"a permutation of 0..{K - 1}", "repeated"):
        QuantizedWeight.from_plain(parts[0], parts[1], None, G, perm=bad)


def test_perm_shape(parts):
    with raises_named("perm.shape", f"({K},)", f"({K - 1},)"):
        QuantizedWeight.from_plain(parts[0], parts[1], None, G, perm=torch.arange(K - 1))


# ------------------------------------------------------------------ quantize arguments
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_quantize_rejects_non_finite_weight(bad, gen):
    W = torch.randn(N, K, generator=gen)
    W[3, 17] = bad
    with raises_named("weight", "finite values", "NaN or Inf"):
        reference.quantize(W, G)


def test_quantize_rejects_1d_weight():
    with raises_named("weight", "a 2-D tensor", "1-D"):
        reference.quantize(torch.randn(K), G)


def test_quantize_rejects_integer_weight():
    with raises_named("weight.dtype", "a floating-point dtype", "torch.int32"):
        reference.quantize(torch.ones(N, K, dtype=torch.int32), G)


# ------------------------------------------------------------------ non-contiguous inputs (documented behaviour)
def test_from_plain_copies_non_contiguous_inputs(parts):
    qweight, scales, zeros = parts
    q_nc = qweight.t().contiguous().t()
    s_nc = scales.t().contiguous().t()
    z_nc = zeros.t().contiguous().t()
    assert not (q_nc.is_contiguous() or s_nc.is_contiguous() or z_nc.is_contiguous())
    w = QuantizedWeight.from_plain(q_nc, s_nc, z_nc, G)
    assert w.qweight.is_contiguous() and w.scales.is_contiguous() and w.zeros.is_contiguous()
    assert torch.equal(w.qweight, qweight) and torch.equal(w.scales, scales) and torch.equal(w.zeros, zeros)


@pytest.mark.parametrize("fn", [w4a16.gemm, reference.gemm], ids=["gemm", "reference"])
def test_gemm_accepts_non_contiguous_x(fn, w, gen):
    big = torch.randn(K, 10, generator=gen).half()
    x_nc = big.t()[::2]                      # [5, K], strides (2, 10)
    assert not x_nc.is_contiguous()
    y = fn(x_nc, w)
    assert torch.equal(y, fn(x_nc.contiguous(), w))
