"""Random mixture-of-experts problems for ``w4a16 fuzz --moe``: the same interface as
:mod:`w4a16.fuzz` (``cases``, ``run_case``, ``passes``), over ``w4a16.moe.fused_moe`` against
``w4a16.moe.reference.fused_moe``.

A case draws the experts (E 1..16, k 1..min(E, 8)), T tokens (0 included), H and I (even,
multiples of the group size: 32, 64, 128, 256 or per channel), symmetric / integer / float zero
points, the dtype, and a routing: random distinct experts per token, every token on the same
experts, or only two experts used (the others get no token).
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Iterator, Optional, Tuple

import torch

from ..measure import TOLERANCE, rel_error

ROUTINGS = ("random", "same", "two")


@dataclass(frozen=True)
class MoeCase:
    T: int
    H: int
    I: int
    E: int
    k: int
    group: int
    zeros: Optional[str]
    dtype: torch.dtype
    routing: str
    seed: int

    def short(self) -> str:
        z = self.zeros or "sym"
        return (f"T{self.T} H{self.H} I{self.I} E{self.E} k{self.k} g={self.group} {z} "
                f"{'bf16' if self.dtype == torch.bfloat16 else 'fp16'} {self.routing} seed{self.seed}")


def _dim(rng: random.Random, hi: int, g: int) -> int:
    """An even multiple of ``g`` (or of 8 when per channel: some of them, not multiples of 16, run
    on the plain-layout kernel) up to ``hi``, or one group when ``hi`` is smaller than a group."""
    step = g if g > 0 else 8
    return step * rng.randint(1, max(1, hi // step))


def cases(n: int, seed: int = 0, max_mnk: Tuple[int, int, int] = (64, 256, 512),
          dtypes=(torch.float16,)) -> Iterator[MoeCase]:
    """``n`` random cases; ``max_mnk`` bounds (T, H, I)."""
    rng = random.Random(seed)
    for i in range(n):
        g = rng.choice((32, 64, 128, 256, -1))
        E = rng.randint(1, 16)
        yield MoeCase(T=rng.choice((0, 1, rng.randint(1, max_mnk[0]))), H=_dim(rng, max_mnk[1], g),
                      I=_dim(rng, max_mnk[2], g), E=E, k=rng.randint(1, min(E, 8)), group=g,
                      zeros=rng.choice((None, "int", "float")), dtype=rng.choice(tuple(dtypes)),
                      routing=rng.choice(ROUTINGS), seed=seed * 100003 + i)


def make_problem(case: MoeCase, device) -> tuple:
    """(x [T, H], gate_up, down, topk_ids [T, k], topk_weights [T, k]) on ``device``."""
    from ..measure import generator, random_weight
    from .weights import QuantizedExperts

    gen = torch.Generator().manual_seed(case.seed)

    def experts(N, K):
        return QuantizedExperts.stack([random_weight(N, K, case.group, case.zeros, case.dtype, "cpu",
                                                     generator("cpu", case.seed + e)) for e in range(case.E)]).to(device)

    gu, dn = experts(2 * case.I, case.H), experts(case.H, case.I)
    x = torch.randn(case.T, case.H, generator=gen).to(device, case.dtype)
    if case.routing == "same":
        ids = torch.randperm(case.E, generator=gen)[:case.k].repeat(case.T, 1)
    elif case.routing == "two" and case.E >= 2 and case.k <= 2:
        ids = torch.stack([torch.randperm(2, generator=gen)[:case.k] * (case.E - 1) for _ in range(case.T)]) \
            if case.T else torch.zeros(0, case.k, dtype=torch.long)
    else:
        ids = torch.stack([torch.randperm(case.E, generator=gen)[:case.k] for _ in range(case.T)]) \
            if case.T else torch.zeros(0, case.k, dtype=torch.long)
    w = torch.rand(case.T, case.k, generator=gen) + 0.05
    return x, gu, dn, ids.to(device), (w / w.sum(1, keepdim=True)).to(device)


def run_case(case: MoeCase, device="cpu", backend: Optional[str] = None) -> float:
    """Relative Frobenius error of ``fused_moe`` against the reference (inf for a wrong shape or
    dtype, 0 for an empty result of the right shape)."""
    from . import ops, reference

    x, gu, dn, ids, w = make_problem(case, device)
    ref = reference.fused_moe(x, gu, dn, ids, w)
    y = ops.fused_moe(x, gu, dn, ids, w, **({} if backend is None else {"backend": backend}))
    if y.dtype != ref.dtype or tuple(y.shape) != tuple(ref.shape):
        return math.inf
    return rel_error(y, ref) if ref.numel() else 0.0


def passes(case: MoeCase, err: float) -> bool:
    """True when ``err`` is within the dtype's tolerance (NaN never passes)."""
    return err <= TOLERANCE[case.dtype]
