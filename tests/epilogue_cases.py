"""What the epilogue tests share (CPU interpreter and GPU): a random gate/up pair, a run of
``w4a16.gemm`` with an epilogue into a NaN-poisoned output, and an element-by-element check
against the reference."""
from __future__ import annotations

import os

import pytest
import torch

import w4a16
from w4a16 import epilogue as E
from w4a16.config import GemmConfig
from w4a16.measure import random_weight

INTERPRETER = not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") == "1"
needs_interpreter = pytest.mark.skipif(not INTERPRETER, reason="the Triton kernel in the CPU interpreter")
# Triton kernel configs of small tiles (the CPU tests' shapes span several tiles): tile and split-K,
# swapped and not
CONFIGS = [GemmConfig("tile", 16, 32, num_warps=4, num_stages=2),
           GemmConfig("tile", 16, 64, num_warps=4, num_stages=2, swap_ab=False),
           GemmConfig("splitk", 16, 16, split_k=3, num_warps=4, num_stages=2),
           GemmConfig("splitk", 16, 32, split_k=2, swap_ab=False, unroll=2, prefetch=False)]
CONFIG_IDS = ["tile", "tile-noswap", "splitk", "splitk-noswap-u2"]


def close_everywhere(y: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    """Every element of y (finite: outputs are poisoned with NaN first) within the rounding of
    ``dtype`` of ref: |y - ref| <= rtol * |ref| + rtol * mean |ref|."""
    assert y.shape == ref.shape, (tuple(y.shape), tuple(ref.shape))
    assert torch.isfinite(y).all(), "NaN/Inf in the output: an element left unwritten"
    rtol = 8e-3 if dtype == torch.float16 else 3e-2
    y, ref = y.double().cpu(), ref.double().cpu()
    bound = rtol * ref.abs() + rtol * ref.abs().mean()
    bad = (y - ref).abs() > bound
    assert not bad.any(), f"{int(bad.sum())} of {y.numel()} elements off, worst {float((y - ref).abs().max()):.3g}"


def silu_mul_close(y: torch.Tensor, x: torch.Tensor, w, bias, alpha: float, dtype: torch.dtype) -> None:
    """Every element of a silu_mul result y [M, N/2] (finite) within what the kernels' rounding
    allows: the pre-activations p = alpha * x @ W^T + bias are right to a relative tolerance of
    their RMS (the dequantized weights are formed in ``dtype``), and an error e in the gate g and
    up u moves SiLU(g) * u by about e * (|u| * |SiLU'(g)| + |SiLU(g)|); plus the output's rounding."""
    assert torch.isfinite(y).all(), "NaN/Inf in the output: an element left unwritten"
    W = w.to("cpu").dequantize(torch.float32)
    pre = x.cpu().float() @ W.t() * alpha
    if bias is not None:
        pre = pre + bias.cpu().float()
    g, u = E.split_rows(pre, -1)
    sig = torch.sigmoid(g)
    ref = g * sig * u
    e = (8e-3 if dtype == torch.float16 else 4e-2) * pre.pow(2).mean().sqrt()
    out_round = 2e-3 if dtype == torch.float16 else 1.6e-2
    bound = e * (u.abs() * (sig * (1 + g * (1 - sig))).abs() + (g * sig).abs()) + out_round * ref.abs() + 1e-6
    diff = (y.cpu().float() - ref).abs()
    bad = diff > bound
    assert y.shape == ref.shape and not bad.any(), \
        f"{int(bad.sum())} of {y.numel()} elements off, worst excess {float((diff / bound).max()):.3g} x the bound"


def paired_weight(I: int, K: int, group: int, zeros, dtype, gen: torch.Generator):
    """(gate, up, their pair in the silu_mul row order): QuantizedWeights [I, K], [I, K], [2I, K]."""
    gate = random_weight(I, K, group, zeros, dtype, "cpu", gen)
    up = random_weight(I, K, group, zeros, dtype, "cpu", gen)
    return gate, up, E.pair_gate_up(gate, up)


def run_epilogue(x, w, epilogue, residual=None, bias=None, alpha=1.0, norm=None, **kw):
    """``w4a16.gemm`` with the epilogue, written through the backend's ``run`` into a NaN-poisoned
    output as well as returned by the public call; both must agree bitwise. Returns y (the pair
    (h, n) with "residual_rmsnorm", whose ``norm`` is an ``E.Norm``)."""
    extra = {} if norm is None else dict(norm_weight=norm.weight, norm_eps=norm.eps)
    y = w4a16.gemm(x, w, bias, alpha, epilogue=epilogue, residual=residual, **extra, **kw)
    choice = w4a16.ops.choose(x, w, kw.get("config", "auto"), kw.get("backend", "auto"), E.chosen_as(epilogue))
    b = choice.backend
    if epilogue not in b.config_epilogues(choice.config, x.numel() // x.shape[-1], w.shape[0]):   # the norm in torch
        return y
    N, K = w.shape
    x2 = x.reshape(-1, K)
    out = torch.full(E.out_shape(x2.shape[0], N, epilogue), float("nan"), dtype=x.dtype, device=x.device)
    r2 = None if residual is None else residual.reshape(-1, N)
    b.run(x2, w.prepared(b), bias, alpha, choice.config, True, out, epilogue, r2, norm)
    got = (out[0].view(y[0].shape), out[1].view(y[1].shape)) if norm is not None else out.view(y.shape)
    for a, b_ in zip(got if norm is not None else (got,), y if norm is not None else (y,)):
        assert torch.equal(a, b_), "the public call and the backend's run into a poisoned output differ"
    return y
