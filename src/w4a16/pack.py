"""The plain, portable 4-bit storage: ``uint8 [N, K // 2]``, element k in byte k // 2,
even k in the low nibble (cutlass::uint4b_t order).

Kernels never read this format directly; each repacks it once into its private layout
(see :mod:`w4a16.backends.triton.layout`).
"""
from __future__ import annotations

import torch

from .errors import expect


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """codes: uint8 [N, K] with values 0..15, K even -> uint8 [N, K // 2]."""
    expect(codes.dim() == 2, "codes", "a 2-D tensor [N, K]", f"{codes.dim()}-D")
    expect(codes.shape[1] % 2 == 0, "codes.shape[1] (K)", "an even number", codes.shape[1])
    c = codes.to(torch.uint8)
    return (c[:, 0::2] | (c[:, 1::2] << 4)).contiguous()


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """packed: uint8 [N, K // 2] -> codes uint8 [N, K] in 0..15."""
    expect(packed.dtype == torch.uint8, "qweight.dtype", torch.uint8, packed.dtype)
    lo = packed & 0x0F
    hi = packed >> 4
    return torch.stack((lo, hi), dim=-1).reshape(packed.shape[0], packed.shape[1] * 2)
