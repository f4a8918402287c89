"""``w4a16.tune``: time candidate configs of every kernel backend on this GPU and persist the winners.

Each candidate is first checked against the reference (a wrong config is never chosen), then
timed as CUDA-graph replays over weight copies that together exceed twice the L2 size
(:mod:`w4a16.measure`). The winner of each backend is stored with its time, so
``backend="auto"`` later picks the fastest backend per problem. Never call it inside CUDA-graph
capture: it refuses.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, List, Optional, Sequence

import torch

from . import reference, tuning_cache
from .backends.base import Problem
from .backends.device import card_id
from .backends.selection import registry, why_not
from .errors import expect
from .measure import TOLERANCE, GraphTimer, copies_for, generator, random_activation, random_weight, rel_error


@dataclass(frozen=True)
class TuneResult:
    """One timed candidate: shape, M, backend, config, median microseconds, relative error, winner
    flag (the fastest of its backend for this problem)."""

    N: int
    K: int
    M: int
    backend: str
    config: Any
    time_us: float
    rel_err: float
    best: bool = False


def _candidates(p: Problem, candidates: Optional[Sequence[Any]], backends: Optional[Sequence[str]]) -> list:
    """(backend, config) pairs to time for ``p``."""
    pairs = []
    for b in registry().values():
        if b.config_type is None or (backends is not None and b.name not in backends) or why_not(b, p):
            continue
        mine = [c for c in candidates if isinstance(c, b.config_type)] if candidates is not None else b.candidates(p)
        pairs += [(b, c) for c in mine if b.config_supports(c, p) is None]
    return pairs


def tune(shapes: Iterable[Sequence[int]], ms: Iterable[int] = (1, 16, 64, 256, 1024, 4096),
         dtype: torch.dtype = torch.float16, group_size: int = 128, zeros: bool = False,
         candidates: Optional[Sequence[Any]] = None, persist: bool = True, progress: bool = True,
         print_fn=None, backends: Optional[Sequence[str]] = None, path=None,
         cublas: bool = False) -> List[TuneResult]:
    """Time every candidate for every (N, K) in ``shapes`` and M in ``ms`` on the current GPU.

    candidates: config objects of any backend (default: each backend's own search space);
    backends: names to tune (default: every kernel backend available here).
    Winners go to the tuning file ``path`` (default: the user's cache,
    ``w4a16.tuning_cache.cache_path()``) when ``persist``; ``gemm(config="auto")`` calls on a GPU of
    the same name and SM count use the cache's entries. With ``cublas``, each problem is also
    timed as ``F.linear`` on the weight dequantized to ``dtype`` (a row of backend "cublas",
    config None, never stored), so that a sweep carries its own baseline. Returns every timing.
    """
    from .ops import gemm

    expect(torch.cuda.is_available(), "device", "a CUDA GPU for tuning", "none")
    expect(not torch.cuda.is_current_stream_capturing(), "tune", "to run outside CUDA-graph capture",
           "a call during capture")
    from triton.runtime.errors import OutOfResources   # tuning runs Triton kernels on a GPU: Triton is there

    dev = torch.device("cuda", torch.cuda.current_device())
    gpu = card_id(dev.index)
    l2 = torch.cuda.get_device_properties(dev).L2_cache_size
    timer = GraphTimer(max_calls=30, budget_ms=40.0, max_repeats=5)
    gen = generator(dev, 0)
    todo = [(tuple(s)[0], tuple(s)[1], M) for s in shapes for M in ms]
    try:
        from tqdm import tqdm
        bar = tqdm(todo, desc="tune", disable=not progress)
    except ImportError:
        bar = todo
    out: List[TuneResult] = []
    weights: dict = {}
    for N, K, M in bar:
        if (N, K) not in weights:
            w0 = random_weight(N, K, group_size, zeros, dtype, dev, gen)
            n_copies = copies_for(w0.nbytes(), l2, hi=16)
            weights = {(N, K): [w0] + [random_weight(N, K, group_size, zeros, dtype, dev, gen)
                                       for _ in range(n_copies - 1)]}
        ws = weights[(N, K)]
        x = random_activation(M, K, dtype, dev, gen)
        ref = reference.gemm(x, ws[0])
        p = Problem(M, N, K, ws[0].group_size_effective, dtype, zeros, dev)
        rows = []
        for b, cfg in _candidates(p, candidates, backends):
            try:
                y = gemm(x, ws[0], config=cfg)
            except OutOfResources:   # a config that does not fit this GPU (shared memory, registers)
                rows.append(TuneResult(N, K, M, b.name, cfg, float("inf"), float("nan")))
                continue
            err = rel_error(y, ref)
            t = float("inf")
            if bool(torch.isfinite(y).all()) and err <= TOLERANCE[dtype]:
                t = timer.measure([lambda w=w, c=cfg: gemm(x, w, config=c) for w in ws]).median_us
            rows.append(TuneResult(N, K, M, b.name, cfg, t, err))
        if cublas:
            dense = [w.dequantize(dtype) for w in ws[:max(1, copies_for(N * K * 2, l2, hi=16))]]
            t = timer.measure([lambda W=W: torch.nn.functional.linear(x, W) for W in dense]).median_us
            out.append(TuneResult(N, K, M, "cublas", None, t, 0.0))
            del dense
        for name in dict.fromkeys(r.backend for r in rows):
            mine = [r for r in rows if r.backend == name]
            best = min(mine, key=lambda r: r.time_us)
            out += [TuneResult(r.N, r.K, r.M, r.backend, r.config, r.time_us, r.rel_err, r is best) for r in mine]
            if persist and best.time_us < float("inf"):
                b = registry()[name]
                tuning_cache.store(b, b.layout_version, gpu, M, N, K, p.group, dtype, best.config, best.time_us,
                                   path=path)
            if print_fn:
                print_fn(f"N={N} K={K} M={M} {name}: best {registry()[name].config_label(best.config)} "
                         f"{best.time_us:.1f} us ({len(mine)} candidates)")
    return out
