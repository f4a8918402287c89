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


def heuristic_config(M: int, N: int, K: int, num_sms: int) -> GemmConfig:
    """A config from the problem's shape alone.

    Small M is memory-bound: a 16..64-row M tile, narrow N tiles and split-K so that about two
    waves of programs stream the weight. Large M is tensor-core bound: 128-row tiles.
    """
    if M <= 64:
        bm = 16 if M <= 16 else (32 if M <= 32 else 64)
        bn = 64
        tiles = -(-N // bn)
        chunks = max(1, K // 128)
        split = max(1, min(chunks // 2 or 1, -(-2 * num_sms // tiles), 32))
        return GemmConfig("splitk", block_m=bm, block_n=bn, split_k=split, num_warps=4, num_stages=4)
    if M <= 128:
        return GemmConfig("tile", block_m=64, block_n=128, num_warps=4, num_stages=4)
    return GemmConfig("tile", block_m=128, block_n=128, num_warps=8, num_stages=3)


def choose_config(M: int, N: int, K: int, group: int, dtype: torch.dtype, device: torch.device) -> GemmConfig:
    """The configuration ``gemm(config="auto")`` uses for x [M, K] @ W[N, K]^T."""
    idx = device.index if device.type == "cuda" and device.index is not None else 0
    name = torch.cuda.get_device_name(idx) if device.type == "cuda" else "cpu"
    tuned = tuning_cache.lookup(name, M, N, K, group, dtype)
    if tuned is not None:
        return tuned
    return heuristic_config(M, N, K, sm_count(idx) if device.type == "cuda" else 132)
