"""Timers with one interface: ``measure(calls, nbytes, nflops) -> Timing``.

``calls`` holds one zero-argument callable per weight copy; every timer cycles through them so
consecutive calls read different weights and a layer is not served from L2 (the runner makes
enough copies: :func:`copies_for`). Warm-up calls are never part of a measurement.

* :class:`GraphTimer` — CUDA-graph replay of ``n`` back-to-back calls; per-call time = replay
  time / n, one sample per replay. Kernel time without host overhead.
* :class:`EagerTimer` — CUDA events around a Python loop of ``n`` calls; includes the host
  dispatch a user pays when the GPU waits on it.
* :class:`FakeTimer` — deterministic times from a formula, for tests on a CPU.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch


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


class FakeTimer:
    """Deterministic times for tests: bytes / (0.8 * bandwidth) + flops / (0.75 * rate) + overhead.

    Never runs ``calls``. ``name`` is "graph" or "eager" (eager adds 4 us of host overhead);
    p10 / p90 are 0.97x / 1.05x the median.
    """

    def __init__(self, name: str = "graph", bandwidth: float = 2.0e12, rate: float = 400e12):
        self.name = name
        self.bandwidth = bandwidth
        self.rate = rate
        self.overhead_us = 2.0 if name == "graph" else 6.0

    def measure(self, calls: Sequence[Callable[[], object]], nbytes: float = 0.0, nflops: float = 0.0) -> Timing:
        t = nbytes / (0.8 * self.bandwidth) * 1e6 + nflops / (0.75 * self.rate) * 1e6 + self.overhead_us
        return Timing(t, 0.97 * t, 1.05 * t, max(1, len(calls)), 5)


def make_timers(kind: str, fake: bool = False) -> list:
    """Timers for ``--timing graph|eager|both``; fake ones for ``--fake-timer``."""
    names = ("graph", "eager") if kind == "both" else (kind,)
    if fake:
        return [FakeTimer(n) for n in names]
    return [GraphTimer() if n == "graph" else EagerTimer() for n in names]
