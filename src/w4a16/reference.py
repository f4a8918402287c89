"""The ground truth: pure-torch round-to-nearest quantization and the W4A16 GEMM contract.

Every kernel is tested against :func:`gemm`; it favours clarity over speed (fp32 throughout).
"""
from __future__ import annotations

from typing import Optional

import torch

from . import spec
from .epilogue import Norm
from .epilogue import apply as apply_epilogue
from .epilogue import check_epilogue_args, check_input_norm, check_norm_args, finish, out_features, resolve, rms_norm
from .errors import expect, fail
from .pack import pack_nibbles
from .validate import check_gemm_args
from .weight import QuantizedWeight


def _check_scales_fit(weight: torch.Tensor, s32: torch.Tensor, dtype: torch.dtype, symmetric: bool) -> None:
    """Refuse a weight the kernels would compute wrongly in ``dtype``:

    * overflow: the kernels form each dequantized value (q - z) * s in ``dtype`` before the MMA
      (and the scales must be finite there); with q in 0..15 and the zero point z of the grid that
      is at most 8 s (symmetric: s = 2 max|w| / 15, so max|w| <= 15/16 of dtype's largest finite)
      or (max - min) of a group plus the rounding of s (asymmetric);
    * underflow: a group holding non-zero values whose scale rounds to 0 in ``dtype`` would
      quantize to all zeros (fp16's smallest subnormal is 6e-8)."""
    big = float(torch.finfo(dtype).max)
    s = s32.to(dtype).float()
    span = 8.0 if symmetric else float(spec.CODE_MAX)
    if not bool((s.isfinite() & (s * span <= big)).all()):
        limit = big * spec.CODE_MAX / 16 if symmetric else big
        what = "max |weight|" if symmetric else "max - min of a group (0 included)"
        hint = ", or quantize with dtype=torch.bfloat16" if dtype == torch.float16 else ""
        fail("weight", f"{what} <= about {limit:.5g} so that every (q - z) * scale fits {dtype} (largest "
             f"finite {big:.6g}); scale the weight down{hint}",
             f"max |weight| = {float(weight.detach().abs().max()):.5g}")
    lost = (s == 0) & (s32 > 0)
    if bool(lost.any()):
        tiny = float(torch.finfo(dtype).tiny) * 2.0 ** -(10 if dtype == torch.float16 else 7)
        hint = "quantize with dtype=torch.bfloat16, or scale the weight up" if dtype == torch.float16 else \
            "scale the weight up"
        fail("weight", f"groups whose scale (max |w| * 2 / 15) is representable in {dtype} (>= about {tiny:.3g}); "
             f"{hint}", f"{int(lost.sum())} group(s) of non-zero values that would quantize to all zeros "
             f"(largest of them max|w| = {float(s32[lost].max()) * spec.CODE_MAX / 2:.3g})")


