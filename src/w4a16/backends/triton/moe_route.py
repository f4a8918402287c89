"""The two small kernels around the grouped GEMM of a MoE layer, so that a decode step launches
four kernels in all (align, gate_up with SiLU*up, down, combine) rather than the dozen tensor
operations of :func:`w4a16.moe.routing.align` and the final sum:

* :func:`moe_align_kernel`: the grouped order of :mod:`w4a16.moe.routing` (the same
  ``sorted_slots`` and ``block_expert``, element for element) in one program, for the few slots of
  a decode step (:data:`ALIGN_MAX_SLOTS`); larger calls keep the torch version.
* :func:`moe_combine_kernel`: y[t] = sum over j of the per-slot rows ys[t*k + j] (fp32, in j
  order; each row the sum of its K-split planes in split order), skipping the choices whose id is
  outside [0, E), cast to y's dtype.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...moe.routing import Routing, padded_length
from .fast_launch import CachedLaunch

ALIGN_MAX_SLOTS = 1024
_CHUNK = 64


@triton.jit
def moe_align_kernel(ids_ptr, sorted_ptr, bexp_ptr, S, E, P, NB,
                     BLOCK_M: tl.constexpr, CHUNK: tl.constexpr, E_POW: tl.constexpr, FILL: tl.constexpr):
    """ids [S] -> sorted_slots [P], block_expert [NB] (one program; every cell written once)."""
    ev = tl.arange(0, E_POW)
    ci = tl.arange(0, CHUNK)
    counts = tl.zeros((E_POW,), tl.int32)
    for c0 in range(0, S, CHUNK):
        m = c0 + ci < S
        ids = tl.load(ids_ptr + c0 + ci, mask=m, other=-1).to(tl.int32)
        ids = tl.where(m & (ids >= 0) & (ids < E), ids, -1)
        counts += tl.sum((ids[:, None] == ev[None, :]).to(tl.int32), 0)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    end = tl.cumsum(padded, 0)
    start = end - padded
    total = tl.sum(padded, 0)
    for b0 in range(0, NB, CHUNK):
        b = b0 + ci
        bs = b * BLOCK_M
        e_b = tl.sum((end[None, :] <= bs[:, None]).to(tl.int32), 1)
        tl.store(bexp_ptr + b, tl.where(bs < total, e_b, -1), mask=b < NB)
    for j in range(0, BLOCK_M - 1):          # each expert's run padded to whole blocks
        pos = start + counts + j
        tl.store(sorted_ptr + pos, tl.full((E_POW,), 0, tl.int32) + S, mask=(ev < E) & (pos < end))
    for p0 in range(total, P, FILL):         # blocks past the last used one
        p = p0 + tl.arange(0, FILL)
        tl.store(sorted_ptr + p, tl.full((FILL,), 0, tl.int32) + S, mask=p < P)
    running = start
    for c0 in range(0, S, CHUNK):
        m = c0 + ci < S
        ids = tl.load(ids_ptr + c0 + ci, mask=m, other=-1).to(tl.int32)
        ok = m & (ids >= 0) & (ids < E)
        ids = tl.where(ok, ids, -1)
        one = (ids[:, None] == ev[None, :]).to(tl.int32)
        before = (ci[None, :] < ci[:, None]) & (ids[None, :] == ids[:, None])
        pos = tl.sum(one * running[None, :], 1) + tl.sum(before.to(tl.int32), 1)
        tl.store(sorted_ptr + pos, c0 + ci, mask=ok)
        running += tl.sum(one, 0)


@triton.jit
def moe_combine_kernel(ys_ptr, ids_ptr, y_ptr, H, E, top_k, splits, plane, BLOCK_H: tl.constexpr):
    """ys fp32 [splits, T*k, H] (``plane`` = T*k*H elements apart), ids [T*k] -> y [T, H]
    (program (t, h block))."""
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    hm = h < H
    acc = tl.zeros((BLOCK_H,), tl.float32)
    for j in range(0, top_k):
        s = t * top_k + j
        e = tl.load(ids_ptr + s)
        if (e >= 0) & (e < E):
            row = tl.load(ys_ptr + s * H + h, mask=hm, other=0.0)
            for p in range(1, splits):
                row += tl.load(ys_ptr + p * plane + s * H + h, mask=hm, other=0.0)
            acc += row
    tl.store(y_ptr + t * H + h, acc.to(y_ptr.dtype.element_ty), mask=hm)


_ALIGN = CachedLaunch(moe_align_kernel)
_COMBINE = CachedLaunch(moe_combine_kernel)


def align(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> Routing:
    """:func:`w4a16.moe.routing.align` in one launch (topk_ids [T, k] contiguous, T*k at most
    :data:`ALIGN_MAX_SLOTS`)."""
    S = topk_ids.numel()
    P = padded_length(S, num_experts, block_m)
    sorted_slots = torch.empty(P, dtype=torch.int32, device=topk_ids.device)
    block_expert = torch.empty(P // block_m, dtype=torch.int32, device=topk_ids.device)
    _ALIGN((1,), (topk_ids, sorted_slots, block_expert, S, num_experts, P, P // block_m),
           dict(BLOCK_M=block_m, CHUNK=_CHUNK, E_POW=max(16, triton.next_power_of_2(num_experts)), FILL=1024), 8, 3)
    return Routing(sorted_slots, block_expert, block_m, S)


def combine(ys: torch.Tensor, topk_ids: torch.Tensor, num_experts: int, dtype: torch.dtype) -> torch.Tensor:
    """ys fp32 [T*k, H] or [splits, T*k, H] (partial sums over K) contiguous, topk_ids [T, k]
    contiguous -> y [T, H] in ``dtype``."""
    T, k = topk_ids.shape
    planes = ys if ys.dim() == 3 else ys.unsqueeze(0)
    H = ys.shape[-1]
    y = torch.empty(T, H, dtype=dtype, device=ys.device)
    block_h = min(1024, triton.next_power_of_2(H))
    _COMBINE((T, triton.cdiv(H, block_h)), (ys, topk_ids, y, H, num_experts, k, planes.shape[0], planes.shape[1] * H),
             dict(BLOCK_H=block_h), 4, 3)
    return y
