"""HQQ checkpoints, 4-bit "4bit_u8" packing, quantized along K (HQQ ``axis=1``).

HQQ views the weight W [N, K] as R = N * K / g rows of g elements (``W.reshape(-1, g)``: row r is
output n = r // (K / g), group r % (K / g)). The codes of that [R, g] matrix are packed in halves::

    W_q   uint8 [R / 2, g]   W_q[r] = (q[r] << 4) | q[r + R / 2]
    scale fp16/bf16 [R, 1]
    zero  fp16/bf16 [R, 1]   float zero point, not necessarily an integer

    W = ((q - zero) * scale).reshape(N, K)

HQQ's ``axis=0`` grouping (strided across the whole matrix) has no equivalent in this project's
contract and is not accepted.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence

import torch

from .. import spec
from ..errors import expect
from ..pack import pack_nibbles
from ..weight import QuantizedWeight
from ._common import check_weight, codes_in_input_order, no_perm, zeros_or_none


def _check_float(t, arg: str, shape: tuple) -> None:
    expect(isinstance(t, torch.Tensor), arg, "a torch.Tensor", type(t).__name__)
    spec.check_activation_dtype(t.dtype, arg)
    expect(tuple(t.shape) == shape, f"{arg}.shape", shape, tuple(t.shape))


def from_hqq(W_q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, shape: Sequence[int],
             group_size: Optional[int]) -> QuantizedWeight:
    """Import one HQQ 4-bit ("4bit_u8", axis=1) linear layer.

    Args:
        W_q: uint8 [N * K / (2 g), g].
        scale: fp16/bf16 [N * K / g, 1].
        zero: [N * K / g, 1] in scale's dtype.
        shape: (N, K), the original weight shape (HQQ's ``meta["shape"]``).
        group_size: 32, 64, 128, 256, or -1 / None / K (one group over all of K: ``HQQLinear``
            built with ``group_size=None`` records ``group_size = in_features``).

    Returns:
        QuantizedWeight (N, K) with float zeros (None when every zero is exactly 8).
    """
    ok = isinstance(shape, (tuple, list, torch.Size)) and len(shape) == 2 and all(isinstance(v, int) for v in shape)
    expect(ok, "shape", "(N, K) as two ints", shape)
    N, K = shape
    expect(N >= 1 and K >= 2 and K % 2 == 0, "shape", "(N >= 1, K) with K even and >= 2", tuple(shape))
    group_size = -1 if group_size is None else group_size
    if spec.is_int(group_size) and group_size == K and group_size not in spec.SUPPORTED_GROUP_SIZES:
        group_size = -1  # HQQLinear(group_size=None) records group_size = in_features: per-channel
    g = spec.check_group_size(group_size, K)
    R = N * (K // g)
    expect(isinstance(W_q, torch.Tensor), "W_q", "a torch.Tensor", type(W_q).__name__)
    expect(W_q.dtype == torch.uint8, "W_q.dtype", torch.uint8, W_q.dtype)
    expect(R % 2 == 0, "shape", f"N * K / g even (HQQ packs row halves), g = {g}", tuple(shape))
    expect(tuple(W_q.shape) == (R // 2, g), "W_q.shape", (R // 2, g), tuple(W_q.shape))
    _check_float(scale, "scale", (R, 1))
    _check_float(zero, "zero", (R, 1))
    expect(zero.dtype == scale.dtype, "zero.dtype", f"{scale.dtype} (scale's dtype)", zero.dtype)
    expect(zero.device == W_q.device, "zero.device", W_q.device, zero.device)

    codes = torch.cat((W_q >> 4, W_q & 0x0F), dim=0).reshape(N, K)
    zeros = zeros_or_none(zero.reshape(N, K // g), scale.dtype)
    return QuantizedWeight.from_plain(pack_nibbles(codes), scale.reshape(N, K // g), zeros, group_size)


def to_hqq(w: QuantizedWeight) -> Dict[str, object]:
    """Export ``w`` as HQQ "4bit_u8" tensors ``{"W_q", "scale", "zero", "shape", "group_size"}``
    (layout above; a symmetric weight gets zero = 8). N * K / g must be even; ``w.perm`` None."""
    check_weight(w)
    no_perm(w, "HQQ")
    N, K = w.shape
    g = w.group_size_effective
    R = N * (K // g)
    expect(R % 2 == 0, "w.shape", f"N * K / g even (HQQ packs row halves), g = {g}", (N, K))
    q = codes_in_input_order(w).reshape(R, g)
    zero = torch.full_like(w.scales, float(spec.SYMMETRIC_ZERO)) if w.zeros is None else w.zeros
    return {
        "W_q": ((q[: R // 2] << 4) | q[R // 2:]).contiguous(),
        "scale": w.scales.reshape(R, 1).clone(),
        "zero": zero.reshape(R, 1).clone(),
        "shape": (N, K),
        "group_size": w.group_size,
    }