def quantize(weight: torch.Tensor, group_size: int = 128, symmetric: bool = True,
             dtype: Optional[torch.dtype] = None) -> QuantizedWeight:
    """Round-to-nearest int4 quantization of a float weight.

    Args:
        weight: float [N, K] (any float dtype, finite), K even.
        group_size: 32, 64, 128, 256 or -1 (per output channel over all of K).
        symmetric: True -> z = 8 and s = 2 * absmax / 15 (GPTQ's symmetric grid);
            False -> s = (max - min) / 15 and an integer zero point z = round(-min / s),
            with the range widened to include 0.
        dtype: scales' (and zeros') dtype; default the weight's dtype if fp16/bf16, else fp16.

    Returns:
        QuantizedWeight with codes q = clamp(round(w / s) + z, 0, 15).
    """
    expect(isinstance(weight, torch.Tensor), "weight", "a torch.Tensor", type(weight).__name__)
    expect(weight.dim() == 2, "weight", "a 2-D tensor [N, K]", f"{weight.dim()}-D of shape {tuple(weight.shape)}")
    expect(weight.dtype.is_floating_point, "weight.dtype", "a floating-point dtype", weight.dtype)
    expect(not weight.is_meta, "weight.device", "a device holding data (not meta)", weight.device)
    N, K = weight.shape
    expect(N >= 1 and K >= 2, "weight.shape", "[N >= 1, K >= 2] (a non-empty weight)", tuple(weight.shape))
    expect(K % 2 == 0, "weight.shape[1] (K)", "an even number", K)
    g = spec.check_group_size(group_size, K)
    expect(bool(torch.isfinite(weight).all()), "weight", "finite values", "NaN or Inf")
    if dtype is None:
        dtype = weight.dtype if weight.dtype in spec.ACTIVATION_DTYPES else torch.float16
    expect(dtype in spec.ACTIVATION_DTYPES, "dtype", "torch.float16 or torch.bfloat16", dtype)

    w = weight.detach().float().reshape(N, K // g, g)
    if symmetric:
        s32 = 2.0 * w.abs().amax(dim=-1) / spec.CODE_MAX
    else:
        lo = w.amin(dim=-1).clamp(max=0)
        hi = w.amax(dim=-1).clamp(min=0)
        s32 = (hi - lo) / spec.CODE_MAX
    _check_scales_fit(weight, s32, dtype, symmetric)
    s = s32.to(dtype)
    s = torch.where(s == 0, torch.ones_like(s), s)  # an all-zero group (or one below dtype's range)
    if symmetric:
        z = torch.full_like(s, float(spec.SYMMETRIC_ZERO), dtype=torch.float32)
    else:
        z = torch.round(-lo / s.float()).clamp(0, spec.CODE_MAX)
    q = torch.round(w / s.float().unsqueeze(-1)) + z.unsqueeze(-1)
    q = q.clamp(0, spec.CODE_MAX).to(torch.uint8).reshape(N, K)
    zeros = None if symmetric else z.to(dtype)
    return QuantizedWeight.from_plain(pack_nibbles(q), s.contiguous(), zeros, group_size)


def gemm(x: torch.Tensor, w: QuantizedWeight, bias: Optional[torch.Tensor] = None,
         alpha: float = 1.0, epilogue: Optional[str] = None, residual: Optional[torch.Tensor] = None,
         norm_weight: Optional[torch.Tensor] = None, norm_eps: float = 1e-6, input_norm: Optional[tuple] = None):
    """y = alpha * (x @ W^T) + bias with W = w.dequantize(), then the epilogue (``w4a16.epilogue``),
    all in fp32, cast to x's dtype; with input_norm = (weight [K], eps) x is first
    ``w4a16.epilogue.rms_norm(x, weight, eps)``.

    Args:
        x: fp16/bf16 [..., K]; w: QuantizedWeight (N, K) with scales in x's dtype;
        bias: None or [N] in x's dtype; alpha: float; epilogue: None, "silu_mul", "residual" or
        "residual_rmsnorm"; residual: [..., N] in x's dtype (with "residual"/"residual_rmsnorm",
        or alone); norm_weight [N] in x's dtype and norm_eps: the RMSNorm of "residual_rmsnorm".
    Returns:
        [..., N] in x's dtype ([..., N / 2] with "silu_mul"); with "residual_rmsnorm" the pair
        (h, n), each [..., N].
    """
    check_gemm_args(x, w, bias, alpha)
    epilogue = resolve(epilogue, residual)
    N, K = w.shape
    check_epilogue_args(x, N, epilogue, residual)
    norm = check_norm_args(x, N, epilogue, norm_weight, norm_eps)
    in_norm = check_input_norm(x, K, input_norm)
    x2 = x.reshape(-1, K)
    if in_norm is not None:
        x2 = rms_norm(x2, in_norm.weight, in_norm.eps)
    if w.params.perm is not None:
        x2 = x2[:, w.params.perm]
    r2 = None if residual is None else residual.reshape(-1, N)
    y = gemm_stored(x2, w, bias, alpha, epilogue, r2, norm)
    if epilogue == "residual_rmsnorm":
        return y[0].reshape(*x.shape[:-1], N), y[1].reshape(*x.shape[:-1], N)
    return y.reshape(*x.shape[:-1], out_features(N, epilogue))


def gemm_stored(x2: torch.Tensor, w: QuantizedWeight, bias: Optional[torch.Tensor] = None,
                alpha: float = 1.0, epilogue: Optional[str] = None,
                residual: Optional[torch.Tensor] = None, norm: Optional[Norm] = None) -> torch.Tensor:
    """The contract on x2 [M, K] already in the weight's stored K order (gathered by ``w.perm``),
    fp32 throughout, cast to x2's dtype: [M, N] (or [M, N / 2] with "silu_mul", [2, M, N] with
    "residual_rmsnorm"). No argument checks."""
    return gemm_dequantized(x2, dequantize_fp32(w), bias, alpha, epilogue, residual, norm)


def gemm_dequantized(x2: torch.Tensor, W: torch.Tensor, bias: Optional[torch.Tensor] = None,
                     alpha: float = 1.0, epilogue: Optional[str] = None,
                     residual: Optional[torch.Tensor] = None, norm: Optional[Norm] = None) -> torch.Tensor:
    """y [M, N] = alpha * (x2 [M, K] @ W^T) + bias, then the epilogue, W fp32 [N, K] in x2's K
    order; fp32 throughout (the contract's non-finite rule term by term), cast to x2's dtype
    ([2, M, N]: h and its norm with "residual_rmsnorm")."""
    y = _dot(x2.float(), W) * float(alpha)
    if bias is not None:
        y = y + bias.float()
    return finish(apply_epilogue(y, epilogue, residual).to(x2.dtype), epilogue, norm)


def dequantize_fp32(w: QuantizedWeight) -> torch.Tensor:
    """W = (q - z) * s [N, K] in fp32, element by element, in stored K order (IEEE: a NaN or inf
    scale or zero point propagates, and (q - z) * inf is NaN where q == z)."""
    return w.dequantize_stored(torch.float32)


def _dot(x: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """x [M, K] @ W[N, K]^T in fp32 with the non-finite rule of the contract made explicit.

    Every term x[m, k] * W[n, k] is an IEEE fp32 product. The sum is NaN when any term is NaN
    (a NaN operand, or 0 * inf) or when terms of both infinite signs occur; +-inf when the
    infinite terms share one sign; otherwise the fp32 sum of the finite terms (which may itself
    overflow to +-inf). A matrix multiply gives the same on finite inputs, but a BLAS is free to
    skip zero operands (hiding 0 * inf), so non-finite inputs are classified here term by term,
    with exact counting matmuls rather than an [M, N, K] product. Under torch.compile (which cannot
    branch on tensor values without a graph break) the plain product is used.
    """
    if torch.compiler.is_compiling():
        return x @ W.T
    xf, wf = torch.isfinite(x), torch.isfinite(W)
    if bool(xf.all()) and bool(wf.all()):
        return x @ W.T
    finite = torch.where(xf, x, 0.0) @ torch.where(wf, W, 0.0).T

    def count(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:  # [M, N]: #k with a[m, k] and b[n, k]
        return a.float() @ b.float().T

    xi, wi = torch.isinf(x), torch.isinf(W)
    nan_terms = (torch.isnan(x).float().sum(1, keepdim=True) + torch.isnan(W).float().sum(1)[None, :]
                 + count(xi, W == 0) + count(x == 0, wi))
    xp, xm, wp, wm = x > 0, x < 0, W > 0, W < 0  # inf included, NaN in neither

    def inf_terms(a_pos, b_pos):  # #k where x has sign a, W sign b, and either is infinite
        return count(a_pos & xi, b_pos) + count(a_pos & ~xi, b_pos & wi)

    pos = inf_terms(xp, wp) + inf_terms(xm, wm)
    neg = inf_terms(xp, wm) + inf_terms(xm, wp)
    nan = (nan_terms > 0) | ((pos > 0) & (neg > 0))
    inf = torch.full_like(finite, float("inf"))
    y = torch.where(pos > 0, inf, torch.where(neg > 0, -inf, finite))
    return torch.where(nan, torch.full_like(finite, float("nan")), y)


def sqnr_db(weight: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio 10*log10(|w|^2 / |w - approx|^2) in dB."""
    w = weight.double()
    err = (w - approx.double()).pow(2).sum()
    return float(10.0 * torch.log10(w.pow(2).sum() / err))
