"""One home for what checks and timings share: tolerances, relative error, random operands, and
the CUDA timers (``measure(calls, nbytes, nflops) -> Timing``).

Random operands are never zeros and give outputs of order one: codes uniform in 0..15, zero
points (with ``zeros``) uniform integers in 0..15, scales in [0.5, 1.5] / sqrt(K * 21.25) (21.25
is the variance of a uniform code about 8), so with x ~ N(0, 1) every output has a standard
deviation near 1 and fp16 never overflows.

Timers: ``calls`` holds one zero-argument callable per weight copy; every timer cycles through
them so consecutive calls read different weights and a layer is not served from L2
(:func:`copies_for` says how many copies). Warm-up calls are never part of a measurement.

* :class:`GraphTimer` — CUDA-graph replay of ``n`` back-to-back calls; per-call time = replay
  time / n, one sample per replay. Kernel time without host overhead.
* :class:`EagerTimer` — CUDA events around a Python loop of ``n`` calls; includes the host
  dispatch a user pays when the GPU waits on it.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from .errors import expect
from .weight import QuantizedWeight

# Largest relative Frobenius error of a kernel against ``w4a16.reference.gemm`` (fp32), by x's
# dtype: a few units of the dtype's rounding of the weight tile, summed over K.
TOLERANCE = {torch.float16: 2e-3, torch.bfloat16: 1e-2}


def generator(device, seed: int) -> torch.Generator:
    """A torch.Generator on ``device`` seeded with ``seed``."""
    return torch.Generator(device=torch.device(device)).manual_seed(int(seed))


def random_weight(N: int, K: int, group_size: int, zeros, dtype: torch.dtype, device,
                  gen: torch.Generator) -> QuantizedWeight:
    """A random QuantizedWeight (N, K): qweight uint8 [N, K/2], scales (and zeros) ``dtype`` [N, K/g].

    zeros: False / None (symmetric), True or "int" (integer zero points in 0..15), "float" (any
    float in [0, 15), as HQQ stores)."""
    expect(zeros in (False, None, True, "int", "float"), "zeros", "False, None, True, 'int' or 'float'", zeros)
    g = K if group_size == -1 else group_size
    q = torch.randint(0, 256, (N, K // 2), dtype=torch.uint8, device=device, generator=gen)
    s = (torch.rand(N, K // g, device=device, generator=gen) + 0.5) / math.sqrt(K * 21.25)
    z = None
    if zeros == "float":
        z = (torch.rand(N, K // g, device=device, generator=gen) * 15).to(dtype)
    elif zeros:
        z = torch.randint(0, 16, (N, K // g), device=device, generator=gen).to(dtype)
    return QuantizedWeight.from_plain(q, s.to(dtype), z, group_size)


def random_activation(M: int, K: int, dtype: torch.dtype, device, gen: torch.Generator) -> torch.Tensor:
    """x [M, K] ~ N(0, 1) in ``dtype``."""
    return torch.randn(M, K, device=device, generator=gen).to(dtype)


def graph_replay_matches_eager(run: Callable[[Optional[torch.Tensor]], torch.Tensor], replays: int = 3) -> bool:
    """Capture ``run(out)`` (a launch writing into ``out``; ``run(None)`` allocates) in a CUDA graph
    after a warm-up on a side stream, and check that every replay into a NaN-poisoned output
    reproduces the eager result bit for bit."""
    eager = run(None)
    out = torch.empty_like(eager)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        run(out)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run(out)
    for _ in range(replays):
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        if not torch.equal(out, eager):
            return False
    return True


def rel_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative Frobenius error |y - ref| / |ref| in float64: inf when the shapes differ, 0 for two
    zero (or empty) tensors, inf for a non-zero y against a zero ref; NaN passes through."""
    if tuple(y.shape) != tuple(ref.shape):
        return math.inf
    d = float(torch.linalg.vector_norm((y.double() - ref.double()).flatten()))
    r = float(torch.linalg.vector_norm(ref.double().flatten()))
    if r == 0.0:
        return 0.0 if d == 0.0 else (d if math.isnan(d) else math.inf)
    return d / r


