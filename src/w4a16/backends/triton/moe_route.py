"""The two small kernels around the grouped GEMM of a MoE layer, so that a decode step launches
four kernels in all (align, gate_up with SiLU*up, down, combine) rather than the dozen tensor
operations of :func:`w4a16.moe.routing.align` and the final sum:

* :func:`moe_align_kernel`: the grouped order of :mod:`w4a16.moe.routing` (the same
  ``sorted_slots`` and ``block_expert``, element for element) in one program, for the few slots of
  a decode step (:data:`ALIGN_MAX_SLOTS`);
* :func:`moe_count_kernel` and :func:`moe_place_kernel`: the same order for any number of slots in
  two launches (chunks of :data:`_WIDE_CHUNK` slots: counted per expert, then placed, each chunk
  after the earlier chunks' slots of the same expert), where the torch version took about twenty
  tensor operations, each a launch and host time (prefill).
* :func:`moe_combine_kernel`: y[t] = sum over j of the per-slot rows ys[t*k + j] (fp32, in j
  order; each row the sum of its K-split planes in split order), skipping the choices whose id is
  outside [0, E), cast to y's dtype.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ...moe.routing import Routing, padded_length
from .fast_launch import CachedLaunch

ALIGN_MAX_SLOTS = 1024
_CHUNK = 64


@triton.jit
def _expert_runs(counts, BLOCK_M: tl.constexpr):
    """Each expert's run in sorted_slots from its slot count: (start, end, total of the runs)."""
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    end = tl.cumsum(padded, 0)
    return end - padded, end, tl.sum(padded, 0)


@triton.jit
def _write_blocks_and_padding(sorted_ptr, bexp_ptr, counts, start, end, total, S, E, P, NB, BLOCK_M: tl.constexpr,
                              SUB: tl.constexpr, E_POW: tl.constexpr, FILL: tl.constexpr):
    """block_expert [NB] (the expert of each block, -1 past the last used one) and the cells of
    sorted_slots [P] that hold no slot (S): each run's tail and everything past the runs."""
    ev = tl.arange(0, E_POW)
    ci = tl.arange(0, SUB)
    for b0 in range(0, NB, SUB):
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


@triton.jit
def _load_ids(ids_ptr, i, S, E):
    """The ids of slots i (a vector), -1 for a slot past S or an id outside [0, E)."""
    ids = tl.load(ids_ptr + i, mask=i < S, other=-1).to(tl.int32)
    return tl.where((i < S) & (ids >= 0) & (ids < E), ids, -1)


@triton.jit
def _count(ids_ptr, c_lo, c_hi, S, E, SUB: tl.constexpr, E_POW: tl.constexpr):
    """Slots per expert among slots c_lo..c_hi-1 (int32 [E_POW])."""
    ev = tl.arange(0, E_POW)
    counts = tl.zeros((E_POW,), tl.int32)
    for c0 in range(c_lo, c_hi, SUB):
        ids = _load_ids(ids_ptr, c0 + tl.arange(0, SUB), S, E)
        counts += tl.sum((ids[:, None] == ev[None, :]).to(tl.int32), 0)
    return counts


@triton.jit
def _place(ids_ptr, sorted_ptr, c_lo, c_hi, S, E, running, SUB: tl.constexpr, E_POW: tl.constexpr):
    """Slots c_lo..c_hi-1 into sorted_slots, in slot order: each at its expert's next cell
    (``running`` [E_POW], returned advanced past them)."""
    ev = tl.arange(0, E_POW)
    ci = tl.arange(0, SUB)
    for c0 in range(c_lo, c_hi, SUB):
        ids = _load_ids(ids_ptr, c0 + ci, S, E)
        one = (ids[:, None] == ev[None, :]).to(tl.int32)
        earlier = (ci[None, :] < ci[:, None]) & (ids[None, :] == ids[:, None])
        pos = tl.sum(one * running[None, :], 1) + tl.sum(earlier.to(tl.int32), 1)
        tl.store(sorted_ptr + pos, c0 + ci, mask=ids >= 0)
        running += tl.sum(one, 0)
    return running


@triton.jit
def moe_align_kernel(ids_ptr, sorted_ptr, bexp_ptr, S, E, P, NB,
                     BLOCK_M: tl.constexpr, CHUNK: tl.constexpr, E_POW: tl.constexpr, FILL: tl.constexpr):
    """ids [S] -> sorted_slots [P], block_expert [NB] (one program; every cell written once)."""
    counts = _count(ids_ptr, 0, S, S, E, CHUNK, E_POW)
    start, end, total = _expert_runs(counts, BLOCK_M)
    _write_blocks_and_padding(sorted_ptr, bexp_ptr, counts, start, end, total, S, E, P, NB, BLOCK_M, CHUNK, E_POW,
                              FILL)
    _place(ids_ptr, sorted_ptr, 0, S, S, E, start, CHUNK, E_POW)


@triton.jit
def moe_count_kernel(ids_ptr, counts_ptr, S, E, CHUNK: tl.constexpr, SUB: tl.constexpr, E_POW: tl.constexpr):
    """ids [S] -> counts int32 [n_chunks, E]: program c counts the slots c*CHUNK.. of each expert
    (ids outside [0, E) not counted)."""
    c = tl.program_id(0)
    counts = _count(ids_ptr, c * CHUNK, c * CHUNK + CHUNK, S, E, SUB, E_POW)
    ev = tl.arange(0, E_POW)
    tl.store(counts_ptr + c * E + ev, counts, mask=ev < E)


