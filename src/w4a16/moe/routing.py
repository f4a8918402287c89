"""Tokens grouped by expert, on the device and without a host sync (CUDA graphs and torch.compile
capture it), in a deterministic order.

The router picks, for each of T tokens, k experts (``topk_ids`` [T, k]); slot t*k + j is token t's
j-th choice. The grouped GEMM wants each expert's slots contiguous and padded to whole blocks of
``block_m`` rows, so that a program of the kernel reads one expert's weights for one block:

    sorted_slots  int32 [P]      slot ids, expert by expert (slots of an expert in slot order),
                                 each expert's run padded to a multiple of block_m with T*k (none)
    block_expert  int32 [P / block_m]  the expert of each block, -1 past the last used block

P = T*k + min(E, T*k)*(block_m - 1) rounded up to block_m: the most padding any routing can need
(at most min(E, T*k) experts get slots, each padded by fewer than block_m), known without reading
``topk_ids`` on the host. At decode (T*k small against E) that keeps the grid to the blocks that
can hold slots.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from ..errors import expect


class Routing(NamedTuple):
    """The grouped order of a call's slots (see the module docstring); ``slots`` = T*k.

    ``direct``: no grouping at all, for one token (T = 1: its k choices are k experts, so grouping
    would give each block one slot anyway): block b is slot b alone, ``block_expert`` is topk_ids
    flattened (any integer dtype; ids outside [0, E) skipped by the kernel) and ``sorted_slots``
    is unused. Nothing is launched to build it."""

    sorted_slots: torch.Tensor
    block_expert: torch.Tensor
    block_m: int
    slots: int
    direct: bool = False


def direct(topk_ids: torch.Tensor, block_m: int = 16) -> Routing:
    """The :class:`Routing` of one slot per block (see ``direct`` there) for topk_ids [T, k]."""
    flat = topk_ids.reshape(-1)
    return Routing(flat, flat, block_m, flat.numel(), True)


def check_topk(topk_ids: torch.Tensor, topk_weights: torch.Tensor, T: int, num_experts: int) -> None:
    """Shapes and dtypes of the router's outputs for T tokens (values are not read: that would
    sync; an id outside [0, E) gets no block, so its slot contributes nothing)."""
    expect(isinstance(topk_ids, torch.Tensor), "topk_ids", "a torch.Tensor", type(topk_ids).__name__)
    expect(isinstance(topk_weights, torch.Tensor), "topk_weights", "a torch.Tensor", type(topk_weights).__name__)
    expect(topk_ids.dim() == 2 and topk_ids.shape[0] == T and topk_ids.shape[1] >= 1, "topk_ids.shape",
           f"[{T}, k] with k >= 1", tuple(topk_ids.shape))
    expect(not topk_ids.dtype.is_floating_point and topk_ids.dtype != torch.bool, "topk_ids.dtype",
           "an integer dtype", topk_ids.dtype)
    expect(tuple(topk_weights.shape) == tuple(topk_ids.shape), "topk_weights.shape", tuple(topk_ids.shape),
           tuple(topk_weights.shape))
    expect(topk_weights.dtype.is_floating_point, "topk_weights.dtype", "a floating-point dtype", topk_weights.dtype)
    expect(topk_ids.shape[1] <= num_experts, "topk_ids.shape[1] (k)", f"at most the {num_experts} experts",
           topk_ids.shape[1])


def padded_length(slots: int, num_experts: int, block_m: int) -> int:
    """P: the length of ``sorted_slots`` for ``slots`` slots over ``num_experts`` experts."""
    most = slots + min(num_experts, slots) * (block_m - 1)
    return max(block_m, -(-most // block_m) * block_m)


def align(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> Routing:
    """Group the slots of ``topk_ids`` [T, k] by expert in blocks of ``block_m`` (see the module
    docstring). Pure tensor operations on topk_ids' device: no host sync, same result every run
    (a stable sort). Ids outside [0, num_experts) get no block."""
    expect(block_m >= 1 and block_m & (block_m - 1) == 0, "block_m", "a power of two", block_m)
    dev = topk_ids.device
    flat = topk_ids.reshape(-1).to(torch.int64)
    n = flat.numel()
    valid = (flat >= 0) & (flat < num_experts)
    key = torch.where(valid, flat, torch.full_like(flat, num_experts))   # invalid ids sort last
    order = torch.argsort(key, stable=True)
    counts = torch.zeros(num_experts + 1, dtype=torch.int64, device=dev).scatter_add_(0, key, torch.ones_like(key))
    counts = counts[:num_experts]
    padded = (counts + block_m - 1) // block_m * block_m
    end_padded = torch.cumsum(padded, 0)
    start_padded, start = end_padded - padded, torch.cumsum(counts, 0) - counts
    P = padded_length(n, num_experts, block_m)
    sorted_slots = torch.full((P + 1,), n, dtype=torch.int32, device=dev)   # one spare cell takes invalid ids
    e_sorted = key[order]
    ok = e_sorted < num_experts
    e_safe = torch.where(ok, e_sorted, torch.zeros_like(e_sorted))
    pos = start_padded[e_safe] + torch.arange(n, device=dev) - start[e_safe]
    pos = torch.where(ok, pos, torch.full_like(pos, P))
    sorted_slots.scatter_(0, pos, order.to(torch.int32))
    block_start = torch.arange(0, P, block_m, device=dev)
    e_block = torch.searchsorted(end_padded, block_start, right=True)
    block_expert = torch.where(block_start < end_padded[-1], e_block, torch.full_like(e_block, -1)).to(torch.int32)
    return Routing(sorted_slots[:P], block_expert, block_m, n)