def loop_timer(device: str) -> Callable[[Callable[[], object], int], float]:
    """time_ms(fn, iters): mean ms of ``iters`` back-to-back calls (CUDA events on a GPU)."""
    def cuda_ms(fn, iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / iters

    def cpu_ms(fn, iters):
        t = time.perf_counter()
        for _ in range(iters):
            fn()
        return (time.perf_counter() - t) * 1e3 / iters

    return cuda_ms if str(device).startswith("cuda") else cpu_ms


@dataclass(frozen=True)
class Timing:
    """Per-call time of one measurement, in microseconds.

    median_us / p10_us / p90_us over ``samples`` repeats of ``calls`` back-to-back calls each.
    """

    median_us: float
    p10_us: float
    p90_us: float
    calls: int
    samples: int


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) of ``values`` with linear interpolation."""
    v = sorted(values)
    if not v:
        raise ValueError("percentile: expected at least one value, got none")
    pos = (len(v) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def summarize(per_call_us: Sequence[float], calls: int) -> Timing:
    """Timing from one per-call time (us) per repeat."""
    return Timing(percentile(per_call_us, 50), percentile(per_call_us, 10), percentile(per_call_us, 90),
                  calls, len(per_call_us))


def copies_for(weight_bytes: int, l2_bytes: int, factor: float = 2.0, lo: int = 2, hi: int = 64) -> int:
    """Weight copies to rotate so that they total at least ``factor`` x the L2 size (within [lo, hi])."""
    need = math.ceil(factor * l2_bytes / max(1, weight_bytes))
    return int(min(hi, max(lo, need)))


def _loop_ms(calls: Sequence[Callable[[], object]], n: int) -> float:
    """Milliseconds between CUDA events around ``n`` eager calls cycling through ``calls``."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for i in range(n):
        calls[i % len(calls)]()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


class _CudaTimer:
    """Shared sizing for the CUDA timers.

    After warm-up, one pass over the copies estimates the per-call time ``est``; a measurement then
    runs ``calls`` = ceil(target_ms / est) clamped to [1, max_calls], raised to a multiple of the
    number of copies, and repeats it ceil(budget_ms / (calls * est)) times within
    [min_repeats, max_repeats]: ~20-50 calls of a fast kernel, 10 repeats; a 100 ms call runs
    once per copy, 3 repeats.
    """

    name = "cuda"

    def __init__(self, target_ms: float = 2.0, max_calls: int = 50, budget_ms: float = 100.0,
                 min_repeats: int = 3, max_repeats: int = 10):
        self.target_ms = target_ms
        self.max_calls = max_calls
        self.budget_ms = budget_ms
        self.min_repeats = min_repeats
        self.max_repeats = max_repeats

    def _warm_and_estimate(self, calls: Sequence[Callable[[], object]]) -> float:
        """Run every copy once (warm-up), then time one pass of >= 3 calls; returns seconds per call."""
        for f in calls:
            f()
        torch.cuda.synchronize()
        n = max(3, len(calls))
        return max(_loop_ms(calls, n) * 1e-3 / n, 1e-7)

    def _sizes(self, est_s: float, copies: int) -> tuple:
        n = min(self.max_calls, max(1, math.ceil(self.target_ms * 1e-3 / est_s)))
        n = math.ceil(max(n, copies) / copies) * copies
        reps = math.ceil(self.budget_ms * 1e-3 / (n * est_s))
        return n, min(self.max_repeats, max(self.min_repeats, reps))


class GraphTimer(_CudaTimer):
    """CUDA-graph replay of back-to-back calls over the rotating copies."""

    name = "graph"

    def measure(self, calls: Sequence[Callable[[], object]], nbytes: float = 0.0, nflops: float = 0.0) -> Timing:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm up off the capture stream, as CUDA graphs require
            est = self._warm_and_estimate(calls)
        torch.cuda.current_stream().wait_stream(stream)
        n, reps = self._sizes(est, len(calls))
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for i in range(n):
                calls[i % len(calls)]()
        graph.replay()  # first replay uploads the graph: warm-up, not measured
        torch.cuda.synchronize()
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(reps)]
        for start, end in events:
            start.record()
            graph.replay()
            end.record()
        torch.cuda.synchronize()
        per_call = [s.elapsed_time(e) * 1e3 / n for s, e in events]
        del graph
        return summarize(per_call, n)


class EagerTimer(_CudaTimer):
    """CUDA events around a Python loop of calls over the rotating copies (host overhead included)."""

    name = "eager"

    def measure(self, calls: Sequence[Callable[[], object]], nbytes: float = 0.0, nflops: float = 0.0) -> Timing:
        est = self._warm_and_estimate(calls)
        n, reps = self._sizes(est, len(calls))
        per_call = []
        for _ in range(reps):
            torch.cuda.synchronize()
            per_call.append(_loop_ms(calls, n) * 1e3 / n)
        return summarize(per_call, n)
