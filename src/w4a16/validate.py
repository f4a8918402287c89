"""Checks of the arguments of a GEMM call, shared by the reference and the kernels."""
from __future__ import annotations

import math

import torch

from . import spec
from .errors import expect


def _all_ok(x, w, bias, alpha) -> bool:
    """The checks of :func:`check_gemm_args` as one boolean, without building any message."""
    from .weight import QuantizedWeight

    if not (isinstance(x, torch.Tensor) and isinstance(w, QuantizedWeight) and x.dim() >= 1):
        return False
    s = w.params.scales
    if not (x.dtype in spec.ACTIVATION_DTYPES and s.dtype == x.dtype and x.shape[-1] == w.shape[1]
            and s.device == x.device):
        return False
    if bias is not None and not (isinstance(bias, torch.Tensor) and bias.dtype == x.dtype
                                 and bias.shape == (w.shape[0],) and bias.device == x.device):
        return False
    return isinstance(alpha, (int, float)) and math.isfinite(float(alpha))


def check_gemm_args(x: torch.Tensor, w, bias, alpha) -> None:
    """Validate ``x [..., K]`` fp16/bf16, a QuantizedWeight ``w`` of shape (N, K) with scales in x's
    dtype on x's device, ``bias`` None or [N] in x's dtype, and a finite float ``alpha`` (or a
    0-d CPU tensor holding one; callers read it with ``float(alpha)``)."""
    if _all_ok(x, w, bias, alpha):  # the common case: no message is built
        return
    from .weight import QuantizedWeight

    expect(isinstance(x, torch.Tensor), "x", "a torch.Tensor", type(x).__name__)
    expect(isinstance(w, QuantizedWeight), "w", "a w4a16.QuantizedWeight", type(w).__name__)
    spec.check_activation_dtype(x.dtype, "x")
    N, K = w.shape
    expect(x.dim() >= 1 and x.shape[-1] == K, "x.shape[-1]", f"K = {K} (w.shape = {(N, K)})",
           tuple(x.shape)[-1:] if x.dim() else "a 0-D tensor")
    expect(w.params.scales.dtype == x.dtype, "w.scales.dtype", f"x's dtype {x.dtype}", w.params.scales.dtype)
    expect(w.device == x.device, "w.device", f"x's device {x.device}", w.device)
    if bias is not None:
        expect(isinstance(bias, torch.Tensor), "bias", "a torch.Tensor or None", type(bias).__name__)
        expect(tuple(bias.shape) == (N,), "bias.shape", (N,), tuple(bias.shape))
        expect(bias.dtype == x.dtype, "bias.dtype", f"x's dtype {x.dtype}", bias.dtype)
        expect(bias.device == x.device, "bias.device", f"x's device {x.device}", bias.device)
    check_alpha(alpha)


ALPHA_EXPECTED = "a finite float (or a 0-d tensor on the CPU)"


def check_alpha(alpha) -> None:
    """``alpha`` is a finite int/float, or a 0-d real CPU tensor holding one (read with ``float()``).

    A tensor on a GPU is refused: reading it would synchronize the device (and break CUDA-graph
    capture); pass ``float(alpha)`` explicitly if that is what you want.
    """
    if isinstance(alpha, torch.Tensor):
        expect(alpha.dim() == 0, "alpha", ALPHA_EXPECTED, f"a tensor of shape {tuple(alpha.shape)}")
        expect(alpha.device.type == "cpu", "alpha", ALPHA_EXPECTED + "; reading a GPU tensor would "
               "synchronize the device: pass float(alpha) if that is intended", f"a tensor on {alpha.device}")
        expect(not alpha.dtype.is_complex and alpha.dtype != torch.bool, "alpha", ALPHA_EXPECTED,
               f"a tensor of dtype {alpha.dtype}")
        expect(math.isfinite(float(alpha)), "alpha", ALPHA_EXPECTED, float(alpha))
        return
    expect(isinstance(alpha, (int, float)), "alpha", ALPHA_EXPECTED, f"{alpha!r} ({type(alpha).__name__})")
    expect(math.isfinite(float(alpha)), "alpha", ALPHA_EXPECTED, alpha)