@triton.jit
def moe_place_kernel(ids_ptr, counts_ptr, sorted_ptr, bexp_ptr, S, E, P, NB, n_chunks, BLOCK_M: tl.constexpr,
                     CHUNK: tl.constexpr, SUB: tl.constexpr, E_POW: tl.constexpr, ROWS: tl.constexpr,
                     FILL: tl.constexpr):
    """counts [n_chunks, E] (:func:`moe_count_kernel`) -> program c writes the cells of
    sorted_slots [P] that its chunk's slots go to; program 0 also the padding cells and
    block_expert [NB]. Together every cell once, as :func:`moe_align_kernel` writes them."""
    c = tl.program_id(0)
    ev = tl.arange(0, E_POW)
    tot = tl.zeros((E_POW,), tl.int32)
    before = tl.zeros((E_POW,), tl.int32)
    for r0 in range(0, n_chunks, ROWS):
        r = r0 + tl.arange(0, ROWS)
        blk = tl.load(counts_ptr + r[:, None] * E + ev[None, :], mask=(r[:, None] < n_chunks) & (ev[None, :] < E),
                      other=0)
        tot += tl.sum(blk, 0)
        before += tl.sum(tl.where(r[:, None] < c, blk, 0), 0)
    start, end, total = _expert_runs(tot, BLOCK_M)
    _place(ids_ptr, sorted_ptr, c * CHUNK, c * CHUNK + CHUNK, S, E, start + before, SUB, E_POW)
    if c == 0:
        _write_blocks_and_padding(sorted_ptr, bexp_ptr, tot, start, end, total, S, E, P, NB, BLOCK_M, SUB, E_POW,
                                  FILL)


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
_COUNT = CachedLaunch(moe_count_kernel)
_PLACE = CachedLaunch(moe_place_kernel)
_COMBINE = CachedLaunch(moe_combine_kernel)
_WIDE_CHUNK = 512


def _pow2_at_least(n: int, least: int = 16) -> int:
    """The smallest power of two >= n and >= least (plain integers: Triton's own helpers are
    constexpr functions, several microseconds of host time per call)."""
    return max(least, 1 << (max(n, 1) - 1).bit_length())


@functools.lru_cache(maxsize=64)
def route_launches(num_experts: int, block_m: int) -> dict:
    """How the align kernels launch for ``num_experts`` experts and blocks of ``block_m`` rows:
    kernel -> (constexprs, num_warps, num_stages), for :func:`align`, :func:`align_wide` and the
    offline compile (``offline.compile_route_kernels``). Cached: callers must not change it."""
    e_pow = _pow2_at_least(num_experts)
    return {moe_align_kernel: (dict(BLOCK_M=block_m, CHUNK=_CHUNK, E_POW=e_pow, FILL=1024), 8, 3),
            moe_count_kernel: (dict(CHUNK=_WIDE_CHUNK, SUB=_CHUNK, E_POW=e_pow), 4, 2),
            moe_place_kernel: (dict(BLOCK_M=block_m, CHUNK=_WIDE_CHUNK, SUB=_CHUNK, E_POW=e_pow, ROWS=16, FILL=1024),
                               8, 2)}


def align(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> Routing:
    """:func:`w4a16.moe.routing.align` in one launch (topk_ids [T, k] contiguous, T*k at most
    :data:`ALIGN_MAX_SLOTS`)."""
    S = topk_ids.numel()
    P = padded_length(S, num_experts, block_m)
    sorted_slots = torch.empty(P, dtype=torch.int32, device=topk_ids.device)
    block_expert = torch.empty(P // block_m, dtype=torch.int32, device=topk_ids.device)
    _ALIGN((1,), (topk_ids, sorted_slots, block_expert, S, num_experts, P, P // block_m),
           *route_launches(num_experts, block_m)[moe_align_kernel])
    return Routing(sorted_slots, block_expert, block_m, S)


def align_wide(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> Routing:
    """:func:`w4a16.moe.routing.align` in two launches for any number of slots (topk_ids [T, k]
    contiguous): the per-chunk expert counts, then the placement (module docstring)."""
    S = topk_ids.numel()
    P = padded_length(S, num_experts, block_m)
    dev = topk_ids.device
    n_chunks = max(1, -(-S // _WIDE_CHUNK))
    counts = torch.empty(n_chunks, num_experts, dtype=torch.int32, device=dev)
    sorted_slots = torch.empty(P, dtype=torch.int32, device=dev)
    block_expert = torch.empty(P // block_m, dtype=torch.int32, device=dev)
    launches = route_launches(num_experts, block_m)
    _COUNT((n_chunks,), (topk_ids, counts, S, num_experts), *launches[moe_count_kernel])
    _PLACE((n_chunks,), (topk_ids, counts, sorted_slots, block_expert, S, num_experts, P, P // block_m, n_chunks),
           *launches[moe_place_kernel])
    return Routing(sorted_slots, block_expert, block_m, S)


def combine(ys: torch.Tensor, topk_ids: torch.Tensor, num_experts: int, dtype: torch.dtype) -> torch.Tensor:
    """ys fp32 [T*k, H] or [splits, T*k, H] (partial sums over K) contiguous, topk_ids [T, k]
    contiguous -> y [T, H] in ``dtype``."""
    T, k = topk_ids.shape
    planes = ys if ys.dim() == 3 else ys.unsqueeze(0)
    H = ys.shape[-1]
    y = torch.empty(T, H, dtype=dtype, device=ys.device)
    block_h = min(1024, _pow2_at_least(H, 1))
    _COMBINE((T, -(-H // block_h)), (ys, topk_ids, y, H, num_experts, k, planes.shape[0], planes.shape[1] * H),
             dict(BLOCK_H=block_h), 4, 3)
    return y
