"""Eager decode steps of several models timed in alternating blocks.

An eager decode step of an 8B model is bound by the host, and the host's speed drifts by 10-20%
over minutes (other processes, clocks), so timing one model after the other compares different
machines. Here each model's eager step is timed in short blocks that alternate between the
models (the order reversed every other round), and each model's time is the median over its
blocks; the ratio is the median of the per-round ratios, so drift between rounds cancels. Each
block starts from a freshly prefilled cache (outside the timing).
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Dict, List

import torch

from ..measure import loop_timer
from .decoder import StaticDecoder


@dataclass
class InterleavedEager:
    """batch; ms per eager step per model (median over blocks); ``speedup``: for each model after
    the first, the median over rounds of (first model's time / its time) = its tokens/s relative
    to the first model; blocks and steps per block."""
    batch: int
    step_ms: Dict[str, float]
    speedup: Dict[str, float]
    blocks: int
    steps: int
    rounds_ms: Dict[str, List[float]] = field(default_factory=dict)


@torch.no_grad()
def interleaved_eager(models: Dict[str, torch.nn.Module], batch: int, device: str, context: int = 256,
                      prompt_len: int = 32, blocks: int = 10, steps: int = 5, seed: int = 2) -> InterleavedEager:
    """Time ``steps`` eager decode steps of each model in turn, ``blocks`` rounds (see the module
    docstring). Every model decodes the same prompt and token on its own static KV cache."""
    if not models:
        raise ValueError("models: expected at least one model, got none")
    if prompt_len + max(steps, 3) + 1 > context:
        raise ValueError(f"context: expected >= prompt_len + steps + 1 = {prompt_len + max(steps, 3) + 1}, got {context}")
    g = torch.Generator().manual_seed(seed)
    vocab = next(iter(models.values())).config.vocab_size
    prompt = torch.randint(0, vocab, (batch, prompt_len), generator=g).to(device)
    token = torch.randint(0, vocab, (batch, 1), generator=g).to(device)
    decoders = {}
    for name, model in models.items():
        dec = StaticDecoder(model, batch, context, prompt_len, device)
        dec.prefill(prompt)
        dec.ids.copy_(token)
        decoders[name] = dec
    time_ms = loop_timer(device)
    for dec in decoders.values():
        time_ms(dec.step, 3)  # warm-up: compiled kernels, bound launches, allocator
    rounds: Dict[str, List[float]] = {name: [] for name in decoders}
    names = list(decoders)
    for r in range(blocks):
        for name in (names if r % 2 == 0 else names[::-1]):
            dec = decoders[name]
            dec.prefill(prompt)   # a cache whose positions advance per step (transformers 5) starts over
            rounds[name].append(time_ms(dec.step, steps))
    first = names[0]
    speedup = {n: statistics.median(a / b for a, b in zip(rounds[first], rounds[n])) for n in names[1:]}
    return InterleavedEager(batch, {n: statistics.median(v) for n, v in rounds.items()}, speedup, blocks, steps,
                            rounds)
