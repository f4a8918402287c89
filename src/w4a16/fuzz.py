"""Seeded random GEMM problems checked against the reference: ``w4a16.gemm`` vs ``reference.gemm``.

    for case in cases(300, seed=0):
        err = run_case(case, "cpu")          # relative Frobenius error (NaN when y has NaN)
        assert passes(case, err), case

A case draws M, N, K within the alignment rules (K even and a multiple of the group size, any
M >= 0, any N >= 1), a group size, the kind of zero points (none / int / float), bias, alpha,
act-order (a random ``perm``), the layout of x (contiguous, transposed, strided, or with a batch
dimension), the dtype, the epilogue (none, SiLU(gate)·up, a residual, or a residual and the
RMSNorm of the result) and whether x is read RMS-normalized (the last two drawn from the case's
own seed, so adding them left the other fields of a seed's cases as they were, except that N of
a SiLU(gate)·up case is rounded up to a multiple of 16). Every case carries its own seed, so one
failing case can be rerun alone. The tests run a few hundred small cases in Triton's interpreter; ``w4a16 fuzz``
runs thousands per backend on a GPU.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, replace
from typing import Iterator, Optional, Sequence, Tuple

import torch

from . import reference, spec
from .measure import TOLERANCE, rel_error  # relative Frobenius error and its bound, by x's dtype
from .pack import pack_nibbles
from .weight import QuantizedWeight

ZEROS = ("none", "int", "float")
X_LAYOUTS = ("contiguous", "transposed", "strided", "batched")
ALPHAS = (1.0, 1.0, 0.5, 2.0, -1.25)
EPILOGUE_SHARE = 0.3   # cases with an epilogue
INPUT_NORM_SHARE = 0.1   # cases that read x RMS-normalized


def draw_epilogue(seed: int) -> Optional[str]:
    """The epilogue of a case: None, "silu_mul", "residual" or "residual_rmsnorm" (half of the
    residual cases), from its seed."""
    r = random.Random(seed ^ 0x5EED)
    if r.random() >= EPILOGUE_SHARE:
        return None
    e = r.choice(["silu_mul", "residual"])
    return "residual_rmsnorm" if e == "residual" and r.random() < 0.5 else e


def draw_input_norm(seed: int) -> bool:
    """Whether a case reads x RMS-normalized (one case in ten), from its seed."""
    return random.Random(seed ^ 0x1A0).random() < INPUT_NORM_SHARE


@dataclass(frozen=True)
class Case:
    """One random problem. x [M, K] (laid out per ``x_layout``) times a (N, K) int4 weight.

    group_size: 32, 64, 128, 256 or -1; zeros: "none" (z = 8), "int" or "float";
    act_order: the weight gets a random ``perm``; seed: draws the tensors of this case;
    epilogue: None, "silu_mul", "residual" or "residual_rmsnorm" (``w4a16.epilogue``);
    input_norm: x is read RMS-normalized (``gemm(input_norm=...)``).
    """

    M: int
    N: int
    K: int
    group_size: int
    zeros: str
    bias: bool
    alpha: float
    act_order: bool
    x_layout: str
    dtype: torch.dtype
    seed: int
    epilogue: Optional[str] = None
    input_norm: bool = False

    def short(self) -> str:
        return (f"M={self.M} N={self.N} K={self.K} g={self.group_size} zeros={self.zeros} "
                f"bias={self.bias} alpha={self.alpha:g} act_order={self.act_order} x={self.x_layout} "
                f"{spec.dtype_name(self.dtype)} seed={self.seed}"
                f"{' epilogue=' + self.epilogue if self.epilogue else ''}{' input_norm' if self.input_norm else ''}")


def _pick_dim(rng: random.Random, hi: int, lo: int = 1) -> int:
    """Small, odd and near-power-of-two sizes on purpose (1, tile edges +- 1), else uniform."""
    special = [v for v in (lo, 1, 2, 3, 15, 16, 17, 31, 32, 33, 63, 64, 65, 127, 128, 129) if lo <= v <= hi]
    return rng.choice(special) if special and rng.random() < 0.3 else rng.randint(lo, hi)


def cases(n: int, seed: int = 0, max_mnk: Tuple[int, int, int] = (64, 256, 1024),
          dtypes: Sequence[torch.dtype] = (torch.float16,)) -> Iterator[Case]:
    """``n`` random cases, the same for the same arguments.

    Args:
        n: number of cases.
        seed: seeds the draw of every case (and, through each case's own seed, its tensors).
        max_mnk: upper bounds of M, N and K (K is rounded down to what the group size allows;
            it must be at least 2).
        dtypes: activation dtypes to draw from (fp16 on the CPU: the interpreter's bf16 dots
            are wrong).
    """
    max_m, max_n, max_k = max_mnk
    if max_k < 2 or max_n < 1 or max_m < 0:
        raise ValueError(f"max_mnk: expected M >= 0, N >= 1, K >= 2, got {max_mnk}")
    rng = random.Random(seed)
    groups = [g for g in spec.SUPPORTED_GROUP_SIZES if g == -1 or g <= max_k]
    for _ in range(n):
        g = rng.choice(groups)
        step = 2 if g == -1 else g
        K = step * _pick_dim(rng, max_k // step)
        M = 0 if rng.random() < 0.02 else _pick_dim(rng, max_m) if max_m >= 1 else 0
        N = _pick_dim(rng, max_n)
        c = Case(M=M, N=N, K=K, group_size=g, zeros=rng.choice(ZEROS), bias=rng.random() < 0.5,
                 alpha=rng.choice(ALPHAS), act_order=rng.random() < 0.25, x_layout=rng.choice(X_LAYOUTS),
                 dtype=rng.choice(list(dtypes)), seed=rng.randrange(2 ** 31))
        epilogue = draw_epilogue(c.seed)
        if epilogue == "silu_mul":   # gate and up rows in blocks of 8: N a multiple of 16
            c = replace(c, N=-(-N // 16) * 16)
        yield replace(c, epilogue=epilogue, input_norm=draw_input_norm(c.seed))


def make_problem(case: Case, device) -> tuple:
    """(x, w, bias) of ``case`` on ``device``: x [..., K] in the case's layout, a QuantizedWeight
    with codes uniform in 0..15 and scales in [0.005, 0.015), bias [N] or None."""
    device = torch.device(device)
    gen = torch.Generator().manual_seed(case.seed)
    M, N, K, dt = case.M, case.N, case.K, case.dtype
    G = 1 if case.group_size == -1 else K // case.group_size
    codes = torch.randint(0, 16, (N, K), generator=gen, dtype=torch.uint8)
    scales = (torch.rand(N, G, generator=gen) * 0.01 + 0.005).to(dt)
    zeros = None
    if case.zeros == "int":
        zeros = torch.randint(0, 16, (N, G), generator=gen).to(dt)
    elif case.zeros == "float":
        zeros = (torch.rand(N, G, generator=gen) * 15).to(dt)
    perm = torch.randperm(K, generator=gen) if case.act_order else None
    bias = torch.randn(N, generator=gen).to(dt) if case.bias else None
    mv = lambda t: None if t is None else t.to(device)  # noqa: E731
    # x is drawn as a buffer, moved, then viewed: the view's strides are those of the case.
    if case.x_layout == "transposed":
        x = mv(torch.randn(K, M, generator=gen).to(dt)).t()
    elif case.x_layout == "strided":
        x = mv(torch.randn(M, 2 * K, generator=gen).to(dt))[:, ::2]
    elif case.x_layout == "batched" and M % 2 == 0:
        x = mv(torch.randn(2, M // 2, K, generator=gen).to(dt))
    else:
        x = mv(torch.randn(M, K, generator=gen).to(dt))
    w = QuantizedWeight.from_plain(pack_nibbles(codes).to(device), mv(scales), mv(zeros), case.group_size,
                                   mv(perm))
    return x, w, mv(bias)


def make_residual(case: Case, x: torch.Tensor) -> torch.Tensor:
    """The residual of a case with the residual epilogue: [..., N] like y, in x's dtype and device."""
    gen = torch.Generator().manual_seed(case.seed ^ 0xEE)
    return torch.randn(*x.shape[:-1], case.N, generator=gen).to(x.dtype).to(x.device)


def make_norm_weight(case: Case, x: torch.Tensor, size: Optional[int] = None) -> torch.Tensor:
    """An RMSNorm weight [size] (default N: the "residual_rmsnorm" epilogue's; K: the input norm's)
    of a case, in x's dtype and device."""
    size = case.N if size is None else size
    gen = torch.Generator().manual_seed(case.seed ^ 0xAB ^ size)
    return (torch.rand(size, generator=gen) + 0.5).to(x.dtype).to(x.device)


def run_case(case: Case, device="cpu", backend: Optional[str] = None) -> float:
    """The relative Frobenius error of ``w4a16.gemm`` against ``reference.gemm`` on ``case``
    (inf for a wrong shape or dtype, NaN when the result holds NaN).

    ``backend`` is passed to ``w4a16.gemm`` only when given (``None``: the default choice).
    An exception in ``gemm`` propagates.
    """
    import w4a16  # the public entry point, looked up at call time

    x, w, bias = make_problem(case, device)
    residual = make_residual(case, x) if case.epilogue in ("residual", "residual_rmsnorm") else None
    kwargs = {} if backend is None else {"backend": backend}
    if case.epilogue == "residual_rmsnorm":
        kwargs.update(norm_weight=make_norm_weight(case, x), norm_eps=1e-5)
    if case.input_norm:
        kwargs.update(input_norm=(make_norm_weight(case, x, x.shape[-1]), 1e-5))
    ref = reference.gemm(x, w, bias, case.alpha, epilogue=case.epilogue, residual=residual,
                         **{k: v for k, v in kwargs.items() if k != "backend"})
    y = w4a16.gemm(x, w, bias, alpha=case.alpha, epilogue=case.epilogue, residual=residual, **kwargs)
    pairs = tuple(zip(y, ref)) if case.epilogue == "residual_rmsnorm" else ((y, ref),)
    if any(a.dtype != b.dtype or tuple(a.shape) != tuple(b.shape) for a, b in pairs):
        return math.inf
    # NaN when a result holds NaN (or inf) where the reference is finite
    return max(rel_error(a, b) for a, b in pairs)


def passes(case: Case, err: float) -> bool:
    """True when ``err`` is within the dtype's tolerance (NaN never passes)."""
    return err <= TOLERANCE[case.dtype]
