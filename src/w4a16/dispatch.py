"""Choosing a kernel configuration for a problem (``config="auto"``).

Order: a tuned winner from the on-disk cache (``w4a16.tune``), then the shipped table measured
on H100/H200 (``data/tuned.json``), then the heuristic below.
"""
from __future__ import annotations

import functools

import torch

from .config import GemmConfig
from . import tuning_cache


@functools.lru_cache(maxsize=16)
def sm_count(device_index: int) -> int:
    """Multiprocessors of a CUDA device (132 for an H100/H200 SXM when no GPU is present)."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(device_index).multi_processor_count
    return 132


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


def choose_config(M: int, N: int, K: int, group: int, dtype: torch.dtype, device: torch.device) -> GemmConfig:
    """The configuration ``gemm(config="auto")`` uses for x [M, K] @ W[N, K]^T."""
    idx = device.index if device.type == "cuda" and device.index is not None else 0
    name = torch.cuda.get_device_name(idx) if device.type == "cuda" else "cpu"
    tuned = tuning_cache.lookup(name, M, N, K, group, dtype)
    if tuned is not None:
        return tuned
    return heuristic_config(M, N, K, sm_count(idx) if device.type == "cuda" else 132)
