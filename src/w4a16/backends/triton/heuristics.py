"""The Triton backend's untuned config choice and its tuning search space.

Both come from the H200 tuning table (``data/tuned.json``); ``w4a16.tune`` times
:func:`candidate_configs` and the winners override :func:`heuristic_config` per problem.
"""
from __future__ import annotations

from typing import List

from .config import GemmConfig


def _split_for(tiles: int, K: int, target_programs: int) -> int:
    """Split-K factor giving about ``target_programs`` programs, at least 2 chunks per split."""
    chunks = max(1, K // 128)
    return max(1, min(round(target_programs / tiles), max(1, chunks // 2), 32))


def heuristic_config(M: int, N: int, K: int, num_sms: int) -> GemmConfig:
    """A config from the problem's shape alone, for shapes and GPUs without a tuned entry.

    Rules read off the H200 tuning table (``data/tuned.json``, 48 winners over the Llama-3
    8B/70B layers at M = 1..4096, layout version 2; times there are CUDA-graph replays):

    * M <= 16 (memory-bound): 64-wide N tiles, one pipeline stage (the codes go straight from
      global memory to registers), scales applied after the MMA, about 600-900 programs
      (4-7 per SM); 14 of the 16 winners.
    * M <= 64: a 64-row tile, 64-wide N tiles, one stage, two chunks per loop step, about 300-600
      programs (all 8 winners).
    * M <= 256: 128x64 tiles (4 warps) where N <= 4096, 256x128 tiles where N >= 10240, else 128x128
      (8 warps, 4 stages, scales in fp32 loaded in the loop).
    * larger M: 256x128 tiles, 8 warps, 3 stages, fp32 scales loaded in the loop (15 of 16).
    """
    scale = num_sms / 132
    if M <= 16:
        split = _split_for(-(-N // 64), K, 768 * scale)
        return GemmConfig("splitk", block_m=16, block_n=64, split_k=split, num_warps=4, num_stages=1,
                          scale_after=True)
    if M <= 64:
        bm = 32 if M <= 32 else 64
        split = _split_for(-(-N // 64), K, 450 * scale)
        return GemmConfig("splitk", block_m=bm, block_n=64, split_k=split, num_warps=4, num_stages=1, unroll=2)
    if M <= 256 and N <= 4096:
        return GemmConfig("tile", block_m=128, block_n=64, num_warps=4, num_stages=4)
    if M <= 256 and N < 10240:
        return GemmConfig("tile", block_m=128, block_n=128, num_warps=8, num_stages=4, prefetch=False,
                          wide_scales=True)
    return GemmConfig("tile", block_m=256, block_n=128, num_warps=8, num_stages=3, prefetch=False,
                      wide_scales=True)


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
