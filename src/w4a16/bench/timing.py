"""The bench harness's timers: the CUDA ones live in :mod:`w4a16.measure`; :class:`FakeTimer`
gives deterministic times from a formula, for tests on a CPU.
"""
from __future__ import annotations

from typing import Callable, Sequence

from ..measure import EagerTimer, GraphTimer, Timing, copies_for, percentile, summarize  # noqa: F401


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
