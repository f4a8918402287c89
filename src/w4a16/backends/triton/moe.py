"""The grouped W4A16 GEMM over experts (portable Triton; runs in the CPU interpreter too).

One program computes rows [b * BM, (b + 1) * BM) of the grouped order (:mod:`w4a16.moe.routing`:
one expert's slots per block) times BN output columns of that expert's weight, read in the plain
layout (uint8 [E, N, K/2], even k in the low nibble: a [BN, BK/2] byte tile, its two nibbles
joined into the [BN, BK] code tile) and dequantized in registers in the activation dtype
((q - z) by :mod:`.dequant`, times the row's scale; one scale and zero per row per K step: the
step divides the group):

    out[slot, n] = sum_k x[row(slot), k] * W[e, n, k]     (times topk_weights[slot] with MUL_WEIGHT)

row(slot) is slot // top_k when GATHER (the first GEMM reads each token once per choice) and the
slot itself otherwise (the second GEMM reads the first one's per-slot rows). For one token the
routing is ``direct`` (no align launch: block b is slot b, its expert read from topk_ids). With SILU_MUL the
weight is a gate_up [E, 2I, K] and the program computes columns n of the gate and of the up
half together and writes SiLU(gate) * up [slot, n] for n < I (each half rounded to the
activation dtype first, as the unfused layer stores h). Padding rows and blocks past the last
used one (expert -1) write nothing. Each output element is written by one program: the result
does not depend on the schedule.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from ...errors import expect
from .dequant import codes_magic, codes_portable
from .env import interpreting
from .fast_launch import CachedLaunch


@triton.jit
def _dequant_tile(q_ptrs, kh, half_k, s, z, nmask, HAS_ZEROS: tl.constexpr, USE_ASM: tl.constexpr,
                  DTYPE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """The [BN, BK] weight tile (q - z) * s in DTYPE from the byte tile at q_ptrs + kh."""
    byte = tl.load(q_ptrs + kh[None, :], mask=nmask[:, None] & (kh < half_k)[None, :], other=0)
    if USE_ASM:
        lo, hi = codes_magic(byte, z, z, HAS_ZEROS, DTYPE)
    else:
        lo, hi = codes_portable(byte, z, z, HAS_ZEROS, DTYPE)
    return tl.reshape(tl.join(lo, hi), (BLOCK_N, BLOCK_K)) * s[:, None]


@triton.jit
def w4a16_moe_gemm(x_ptr, q_ptr, s_ptr, z_ptr, tw_ptr, out_ptr, slots_ptr, bexp_ptr,
                    N, K, G, num_slots, top_k, num_experts, stride_xm, stride_om,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ONE_GROUP: tl.constexpr,
                    GATHER: tl.constexpr, MUL_WEIGHT: tl.constexpr, HAS_ZEROS: tl.constexpr,
                    SILU_MUL: tl.constexpr, DIRECT: tl.constexpr, USE_ASM: tl.constexpr, DTYPE: tl.constexpr):
    """BLOCK_K divides the group size G unless ONE_GROUP (per-channel: one scale per row). N is
    the output width (I with SILU_MUL: the weight then has 2N rows). DIRECT: block b is slot b
    alone and bexp_ptr holds the slots' expert ids (``Routing.direct``)."""
    pid_b = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(bexp_ptr + pid_b).to(tl.int32)
    if (e >= 0) & (e < num_experts):
        rows_w = 2 * N if SILU_MUL else N
        e64 = e.to(tl.int64)
        if DIRECT:
            slots = tl.where(tl.arange(0, BLOCK_M) == 0, pid_b, num_slots)
        else:
            slots = tl.load(slots_ptr + pid_b * BLOCK_M + tl.arange(0, BLOCK_M))
        valid = slots < num_slots
        if GATHER:
            rows = slots // top_k
        else:
            rows = slots
        rows = tl.where(valid, rows, 0).to(tl.int64)
        n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = n < N
        num_groups = K // G
        half_k = K // 2
        n64 = n.to(tl.int64)
        u64 = n64 + N                          # the up rows start N rows further (SILU_MUL)
        q_gate = q_ptr + e64 * rows_w * half_k + n64[:, None] * half_k
        q_up = q_ptr + e64 * rows_w * half_k + u64[:, None] * half_k
        s_gate = s_ptr + e64 * rows_w * num_groups + n64 * num_groups
        s_up = s_ptr + e64 * rows_w * num_groups + u64 * num_groups
        z_gate = z_ptr + e64 * rows_w * num_groups + n64 * num_groups
        z_up = z_ptr + e64 * rows_w * num_groups + u64 * num_groups
        s_g = tl.load(s_gate, mask=nmask, other=0.0)
        z_g = tl.full((BLOCK_N,), 8.0, DTYPE)
        if HAS_ZEROS:
            z_g = tl.load(z_gate, mask=nmask, other=0.0)
        if SILU_MUL:
            s_u = tl.load(s_up, mask=nmask, other=0.0)
            z_u = z_g
            if HAS_ZEROS:
                z_u = tl.load(z_up, mask=nmask, other=0.0)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            a = tl.load(x_ptr + rows[:, None] * stride_xm + k[None, :], mask=valid[:, None] & (k < K)[None, :],
                        other=0.0)
            kh = k0 // 2 + tl.arange(0, BLOCK_K // 2)
            if not ONE_GROUP:
                g = k0 // G
                s_g = tl.load(s_gate + g, mask=nmask, other=0.0)
                if HAS_ZEROS:
                    z_g = tl.load(z_gate + g, mask=nmask, other=0.0)
                if SILU_MUL:
                    s_u = tl.load(s_up + g, mask=nmask, other=0.0)
                    if HAS_ZEROS:
                        z_u = tl.load(z_up + g, mask=nmask, other=0.0)
            w = _dequant_tile(q_gate, kh, half_k, s_g, z_g, nmask, HAS_ZEROS, USE_ASM, DTYPE, BLOCK_N, BLOCK_K)
            acc += tl.dot(a, tl.trans(w))
            if SILU_MUL:
                w_u = _dequant_tile(q_up, kh, half_k, s_u, z_u, nmask, HAS_ZEROS, USE_ASM, DTYPE,
                                    BLOCK_N, BLOCK_K)
                acc_u += tl.dot(a, tl.trans(w_u))
        if SILU_MUL:
            gate = acc.to(DTYPE).to(tl.float32)
            acc = gate / (1.0 + tl.exp(-gate)) * acc_u.to(DTYPE).to(tl.float32)
        if MUL_WEIGHT:
            acc = acc * tl.load(tw_ptr + slots, mask=valid, other=0.0).to(tl.float32)[:, None]
        out = out_ptr + slots[:, None].to(tl.int64) * stride_om + n[None, :]
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=valid[:, None] & nmask[None, :])


