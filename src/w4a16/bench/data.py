"""Random operands for a measured point: never zeros, outputs of order one.

Codes are uniform in 0..15, zero points (with ``zeros``) uniform integers in 0..15, scales in
[0.5, 1.5] / sqrt(K * 21.25) (21.25 is the variance of a uniform code about 8), so that with
x ~ N(0, 1) every output has a standard deviation near 1 and fp16 never overflows.
"""
from __future__ import annotations

import math

import torch

from ..weight import QuantizedWeight


def generator(device, seed: int) -> torch.Generator:
    """A torch.Generator on ``device`` seeded with ``seed``."""
    return torch.Generator(device=torch.device(device)).manual_seed(int(seed))


def random_weight(N: int, K: int, group_size: int, zeros: bool, dtype: torch.dtype, device,
                  gen: torch.Generator) -> QuantizedWeight:
    """A random QuantizedWeight (N, K): qweight uint8 [N, K/2], scales (and zeros) ``dtype`` [N, K/g]."""
    g = K if group_size == -1 else group_size
    q = torch.randint(0, 256, (N, K // 2), dtype=torch.uint8, device=device, generator=gen)
    s = (torch.rand(N, K // g, device=device, generator=gen) + 0.5) / math.sqrt(K * 21.25)
    z = None
    if zeros:
        z = torch.randint(0, 16, (N, K // g), device=device, generator=gen).to(dtype)
    return QuantizedWeight.from_plain(q, s.to(dtype), z, group_size)


def random_activation(M: int, K: int, dtype: torch.dtype, device, gen: torch.Generator) -> torch.Tensor:
    """x [M, K] ~ N(0, 1) in ``dtype``."""
    return torch.randn(M, K, device=device, generator=gen).to(dtype)


def rel_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative Frobenius error |y - ref| / |ref| in fp32 (inf when shapes differ, nan passes through)."""
    if tuple(y.shape) != tuple(ref.shape):
        return math.inf
    r = ref.float()
    return float(torch.linalg.vector_norm(y.float() - r) / torch.linalg.vector_norm(r).clamp_min(1e-30))
