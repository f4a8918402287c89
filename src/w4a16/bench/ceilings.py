"""The card's ceilings, measured in the same run: copy bandwidth and the fp16 tensor-core rate.

Both are measured eagerly with CUDA events: the copy as a kernel (``b.copy_(a)``) launched outside
any graph — captured in a graph the same copy becomes a copy-engine memcpy that reads markedly
slower — and the rate as a large cuBLAS fp16 GEMM on random data.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from ..measure import percentile

FAKE_BANDWIDTH = 2.0e12
FAKE_RATE = 400e12
FAKE_L2 = 50 * 2**20
FALLBACK_L2 = 64 * 2**20  # where torch does not report the L2 size: above H100 (50 MB) and H200 (60 MB)


@dataclass(frozen=True)
class Ceilings:
    """bandwidth: device-to-device copy, bytes read + written per second (median of the repeats);
    rate: fp16 FLOP/s of a gemm_size^3 cuBLAS GEMM (median); the *_max fields are the best repeat;
    l2_bytes: the L2 size; source: "measured" or "fake"."""

    bandwidth: float
    bandwidth_max: float
    rate: float
    rate_max: float
    l2_bytes: int
    copy_bytes: int
    gemm_size: int
    source: str

    def as_dict(self) -> dict:
        d = asdict(self)
        d.update(copy_tb_s=self.bandwidth / 1e12, gemm_tflop_s=self.rate / 1e12, l2_mib=self.l2_bytes / 2**20)
        return d


def _event_times_s(fn, repeats: int, warmup: int) -> list:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeats)]
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return [s.elapsed_time(e) * 1e-3 for s, e in events]


def measure_copy_bandwidth(device, nbytes: int = 512 * 2**20, repeats: int = 20) -> tuple:
    """(median, best) bytes/s of ``b.copy_(a)`` on two ``nbytes`` uint8 buffers, counting 2 * nbytes."""
    a = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    times = _event_times_s(lambda: b.copy_(a), repeats, warmup=3)
    del a, b
    return 2 * nbytes / percentile(times, 50), 2 * nbytes / min(times)


def measure_gemm_rate(device, size: int = 8192, repeats: int = 10) -> tuple:
    """(median, best) FLOP/s of an fp16 [size, size] @ [size, size] cuBLAS GEMM on random data."""
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(size, size, device=device, dtype=torch.float16, generator=g)
    b = torch.randn(size, size, device=device, dtype=torch.float16, generator=g)
    times = _event_times_s(lambda: torch.mm(a, b), repeats, warmup=3)
    del a, b
    nflops = 2.0 * size ** 3
    return nflops / percentile(times, 50), nflops / min(times)


def measure(device, copy_bytes: int = 512 * 2**20, gemm_size: int = 8192) -> Ceilings:
    """Measure both ceilings on ``device`` (a CUDA device) and read its L2 size."""
    device = torch.device(device)
    bw, bw_max = measure_copy_bandwidth(device, copy_bytes)
    rate, rate_max = measure_gemm_rate(device, gemm_size)
    l2 = int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or FALLBACK_L2)
    torch.cuda.empty_cache()
    return Ceilings(bw, bw_max, rate, rate_max, l2, copy_bytes, gemm_size, "measured")


def fake() -> Ceilings:
    """Fixed ceilings for runs with the fake timer (2 TB/s, 400 TFLOP/s, 50 MiB L2)."""
    return Ceilings(FAKE_BANDWIDTH, FAKE_BANDWIDTH, FAKE_RATE, FAKE_RATE, FAKE_L2, 512 * 2**20, 8192, "fake")
