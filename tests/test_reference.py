"""``reference.gemm`` against an independent float64 computation of the contract (the README's "The contract"):

    W[n, k] = (q[n, k] - z[n, k // g]) * s[n, k // g],   y = alpha * (x @ W^T) + bias

The expected value is built here from the codes in float64, without QuantizedWeight's dequantize
or the package's packing. The comparison is element-wise against a rigorous error bound: the
reference accumulates in fp32 (error <= (K + 4) * 2^-24 * (|alpha| * |x| @ |W|^T + |bias|)), then
rounds once to the output dtype (unit roundoff 2^-11 for fp16, 2^-8 for bf16).
"""
import pytest
import torch

from w4a16 import QuantizedWeight, reference

GROUPS = (32, 64, 128, 256, -1)
ZEROS = ("sym", "int", "float")
UNIT_ROUNDOFF = {torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}
TINY = {torch.float16: 2.0 ** -25, torch.bfloat16: 2.0 ** -134}  # half the smallest subnormal


def pack_codes(codes: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K] codes -> uint8 [N, K // 2], byte = code[2i] + 16 * code[2i + 1]."""
    pairs = codes.to(torch.int32).view(codes.shape[0], -1, 2)
    return (pairs[..., 0] + 16 * pairs[..., 1]).to(torch.uint8)


def random_weight(N, K, group_size, zeros, dtype, gen, perm=None):
    """Random codes / scales / zeros -> (QuantizedWeight, codes uint8 [N, K], scales, zeros or None)."""
    G = 1 if group_size == -1 else K // group_size
    codes = torch.randint(0, 16, (N, K), generator=gen, dtype=torch.uint8)
    scales = (torch.rand(N, G, generator=gen) * 0.02 + 0.001).to(dtype)
    z = None
    if zeros == "int":
        z = torch.randint(0, 16, (N, G), generator=gen).to(dtype)
    elif zeros == "float":
        z = (torch.rand(N, G, generator=gen) * 15).to(dtype)
        assert not torch.equal(z, z.round()), "float zeros must include non-integers"
    w = QuantizedWeight.from_plain(pack_codes(codes), scales, z, group_size, perm)
    return w, codes, scales, z


def expected_f64(x, codes, scales, zeros, group_size, bias=None, alpha=1.0, perm=None):
    """(y64 [M, N], bound64 [M, N]): the exact float64 result and the reference's error bound."""
    N, K = codes.shape
    g = K if group_size == -1 else group_size
    col_group = torch.arange(K) // g                                   # [K]
    s = scales.double()[:, col_group]                                   # [N, K]
    z = torch.full_like(s, 8.0) if zeros is None else zeros.double()[:, col_group]
    W = (codes.double() - z) * s                                        # stored K order
    if perm is not None:                                                # stored column j is input feature perm[j]
        Wt = torch.zeros_like(W)
        Wt[:, perm] = W
        W = Wt
    x64 = x.double().reshape(-1, K)
    y = alpha * (x64 @ W.T)
    mag = abs(alpha) * (x64.abs() @ W.abs().T)
    if bias is not None:
        y = y + bias.double()
        mag = mag + bias.double().abs()
    return y, mag


def assert_within_bound(y, y64, mag, K, dtype):
    """Every element of ``y`` within the fp32-accumulate-then-round bound of ``y64``."""
    assert y.dtype == dtype
    acc = (K + 4) * 2.0 ** -24 * mag
    bound = UNIT_ROUNDOFF[dtype] * (y64.abs() + acc) + acc + TINY[dtype]
    err = (y.double().reshape(y64.shape) - y64).abs()
    bad = err > bound
    assert not bad.any(), (f"{int(bad.sum())} of {err.numel()} elements off; worst excess "
                           f"{float((err - bound).max()):.3g}")


@pytest.mark.parametrize("M", [0, 1, 7, 64])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("zeros", ZEROS)
@pytest.mark.parametrize("group_size", GROUPS)
@pytest.mark.parametrize("bias,alpha", [(False, 1.0), (True, 0.75), (True, -2.5)])
def test_gemm_matches_float64(M, dtype, zeros, group_size, bias, alpha, gen):
    N, K = 24, 512
    w, codes, scales, z = random_weight(N, K, group_size, zeros, dtype, gen)
    x = torch.randn(M, K, generator=gen).to(dtype)
    b = torch.randn(N, generator=gen).to(dtype) if bias else None
    y = reference.gemm(x, w, b, alpha)
    assert y.shape == (M, N)
    y64, mag = expected_f64(x, codes, scales, z, group_size, b, alpha)
    assert_within_bound(y, y64, mag, K, dtype)


def test_bound_catches_a_wrong_group(gen):
    """The bound is tight enough to see a scale taken from the neighbouring group."""
    N, K, g = 16, 256, 32
    w, codes, scales, _ = random_weight(N, K, g, "sym", torch.float16, gen)
    x = torch.randn(4, K, generator=gen).to(torch.float16)
    shifted = torch.roll(scales, 1, dims=1)
    y64, mag = expected_f64(x, codes, shifted, None, g)
    with pytest.raises(AssertionError):
        assert_within_bound(reference.gemm(x, w), y64, mag, K, torch.float16)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_leading_batch_dims(dtype, gen):
    N, K = 40, 256
    w, codes, scales, z = random_weight(N, K, 64, "int", dtype, gen)
    x = torch.randn(2, 3, 5, K, generator=gen).to(dtype)
    b = torch.randn(N, generator=gen).to(dtype)
    y = reference.gemm(x, w, b, 0.5)
    assert y.shape == (2, 3, 5, N)
    assert torch.equal(y.reshape(-1, N), reference.gemm(x.reshape(-1, K), w, b, 0.5))
    y64, mag = expected_f64(x, codes, scales, z, 64, b, 0.5)
    assert_within_bound(y, y64, mag, K, dtype)


@pytest.mark.parametrize("group_size", [32, 128, -1])
@pytest.mark.parametrize("zeros", ZEROS)
def test_act_order_perm(group_size, zeros, gen):
    """With ``perm`` the stored column j holds input feature perm[j]: y = x[:, perm] @ W_stored^T."""
    N, K = 32, 256
    perm = torch.randperm(K, generator=gen)
    w, codes, scales, z = random_weight(N, K, group_size, zeros, torch.float16, gen, perm=perm)
    x = torch.randn(9, K, generator=gen).to(torch.float16)
    y = reference.gemm(x, w)
    y64, mag = expected_f64(x, codes, scales, z, group_size, perm=perm)
    assert_within_bound(y, y64, mag, K, torch.float16)
    plain = QuantizedWeight.from_plain(w.qweight, w.scales, w.zeros, group_size)
    assert torch.equal(y, reference.gemm(x[:, perm], plain))
    assert not torch.equal(y, reference.gemm(x, plain)), "perm must change the result"


def test_int_zeros_given_as_integer_tensor(gen):
    """Integer zero points may come as an integer tensor: same result as the same values in fp16."""
    N, K = 16, 256
    w, codes, scales, z = random_weight(N, K, 128, "int", torch.float16, gen)
    w_int = QuantizedWeight.from_plain(w.qweight, scales, z.to(torch.int32), 128)
    assert w_int.zeros.dtype == torch.float16
    x = torch.randn(3, K, generator=gen).to(torch.float16)
    assert torch.equal(reference.gemm(x, w_int), reference.gemm(x, w))
