"""``w4a16.tune``: time candidate configs on this GPU and persist the winners.

Each candidate is first checked against the reference (a wrong config is never chosen), then
timed as CUDA-graph replays over weight copies that together exceed twice the L2 size.
Never call it inside CUDA-graph capture: it refuses.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, List, Optional, Sequence

import torch

from . import reference, tuning_cache
from .config import GemmConfig
from .dispatch import heuristic_config, sm_count
from .errors import expect
from .weight import QuantizedWeight


@dataclass(frozen=True)
class TuneResult:
    """One timed candidate: shape, M, config, median microseconds, relative error, winner flag."""

    N: int
    K: int
    M: int
    config: GemmConfig
    time_us: float
    rel_err: float
    best: bool = False


def candidate_configs(M: int, N: int, K: int, num_sms: int) -> List[GemmConfig]:
    """The search space for one problem: split-K shapes for small M, tiles for large M.

    Candidates come with scales in the activation dtype (prefetched a chunk ahead) or in fp32
    (``wide_scales``, staged by the pipeline), with one or more pipeline stages and chunks per
    loop step.
    """
    cands = {heuristic_config(M, N, K, num_sms)}
    if M <= 64:
        bm = max(16, min(64, 1 << (max(M, 1) - 1).bit_length()))
        chunks = max(1, K // 128)
        for bn in (64, 128, 256):
            tiles = -(-N // bn)
            base = max(1, -(-2 * num_sms // tiles))
            warps = 8 if bn == 256 else 4
            # (warps, stages, unroll, swap_ab, wide_scales, scale_after)
            shapes = [(warps, 4, 1, True, False, False), (warps, 4, 1, True, True, True)]
            if bn != 256:
                shapes += [(4, 1, 2, True, False, False), (4, 1, 2, True, False, True), (4, 1, 1, True, False, True),
                           (4, 1, 4, True, False, False), (4, 1, 4, True, False, True),
                           (4, 2, 2, True, False, True), (4, 4, 1, True, False, True), (4, 4, 1, True, True, False),
                           (4, 4, 2, False, False, False)]
            for split in sorted({base, 2 * base}):
                if split > chunks:
                    continue
                for warps_, stages, unroll, swap, wide, after in shapes:
                    cands.add(GemmConfig("splitk", block_m=bm, block_n=bn, split_k=split, num_warps=warps_,
                                         num_stages=stages, swap_ab=swap, unroll=unroll, wide_scales=wide,
                                         prefetch=not wide, scale_after=after))
    else:
        for bm, bn, warps, stages in ((64, 128, 4, 4), (128, 128, 8, 3), (128, 128, 8, 4), (128, 256, 8, 3),
                                      (256, 128, 8, 3), (128, 64, 4, 4)):
            if bm <= max(64, 1 << (M - 1).bit_length()):
                # (swap_ab, prefetch, wide_scales)
                for swap, prefetch, wide in ((True, True, False), (True, False, False), (True, False, True),
                                             (False, True, False)):
                    cands.add(GemmConfig("tile", block_m=bm, block_n=bn, num_warps=warps, num_stages=stages,
                                         swap_ab=swap, prefetch=prefetch, wide_scales=wide))
    return sorted(cands, key=lambda c: c.short())


def random_weight(N: int, K: int, group_size: int, zeros: bool, dtype: torch.dtype, device) -> QuantizedWeight:
    """A random int4 weight: uniform codes, scales ~ 0.01, integer zeros in 0..15 (if asked)."""
    g = K if group_size == -1 else group_size
    q = torch.randint(0, 256, (N, K // 2), dtype=torch.uint8, device=device)
    s = (torch.rand(N, K // g, device=device) * 0.01 + 0.005).to(dtype)
    z = torch.randint(0, 16, (N, K // g), device=device).to(dtype) if zeros else None
    return QuantizedWeight.from_plain(q, s, z, group_size)


def tune(shapes: Iterable[Sequence[int]], ms: Iterable[int] = (1, 16, 64, 256, 1024, 4096),
         dtype: torch.dtype = torch.float16, group_size: int = 128, zeros: bool = False,
         candidates: Optional[Sequence[GemmConfig]] = None, persist: bool = True,
         progress: bool = True, print_fn=None) -> List[TuneResult]:
    """Time every candidate for every (N, K) in ``shapes`` and M in ``ms`` on the current GPU.

    Winners go to the cache file (``w4a16.tuning_cache.cache_path()``) when ``persist``; later
    ``gemm(config="auto")`` calls on a GPU of the same name use them. Returns every timing.
    """
    from .bench.timing import GraphTimer, copies_for
    from .ops import gemm

    expect(torch.cuda.is_available(), "device", "a CUDA GPU for tuning", "none")
    expect(not torch.cuda.is_current_stream_capturing(), "tune", "to run outside CUDA-graph capture",
           "a call during capture")
    dev = torch.device("cuda", torch.cuda.current_device())
    gpu = torch.cuda.get_device_name(dev)
    l2 = torch.cuda.get_device_properties(dev).L2_cache_size
    sms = sm_count(dev.index)
    timer = GraphTimer(max_calls=30, budget_ms=40.0, max_repeats=5)
    shapes, ms = [tuple(s) for s in shapes], list(ms)
    todo = [(N, K, M) for N, K in shapes for M in ms]
    try:
        from tqdm import tqdm
        bar = tqdm(todo, desc="tune", disable=not progress)
    except ImportError:
        bar = todo
    out: List[TuneResult] = []
    weights = {}
    for N, K, M in bar:
        if (N, K) not in weights:
            w0 = random_weight(N, K, group_size, zeros, dtype, dev)
            n_copies = copies_for(w0.nbytes(), l2, hi=16)
            weights = {(N, K): [w0] + [random_weight(N, K, group_size, zeros, dtype, dev)
                                       for _ in range(n_copies - 1)]}
        ws = weights[(N, K)]
        x = torch.randn(M, K, device=dev, dtype=dtype)
        ref = reference.gemm(x, ws[0]).float()
        rows = []
        for cfg in candidates or candidate_configs(M, N, K, sms):
            try:
                y = gemm(x, ws[0], config=cfg).float()
            except Exception as e:  # e.g. a tile that needs more shared memory than the GPU has
                if "out of resource" not in str(e).lower() and "OutOfResources" not in type(e).__name__:
                    raise
                rows.append(TuneResult(N, K, M, cfg, float("inf"), float("nan")))
                continue
            err = float((y - ref).norm() / ref.norm().clamp_min(1e-30))
            ok = bool(torch.isfinite(y).all()) and err <= (2e-3 if dtype == torch.float16 else 1e-2)
            t = float("inf")
            if ok:
                t = timer.measure([lambda w=w: gemm(x, w, config=cfg) for w in ws]).median_us
            rows.append(TuneResult(N, K, M, cfg, t, err))
        best = min(rows, key=lambda r: r.time_us)
        out += [TuneResult(r.N, r.K, r.M, r.config, r.time_us, r.rel_err, r is best) for r in rows]
        if persist and best.time_us < float("inf"):
            from .ops import _CONFIG_CACHE
            _CONFIG_CACHE.clear()
            tuning_cache.store(gpu, M, N, K, ws[0].group_size_effective, dtype, best.config, best.time_us)
        if print_fn:
            print_fn(f"N={N} K={K} M={M}: best {best.config.short()} {best.time_us:.1f} us "
                     f"({len(rows)} candidates)")
    return out
