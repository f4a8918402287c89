"""The ground truth: pure-torch round-to-nearest quantization and the W4A16 GEMM contract.

Every kernel is tested against :func:`gemm`; it favours clarity over speed (fp32 throughout).
"""
from __future__ import annotations

from typing import Optional

import torch

from . import spec
from .errors import expect
from .pack import pack_nibbles
from .validate import check_gemm_args
from .weight import QuantizedWeight


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
    N, K = weight.shape
    expect(K % 2 == 0, "weight.shape[1] (K)", "an even number", K)
    g = spec.check_group_size(group_size, K)
    expect(bool(torch.isfinite(weight).all()), "weight", "finite values", "NaN or Inf")
    if dtype is None:
        dtype = weight.dtype if weight.dtype in spec.ACTIVATION_DTYPES else torch.float16
    spec.check_activation_dtype(dtype, "dtype")

    w = weight.detach().float().reshape(N, K // g, g)
    if symmetric:
        absmax = w.abs().amax(dim=-1)
        s = (2.0 * absmax / spec.CODE_MAX)
        s = torch.where(s == 0, torch.ones_like(s), s).to(dtype)
        z = torch.full_like(s, float(spec.SYMMETRIC_ZERO), dtype=torch.float32)
    else:
        lo = w.amin(dim=-1).clamp(max=0)
        hi = w.amax(dim=-1).clamp(min=0)
        s = (hi - lo) / spec.CODE_MAX
        s = torch.where(s == 0, torch.ones_like(s), s).to(dtype)
        z = torch.round(-lo / s.float()).clamp(0, spec.CODE_MAX)
    q = torch.round(w / s.float().unsqueeze(-1)) + z.unsqueeze(-1)
    q = q.clamp(0, spec.CODE_MAX).to(torch.uint8).reshape(N, K)
    zeros = None if symmetric else z.to(dtype)
    return QuantizedWeight.from_plain(pack_nibbles(q), s.contiguous(), zeros, group_size)


def gemm(x: torch.Tensor, w: QuantizedWeight, bias: Optional[torch.Tensor] = None,
         alpha: float = 1.0) -> torch.Tensor:
    """y = alpha * (x @ W^T) + bias with W = w.dequantize(), all in fp32, cast to x's dtype.

    Args:
        x: fp16/bf16 [..., K]; w: QuantizedWeight (N, K) with scales in x's dtype;
        bias: None or [N] in x's dtype; alpha: float.
    Returns:
        [..., N] in x's dtype.
    """
    check_gemm_args(x, w, bias, alpha)
    N, K = w.shape
    x2 = x.reshape(-1, K).float()
    if w.perm is not None:
        x2 = x2[:, w.perm]
    y = (x2 @ w.dequantize_stored(torch.float32).T) * float(alpha)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], N)


def sqnr_db(weight: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio 10*log10(|w|^2 / |w - approx|^2) in dB."""
    w = weight.double()
    err = (w - approx.double()).pow(2).sum()
    return float(10.0 * torch.log10(w.pow(2).sum() / err))