class MoeTile(NamedTuple):
    """A launch shape of :func:`w4a16_moe_gemm` (BLOCK_M comes from the routing)."""

    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    LABEL = "moe"          # the kernel's name in ``w4a16 sass`` labels

    def short(self) -> str:
        return f"n{self.block_n} k{self.block_k} w{self.num_warps} s{self.num_stages}"


@dataclass(frozen=True)
class MoeKernel:
    """A compile-time variant of a grouped MoE kernel as ``w4a16 sass`` names it: the tile (a
    :class:`MoeTile` for :func:`w4a16_moe_gemm`, a ``moe_packed.PackedTile`` for the packed kernel),
    the routing's block size, the gate_up epilogue (SiLU*up) or not, the one-token routing or not."""

    tile: NamedTuple
    block_m: int
    silu_mul: bool
    direct: bool = False

    def short(self) -> str:
        return (f"{self.tile.LABEL}-{'gate_up' if self.silu_mul else 'down'} m{self.block_m} {self.tile.short()}"
                f"{' direct' if self.direct else ''}")


def tile_for(block_m: int, silu_mul: bool, G: int, one_group: bool) -> MoeTile:
    """The tile for a call, from a sweep of 16 tiles per block size over the ``w4a16 bench --moe``
    presets at T = 1, 16, 256 and 4096 on an H100 (benchmarks/moe_tiles.py; BENCHMARKS.md): each
    pick below was within 2% of the best tile on geometric mean, 10% at worst. Decode-sized blocks
    (block_m 16) stream 128 codes per row per step; gate_up tiles (two weight tiles per step)
    are half as wide as down's. BK never crosses a group."""
    bk = 128 if one_group else min(128, G)
    if block_m <= 16:
        return MoeTile(32 if silu_mul else 64, bk, 4, 3)
    return MoeTile(64 if silu_mul else 128, min(bk, 64), 4, 3)


_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}
_LAUNCH = CachedLaunch(w4a16_moe_gemm)


def grouped_gemm(x: torch.Tensor, experts, routing, top_k: int, gather: bool, out: torch.Tensor,
                 topk_weights: Optional[torch.Tensor] = None, silu_mul: bool = False,
                 tile: Optional[MoeTile] = None) -> torch.Tensor:
    """Launch :func:`w4a16_moe_gemm`: x [T, K] (gather) or [T*k, K] contiguous, experts a
    QuantizedExperts [E, N, K], routing a :class:`w4a16.moe.routing.Routing`, out [T*k, N]
    (written for every routed slot; [T*k, N/2] with ``silu_mul``), topk_weights float [T*k]
    contiguous or None; tile: None for :func:`tile_for`'s. Returns out."""
    E, N, K = experts.shape
    n_out = N // 2 if silu_mul else N
    G = experts.group_size_effective
    one_group = G == K
    blocks = routing.block_expert.numel()
    if tile is not None:
        expect(one_group or G % tile.block_k == 0, "tile.block_k", f"a divisor of the group size {G}", tile.block_k)
    else:
        tile = tile_for(routing.block_m, silu_mul, G, one_group)
    grid = (blocks, -(-n_out // tile.block_n))
    zeros = experts.zeros if experts.zeros is not None else experts.scales
    tw = topk_weights if topk_weights is not None else out   # unread without MUL_WEIGHT
    args = (x, experts.qweight, experts.scales, zeros, tw, out, routing.sorted_slots, routing.block_expert, n_out,
            K, G, routing.slots, top_k, E, x.stride(0), out.stride(0))
    cx = dict(BLOCK_M=routing.block_m, BLOCK_N=tile.block_n, BLOCK_K=tile.block_k, ONE_GROUP=one_group, GATHER=gather,
              MUL_WEIGHT=topk_weights is not None, HAS_ZEROS=experts.zeros is not None, SILU_MUL=silu_mul,
              DIRECT=routing.direct, USE_ASM=not interpreting(), DTYPE=_DTYPES[x.dtype])
    _LAUNCH(grid, args, cx, tile.num_warps, tile.num_stages)
    return out
