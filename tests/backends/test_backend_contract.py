"""The GEMM contract on every backend available on this machine (the registry decides which):
random weights and activations, poisoned outputs, every element checked against the reference."""
import pytest
import torch

from conftest import DEVICE
from kernel_cases import make_weight

import w4a16
from w4a16.backends import Problem, registry
from w4a16.measure import TOLERANCE, rel_error

AVAILABLE = [n for n, b in registry().items() if b.available(DEVICE) is None]
# (M, N, K, group size, zeros, bias, alpha, act-order)
CASES = [(1, 72, 576, 64, None, True, 1.0, False), (5, 200, 1376, 32, "float", False, 0.5, True),
         (16, 40, 512, -1, "int", True, -2.0, False), (33, 24, 256, 128, None, False, 1.0, True),
         (3, 64, 4096, 256, "int", True, 1.0, False)]


def _dtypes(name):
    cpu_kernel = DEVICE.type == "cpu" and name != "reference"
    return [torch.float16] if cpu_kernel else [torch.float16, torch.bfloat16]


@pytest.mark.parametrize("backend", AVAILABLE)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "M{}-N{}-K{}-g{}-{}".format(*c[:4], c[4] or "sym"))
def test_contract(backend, case):
    M, N, K, g, zeros, has_bias, alpha, act_order = case
    b = registry()[backend]
    for dtype in _dtypes(backend):
        w = make_weight(N, K, g, zeros, dtype, DEVICE, seed=M)
        if act_order:
            w = w4a16.QuantizedWeight.from_plain(w.qweight, w.scales, w.zeros, g,
                                                 torch.randperm(K, generator=torch.Generator().manual_seed(M)))
        gen = torch.Generator().manual_seed(K)
        x = torch.randn(M, K, generator=gen).to(dtype).to(DEVICE)
        bias = (torch.randn(N, generator=gen) * 0.1).to(dtype).to(DEVICE) if has_bias else None
        reason = b.supports(Problem(M, N, K, w.group_size_effective, dtype, zeros is not None, DEVICE))
        if reason is not None:
            with pytest.raises(w4a16.W4A16Error, match=backend):
                w4a16.gemm(x, w, bias, alpha, backend=backend)
            continue
        ref = w4a16.reference.gemm(x, w, bias, alpha)
        y = w4a16.gemm(x, w, bias, alpha, backend=backend)
        assert y.shape == (M, N) and y.dtype == dtype
        assert not torch.isnan(y).any()
        assert rel_error(y, ref) <= TOLERANCE[dtype], (backend, dtype)
        # The backend's own entry point writes every element of a poisoned output.
        choice = w4a16.choose(x, w, backend=backend)
        x2 = x if w.perm is None else x[:, w.perm].contiguous()
        out = torch.full((M, N), float("nan"), dtype=dtype, device=DEVICE)
        b.run(x2, w.prepared(b), bias, alpha, choice.config, True, out=out)
        assert not torch.isnan(out).any(), f"{int(torch.isnan(out).sum())} elements unwritten"
        assert rel_error(out, ref) <= TOLERANCE[dtype]
