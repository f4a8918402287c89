"""Bytes, FLOPs and the roofline floor of one GEMM, and the figures of merit derived from a time.

    floor = max(bytes / copy_bandwidth, 2*M*N*K / gemm_rate)

Bytes count each operand once (ideal caching): for W4A16 the packed codes N*K/2, the fp16/bf16
scales (and zeros) of N * K/g groups, x (2*M*K) and y (2*M*N).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

ACT_BYTES = 2  # fp16 / bf16


def groups(N: int, K: int, group_size: int) -> int:
    """Number of (scale, zero) groups: N * K / g (g = K for group_size -1)."""
    g = K if group_size == -1 else group_size
    return N * (K // g)


def activation_bytes(M: int, N: int, K: int) -> int:
    """x [M, K] read plus y [M, N] written, 2 bytes each."""
    return ACT_BYTES * M * K + ACT_BYTES * M * N


def w4_bytes(M: int, N: int, K: int, group_size: int, zeros: bool) -> int:
    """Bytes moved by one W4A16 GEMM: N*K/2 + 2 * groups (+ 2 * groups of zeros) + 2*M*K + 2*M*N."""
    ng = groups(N, K, group_size)
    return N * K // 2 + ACT_BYTES * ng * (2 if zeros else 1) + activation_bytes(M, N, K)


def fp16_bytes(M: int, N: int, K: int) -> int:
    """Bytes moved by the fp16/bf16 GEMM on the dequantized weight: 2*N*K + 2*M*K + 2*M*N."""
    return ACT_BYTES * N * K + activation_bytes(M, N, K)


def flops(M: int, N: int, K: int) -> int:
    """2*M*N*K (one multiply and one add per term)."""
    return 2 * M * N * K


def floor_s(nbytes: float, nflops: float, bandwidth: float, rate: float) -> float:
    """max(bytes / bandwidth [B/s], flops / rate [FLOP/s]) in seconds."""
    return max(nbytes / bandwidth, nflops / rate)


@dataclass(frozen=True)
class Merit:
    """Figures of merit of one measured time.

    tflops: achieved TFLOP/s; gbps: effective GB/s (modelled bytes / time, 1e9 B/s);
    floor_us: the roofline floor; frac_floor: floor / time (1.0 = at the roofline).
    """

    tflops: float
    gbps: float
    floor_us: float
    frac_floor: float


def merit(time_s: float, nbytes: float, nflops: float, bandwidth: float, rate: float) -> Merit:
    """Merit of a GEMM that moved ``nbytes`` and did ``nflops`` in ``time_s`` seconds."""
    fl = floor_s(nbytes, nflops, bandwidth, rate)
    return Merit(tflops=nflops / time_s / 1e12, gbps=nbytes / time_s / 1e9,
                 floor_us=fl * 1e6, frac_floor=fl / time_s)


def speedup(baseline_s: Optional[float], time_s: Optional[float]) -> Optional[float]:
    """baseline / time, or None when either is missing or not a positive finite number."""
    ok = lambda t: t is not None and math.isfinite(t) and t > 0  # noqa: E731
    return baseline_s / time_s if ok(baseline_s) and ok(time_s) else None
