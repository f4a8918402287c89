"""Shared checks of the kernels against the reference (used by CPU-interpreter and GPU tests)."""
from __future__ import annotations

import pytest
import torch

import w4a16
from w4a16.config import GemmConfig
from w4a16.measure import TOLERANCE


def make_weight(N, K, group_size, zeros, dtype, device, seed=0):
    """A quantized random weight; zeros: None (symmetric), "int" or "float" zero points."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=gen) * 0.05 + 0.01
    qw = w4a16.quantize(w, group_size, symmetric=zeros is None, dtype=dtype)
    if zeros == "float":
        z = torch.rand(qw.scales.shape, generator=gen) * 15
        qw = w4a16.QuantizedWeight.from_plain(qw.qweight, qw.scales, z.to(dtype), group_size)
    return qw.to(device)


def rel_err(y, ref):
    y, ref = y.double(), ref.double()
    return float((y - ref).norm() / ref.norm().clamp_min(1e-30))


def check_gemm(M, N, K, group_size, zeros, dtype, device, config="auto", bias=True, alpha=1.0,
               deterministic=True, seed=0):
    """Run the public gemm on the Triton backend and its launcher into a NaN-poisoned output;
    compare every element with the reference (relative Frobenius error within TOLERANCE, no NaN,
    all written)."""
    from w4a16.backends.triton.launch import launch_gemm

    qw = make_weight(N, K, group_size, zeros, dtype, device, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(M, K, generator=gen).to(dtype).to(device)
    b = (torch.randn(N, generator=gen) * 0.1).to(dtype).to(device) if bias else None
    ref = w4a16.reference.gemm(x.cpu(), qw.to("cpu"), None if b is None else b.cpu(), alpha)

    y = w4a16.gemm(x, qw, b, alpha, config=config, deterministic=deterministic, backend="triton")
    assert y.shape == (M, N) and y.dtype == dtype
    choice = w4a16.choose(x, qw, config, backend="triton")
    cfg = choice.config
    assert isinstance(cfg, GemmConfig), f"expected the Triton kernel, got {choice.label}"
    out = torch.full((M, N), float("nan"), dtype=dtype, device=device)
    launch_gemm(x, qw.prepared(choice.backend), b, alpha, cfg, deterministic, out=out)
    for name, result in (("gemm", y), ("launch into poisoned out", out)):
        assert not torch.isnan(result).any(), f"{name}: {int(torch.isnan(result).sum())} elements NaN/unwritten"
        if M > 0:
            err = rel_err(result.cpu(), ref)
            assert err <= TOLERANCE[dtype], f"{name}: rel err {err:.2e} > {TOLERANCE[dtype]} ({cfg.short()})"
    return y


def identity_probe(K, N, group_size, zeros, dtype, device, config="auto"):
    """x = eye(K) makes y = W (the dequantized weight) exactly when W is representable in dtype."""
    qw = make_weight(N, K, group_size, zeros, dtype, device)
    # Exactly representable products: scales that are powers of two, integer zeros.
    s = torch.exp2(torch.randint(-8, -2, qw.scales.shape)).to(dtype).to(device)
    qw = w4a16.QuantizedWeight.from_plain(qw.qweight, s, None if zeros is None else qw.zeros.round(),
                                          group_size)
    x = torch.eye(K, dtype=dtype, device=device)
    y = w4a16.gemm(x, qw, config=config)
    assert torch.equal(y.t().cpu(), qw.dequantize(dtype).cpu())


def run_offline(code: str) -> str:
    """stdout of the Python ``code`` run in a worker process that imports w4a16 from this checkout
    and runs without Triton's interpreter (which runs kernels on a CPU but does not lower them):
    compiles for sm_90a on a machine without a GPU. Skips without Triton's NVIDIA backend; fails,
    with the worker's stderr, when it exits non-zero."""
    import subprocess
    import sys
    from pathlib import Path

    from w4a16.backends.triton.env import interpreter_unset

    pytest.importorskip("triton.backends.nvidia", reason="Triton's NVIDIA backend is not installed")
    src = str(Path(__file__).resolve().parents[1] / "src")
    with interpreter_unset():
        r = subprocess.run([sys.executable, "-c", "import sys; sys.path.insert(0, sys.argv[1]); " + code, src],
                           capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout
