"""The kernels follow the reference's non-finite semantics on a CUDA GPU.

The rule (README, "Non-finite values"): a NaN/inf scale, zero point or activation propagates as
IEEE fp32 arithmetic of the contract formula would, term by term: W = (q - z) * s, then
sum_k x[m, k] * W[n, k]. So (q - z) * inf is NaN where q == z, 0 * inf is NaN, +inf + -inf is
NaN. ``reference.gemm`` defines it (tests/test_nonfinite.py checks it on the CPU); here
every named config must give the same NaN / +inf / -inf positions, and close finite values.
"""
import pytest
import torch

pytestmark = pytest.mark.gpu   # selected by: pytest -m gpu tests

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

import w4a16  # noqa: E402
from w4a16.pack import pack_nibbles  # noqa: E402

INF, NAN = float("inf"), float("nan")
DTYPES = [torch.float16, torch.bfloat16]
# Known disagreement, not yet fixed in the kernels: where the scale is applied after a group's
# dot product (the Triton decode configs' scale_after, chosen by "auto" and "decode" at small M)
# or folded as q * s + o (the Gluon decode kernel, "auto" at M <= 64), an inf scale gives +-inf
# or NaN at other outputs than the term-by-term rule says.
_SCALE_AFTER = pytest.mark.xfail(reason="scale applied after the group's dot product: inf scales "
                                        "propagate differently (kernel follow-up)", strict=False)
# "auto" runs a weight with non-finite scales or zeros on the tile config "128" (ops.choose).
CONFIGS = ["auto", "128", "64", pytest.param("decode", marks=_SCALE_AFTER)]
MS = [1, 16, 64, 300]


def assert_same_non_finite(y, ref, what):
    y, ref = y.cpu().float(), ref.cpu().float()
    for name, mask in (("NaN", torch.isnan), ("+inf", lambda t: torch.isinf(t) & (t > 0)),
                       ("-inf", lambda t: torch.isinf(t) & (t < 0))):
        a, b = mask(y), mask(ref)
        assert torch.equal(a, b), (f"{what}: {name} at {int(a.sum())} outputs, the reference at {int(b.sum())} "
                                   f"(first difference at {(a != b).nonzero()[0].tolist()})")
    fin = torch.isfinite(ref)
    if bool(fin.any()):
        err = float((y[fin] - ref[fin]).norm() / ref[fin].norm().clamp_min(1e-30))
        assert err <= 1e-2, f"{what}: finite outputs' relative error {err:.3g}"


def _weight(N, K, g, dtype, gen, zeros):
    codes = torch.randint(0, 16, (N, K), generator=gen, dtype=torch.uint8)
    scales = (torch.rand(N, K // g, generator=gen) * 0.01 + 0.005).to(dtype)
    z = torch.randint(0, 16, (N, K // g), generator=gen).to(dtype) if zeros else None
    return codes, scales, z


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
@pytest.mark.parametrize("config", CONFIGS)
def test_inf_scale_with_q_equal_z_is_nan(dtype, config):
    """An inf scale: NaN when a code of its group equals z (or terms of both signs), else +-inf."""
    N, K, g = 96, 512, 64
    gen = torch.Generator().manual_seed(0)
    codes, scales, _ = _weight(N, K, g, dtype, gen, zeros=False)
    scales[0::3, 1] = INF                                   # groups with codes == 8 somewhere: NaN
    codes[1::3, g:2 * g] = 9 + codes[1::3, g:2 * g] % 7     # codes 9..15: every term +inf
    scales[1::3, 1] = INF
    codes[2::3, g:2 * g] = 10
    scales[2::3, 1] = -INF                                  # one sign: -inf (x > 0 below)
    w = w4a16.QuantizedWeight.from_plain(pack_nibbles(codes).cuda(), scales.cuda(), None, g)
    for M in MS:
        x = torch.rand(M, K, generator=gen).add(0.1).to(dtype).cuda()  # x > 0
        ref = w4a16.reference.gemm(x.cpu(), w.to("cpu"))
        y = w4a16.gemm(x, w, config=config)
        assert_same_non_finite(y, ref, f"M={M} {config} {dtype}")


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("zeros", [False, True], ids=["sym", "zeros"])
def test_random_non_finite_operands(dtype, config, zeros):
    """NaN / +-inf sprinkled into scales, zeros and x, zeros in x; bias with specials."""
    N, K, g = 80, 768, 128
    for seed in range(4):
        gen = torch.Generator().manual_seed(seed)
        codes, scales, z = _weight(N, K, g, dtype, gen, zeros)
        specials = torch.tensor([INF, -INF, NAN]).to(dtype)
        targets = [(scales, 0.03)] + ([(z, 0.03)] if zeros else [])
        for t, p in targets:
            hit = torch.rand(t.shape, generator=gen) < p
            t[hit] = specials[torch.randint(0, 3, (int(hit.sum()),), generator=gen)]
        w = w4a16.QuantizedWeight.from_plain(pack_nibbles(codes).cuda(), scales.cuda(),
                                             None if z is None else z.cuda(), g)
        bias = torch.randn(N, generator=gen).to(dtype)
        bias[seed] = specials[seed % 3]
        for M in MS:
            x = torch.randn(M, K, generator=gen).to(dtype)
            x[torch.rand(M, K, generator=gen) < 0.05] = 0
            hit = torch.rand(M, K, generator=gen) < 0.002
            x[hit] = specials[torch.randint(0, 3, (int(hit.sum()),), generator=gen)]
            ref = w4a16.reference.gemm(x, w.to("cpu"), bias, 0.5)
            y = w4a16.gemm(x.cuda(), w, bias.cuda(), 0.5, config=config)
            assert_same_non_finite(y, ref, f"seed={seed} M={M} {config} {dtype}")
