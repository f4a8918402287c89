"""The grouped W4A16 GEMM over experts, reading the experts in the dense kernels' layout 2.

The experts [E, Nw, K] of one projection are one weight [E * Nw, K] in layout version 2
(:mod:`.layout`: 16-row fragment blocks, transposed scales [G_pad, E * Nw]); with Nw a multiple
of 32 every expert starts on a block boundary, and so does the up half (rows Nw/2 ..) of a
gate_up weight. One program computes rows [b * BM, (b + 1) * BM) of the grouped order
(:mod:`w4a16.moe.routing`: one expert's slots per block) times BN output columns of that expert,
with the dense kernel's K loop (:mod:`.tiles`: each thread loads its own fragment bytes 16 at a
time, a register-only reshape, the magic-number dequant, one scale per row per half chunk):

    out[slot, n] = sum_k x[row(slot), k] * W[e, n, k]     (times topk_weights[slot] with MUL_WEIGHT)

row(slot) is slot // top_k when GATHER (the first GEMM reads each token once per choice) and the
slot itself otherwise. SWAP_AB computes the tile transposed (the dequantized weight is the first
MMA operand, from registers). With SILU_MUL the program also computes the same columns of the up
half and writes SiLU(gate) * up for n < Nw/2 (each half rounded to the activation dtype first, as
the unfused layer stores h). Padding rows, and blocks past the last used one (expert -1), write
nothing; each output element is written by one program, so the result does not depend on the
schedule.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from ...errors import expect
from ..device import sms_of
from .dequant import codes_magic, codes_portable
from .env import interpreting
from .fast_launch import CachedLaunch
from .launch import group_log2
from .layout import PreparedWeight
from .tiles import group_params, load_x, scaled_mma, unswizzle


@triton.jit
def _chunk(acc, q_ptrs, c, x_ptrs, s_ptr, z_ptr, rows_all, wrow, offs_h, valid, K, KC: tl.constexpr,
           GROUP_LOG2: tl.constexpr, ONE_SCALE: tl.constexpr, EVEN_K: tl.constexpr, BN: tl.constexpr,
           SWAP_AB: tl.constexpr, SCALE_AFTER: tl.constexpr, HAS_ZEROS: tl.constexpr, USE_ASM: tl.constexpr,
           DTYPE: tl.constexpr):
    """acc + chunk c of one weight tile (codes at q_ptrs, rows ``wrow`` of the [G_pad, rows_all]
    scales) times its x tiles."""
    H: tl.constexpr = KC // 2
    k0 = c * KC
    t = unswizzle(tl.load(q_ptrs + c * (16 * H)), BN, H // 32)
    s_lo, s_hi, z_lo, z_hi = group_params(s_ptr, z_ptr, k0, K, rows_all, wrow, GROUP_LOG2, H, ONE_SCALE,
                                          HAS_ZEROS, DTYPE)
    if USE_ASM:
        w_lo, w_hi = codes_magic(t, z_lo, z_hi, HAS_ZEROS, DTYPE)
    else:
        w_lo, w_hi = codes_portable(t, z_lo, z_hi, HAS_ZEROS, DTYPE)
    x_lo = load_x(x_ptrs, k0, offs_h, valid, True, K, EVEN_K, SWAP_AB, False, None, None)
    x_hi = load_x(x_ptrs, k0 + H, offs_h, valid, True, K, EVEN_K, SWAP_AB, False, None, None)
    return scaled_mma(acc, w_lo, w_hi, x_lo, x_hi, s_lo, s_hi, SCALE_AFTER, ONE_SCALE, SWAP_AB)


@triton.jit
def w4a16_moe_packed(x_ptr, qk_ptr, s_ptr, z_ptr, tw_ptr, out_ptr, slots_ptr, bexp_ptr,
                     N, K, rows_w, chunks, chunks_per_split, num_slots, top_k, num_experts, stride_xm, stride_om,
                     stride_os,
                     GROUP_LOG2: tl.constexpr, KC: tl.constexpr, ONE_SCALE: tl.constexpr, EVEN_K: tl.constexpr,
                     BM: tl.constexpr, BN: tl.constexpr, SWAP_AB: tl.constexpr, SCALE_AFTER: tl.constexpr,
                     GATHER: tl.constexpr, MUL_WEIGHT: tl.constexpr, HAS_ZEROS: tl.constexpr,
                     SILU_MUL: tl.constexpr, DIRECT: tl.constexpr, USE_ASM: tl.constexpr, DTYPE: tl.constexpr):
    """x [T, K] (GATHER) or [T*k, K] DTYPE; qk uint8 [E * rows_w / 16, chunks * KC * 8] (layout 2);
    s, z [G_pad, E * rows_w] DTYPE; out [T*k, N]; N the output width (rows_w / 2 with SILU_MUL,
    else rows_w), a multiple of 16. DIRECT: block b is slot b alone and bexp_ptr holds the slots'
    expert ids (``Routing.direct``). Split K (grid axis 2, not with SILU_MUL): program s covers
    chunks [s * chunks_per_split, (s + 1) * chunks_per_split) and writes its partial rows to
    out + s * stride_os (the combine kernel sums the planes in order)."""
    H: tl.constexpr = KC // 2
    pid_b = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    e = tl.load(bexp_ptr + pid_b).to(tl.int32)
    if (e >= 0) & (e < num_experts):
        offs_m = tl.arange(0, BM)
        if DIRECT:
            slots = tl.where(offs_m == 0, pid_b, num_slots)
        else:
            slots = tl.load(slots_ptr + pid_b * BM + offs_m)
        valid = slots < num_slots
        if GATHER:
            rows = slots // top_k
        else:
            rows = slots
        rows = tl.where(valid, rows, 0).to(tl.int64)
        offs_n = pid_n * BN + tl.arange(0, BN)
        n_ok = offs_n < N
        rows_all = num_experts * rows_w
        wrow = e * rows_w + tl.minimum(offs_n, N - 1)     # rows past N read row N-1, never stored
        # fragment blocks of the tile (as in the dense kernel), clamped to the expert's last block
        r = tl.arange(0, (H // 32) * (BN // 16))
        first = e * (rows_w // 16)
        blk = first + tl.minimum(pid_n * (BN // 16) + r % (BN // 16), N // 16 - 1)
        seg = ((r // (BN // 16)) * 512)[:, None] + tl.arange(0, 512)[None, :]
        q_ptrs = qk_ptr + (blk.to(tl.int64) * (chunks * 16 * H))[:, None] + seg
        offs_h = tl.arange(0, H)
        if SWAP_AB:
            x_ptrs = x_ptr + rows[None, :] * stride_xm + offs_h[:, None]      # x^T tile [H, BM]
            acc = tl.zeros((BN, BM), dtype=tl.float32)
        else:
            x_ptrs = x_ptr + rows[:, None] * stride_xm + offs_h[None, :]      # x tile [BM, H]
            acc = tl.zeros((BM, BN), dtype=tl.float32)
        acc_u = acc
        up = N // 16 * (chunks * 16 * H)                  # the up half's codes: N rows further
        c_end = tl.minimum(chunks, (pid_k + 1) * chunks_per_split)
        for c in range(pid_k * chunks_per_split, c_end):
            acc = _chunk(acc, q_ptrs, c, x_ptrs, s_ptr, z_ptr, rows_all, wrow, offs_h, valid, K, KC, GROUP_LOG2,
                         ONE_SCALE, EVEN_K, BN, SWAP_AB, SCALE_AFTER, HAS_ZEROS, USE_ASM, DTYPE)
            if SILU_MUL:
                acc_u = _chunk(acc_u, q_ptrs + up, c, x_ptrs, s_ptr, z_ptr, rows_all, wrow + N, offs_h, valid, K,
                               KC, GROUP_LOG2, ONE_SCALE, EVEN_K, BN, SWAP_AB, SCALE_AFTER, HAS_ZEROS, USE_ASM,
                               DTYPE)
        if SILU_MUL:
            gate = acc.to(DTYPE).to(tl.float32)
            acc = gate / (1.0 + tl.exp(-gate)) * acc_u.to(DTYPE).to(tl.float32)
        if SWAP_AB:
            if MUL_WEIGHT:
                acc = acc * tl.load(tw_ptr + slots, mask=valid, other=0.0).to(tl.float32)[None, :]
            out = out_ptr + pid_k.to(tl.int64) * stride_os
            out += slots[None, :].to(tl.int64) * stride_om + offs_n[:, None]
            mask = n_ok[:, None] & valid[None, :]
        else:
            if MUL_WEIGHT:
                acc = acc * tl.load(tw_ptr + slots, mask=valid, other=0.0).to(tl.float32)[:, None]
            out = out_ptr + pid_k.to(tl.int64) * stride_os
            out += slots[:, None].to(tl.int64) * stride_om + offs_n[None, :]
            mask = valid[:, None] & n_ok[None, :]
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask)


class PackedTile(NamedTuple):
    """A launch shape of :func:`w4a16_moe_packed` (BLOCK_M comes from the routing)."""

    block_n: int
    swap_ab: bool
    scale_after: bool
    num_warps: int
    num_stages: int
    LABEL = "moe-packed"   # the kernel's name in ``w4a16 sass`` labels (``moe.MoeKernel``)

    def short(self) -> str:
        return (f"n{self.block_n}{'' if self.swap_ab else ' noswap'}{' sa' if self.scale_after else ''} "
                f"w{self.num_warps} s{self.num_stages}")


def packable(rows_w: int, silu_mul: bool) -> bool:
    """Whether a projection with ``rows_w`` weight rows per expert runs on this kernel: every
    expert (and, for a gate_up weight, its up half) must start on a 16-row block."""
    return rows_w % (32 if silu_mul else 16) == 0


def packed_tile_for(block_m: int, n_out: int, silu_mul: bool, blocks: Optional[int] = None,
                    num_sms: int = 132) -> PackedTile:
    """The tile for a call (``n_out``: output columns; ``blocks``: how many blocks can hold slots,
    None for many), from sweeps of the decode tiles per projection on the ``w4a16 bench --moe``
    presets at T = 1 and 16 on an H100 (bf16; BENCHMARKS.md, 2026-12-07). Decode-sized blocks
    (block_m 16): one warp per 16 columns, the weight as the first MMA operand and the scales
    applied after it, a 3-stage pipeline (the best tile at 7 of 8 points of T = 16, 8-22% ahead of
    the same tiles without it; 2 to 6 stages measured), 64 columns. A gate_up projection whose grid
    would hold fewer than three programs per SM (one token: ``blocks`` is k) halves the columns
    down to 16 (one token's gate_up 1.16-1.30x faster on the Qwen3 and DeepSeek-V3 shapes), except
    on a Triton that compiles narrow pipelined tiles badly (``triton_compat.NARROW_TILES_COSTLY``).
    A small down projection fills the GPU by splitting K (:func:`split_for`); outputs narrower
    than 64 take the narrowest tile that covers them, without a pipeline. Larger blocks: gate_up
    64 columns swapped (two weight tiles per step), the scales applied before the MMA, a 3-stage
    pipeline; down 128 columns and 8 warps, swapped with the scales after the MMA (at block_m 128
    it spills loop-invariant values, nearly all outside its main loop, ``sass.allowances``, and
    ran 1.27-1.39x faster than the unswapped tile on Mixtral-8x7B's down at T = 4096 and 16384,
    H100, bf16): the swapped down tile with the scales before the MMA rewrites registers an
    issued wgmma reads (:func:`tile_refusal`)."""
    from ..triton_compat import NARROW_TILES_COSTLY

    if block_m <= 16:
        narrow = max(16, 1 << (max(n_out, 1) - 1).bit_length())
        if narrow < 64:
            return PackedTile(narrow, True, True, narrow // 16, 1)
        bn = 64
        if silu_mul and blocks is not None and not NARROW_TILES_COSTLY:
            while bn > 16 and blocks * -(-n_out // bn) < 3 * num_sms:
                bn //= 2
        return PackedTile(bn, True, True, bn // 16, 3)
    if silu_mul:     # 8 warps would split 64 weight rows over two warpgroups: each dequantizes them all
        return PackedTile(64, True, False, 4, 3)
    return PackedTile(128, True, True, 8, 3)


def tile_refusal(tile: PackedTile, block_m: int, silu_mul: bool) -> Optional[str]:
    """Why the kernel refuses ``tile`` at ``block_m`` rows per block (None: it runs). Launch shapes
    that computed wrong results on an H100 with Triton 3.6.0 while the CPU interpreter computed
    them right (``benchmarks/moe_tiles.py --check-only``): scales before the MMA with a pipeline at
    decode block sizes (the down projection, bf16, relative error 0.07), and the down projection
    (routing weights, fp32 rows) swapped with the scales before the MMA and a pipeline (fp16 at
    block_m 64 with 4 warps: NaN, or relative errors of 4.5e-3 to 220 from one run to the next).
    The SASS of both says why (``w4a16 sass``, ``sass.disasm.register_operand_hazards``; the
    second with 8 warps too, and on Triton 3.7 and 3.8): the next iteration rewrites the weight
    registers the previous iteration's last wgmma reads before waiting for it, which the PTX ISA
    leaves undefined."""
    if block_m <= 16 and tile.num_stages > 1 and not tile.scale_after:
        return "scale_after with a pipeline at decode block sizes"
    if not silu_mul and tile.swap_ab and not tile.scale_after and tile.num_stages > 1:
        return "scale_after or an unswapped tile for a pipelined down projection"
    return None


_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}
_LAUNCH = CachedLaunch(w4a16_moe_packed)


def split_for(programs: int, chunks: int, num_sms: int) -> int:
    """K splits for a down projection whose grid has ``programs`` programs and ``chunks`` layout
    chunks along K: enough to give about four programs per SM (the dense decode heuristic's grids
    hold 4-7), at least 8 chunks each, at most 8."""
    want = -(-4 * num_sms // max(1, programs))
    return max(1, min(want, chunks // 8, 8))


def launch_plan(routing, n_out: int, chunks: int, num_experts: int, device: torch.device, silu_mul: bool,
                tile: Optional[PackedTile] = None, may_split: bool = False):
    """(tile, K splits) for a call: ``tile`` or :func:`packed_tile_for`'s, and splits from
    :func:`split_for` where ``may_split`` (the caller sums the partial planes), else 1."""
    blocks = routing.block_expert.numel()
    used = blocks if routing.direct else min(blocks, num_experts)   # blocks that can hold slots
    sms = sms_of(device)
    if tile is None:
        tile = packed_tile_for(routing.block_m, n_out, silu_mul, used, sms)
    if not (may_split and not silu_mul and routing.block_m <= 16):
        return tile, 1
    return tile, split_for(used * -(-n_out // tile.block_n), chunks, sms)


def grouped_gemm(x: torch.Tensor, pw: PreparedWeight, num_experts: int, routing, top_k: int, gather: bool,
                 out: torch.Tensor, topk_weights: Optional[torch.Tensor] = None, silu_mul: bool = False,
                 tile: Optional[PackedTile] = None, splits: int = 1) -> torch.Tensor:
    """Launch :func:`w4a16_moe_packed`: x [T, K] (gather) or [T*k, K] contiguous, pw the experts
    [E * Nw, K] in layout 2 (``packable(Nw, silu_mul)``), routing a
    :class:`w4a16.moe.routing.Routing`, out [T*k, Nw] (written for every routed slot; [T*k, Nw/2]
    with ``silu_mul``; [splits, T*k, Nw] partial sums over K with ``splits`` > 1, not with
    ``silu_mul``), topk_weights float [T*k] contiguous or None; tile: None for
    :func:`packed_tile_for`'s. Returns out."""
    rows_w = pw.N // num_experts
    expect(packable(rows_w, silu_mul), "experts rows", f"a multiple of {32 if silu_mul else 16}", rows_w)
    expect(splits == 1 or not silu_mul, "splits", "1 with silu_mul (SiLU needs whole sums)", splits)
    refused = None if tile is None else tile_refusal(tile, routing.block_m, silu_mul)
    expect(refused is None, "tile", refused, tile)
    n_out = rows_w // 2 if silu_mul else rows_w
    chunks = pw.K_pad // pw.kc
    if tile is None:
        tile, _ = launch_plan(routing, n_out, chunks, num_experts, x.device, silu_mul)
    per = -(-chunks // splits)
    zeros = pw.zeros_t if pw.zeros_t is not None else pw.scales_t
    tw = topk_weights if topk_weights is not None else out   # unread without MUL_WEIGHT
    rows = out.shape[-2]
    grid = (routing.block_expert.numel(), -(-n_out // tile.block_n), -(-chunks // per))
    args = (x, pw.qk, pw.scales_t, zeros, tw, out, routing.sorted_slots, routing.block_expert, n_out, pw.K, rows_w,
            chunks, per, routing.slots, top_k, num_experts, x.stride(0), out.stride(-2), rows * out.stride(-2))
    cx = dict(GROUP_LOG2=group_log2(pw), KC=pw.kc, ONE_SCALE=pw.group == pw.K or pw.group % pw.kc == 0,
              EVEN_K=pw.K % pw.kc == 0, BM=routing.block_m, BN=tile.block_n, SWAP_AB=tile.swap_ab,
              SCALE_AFTER=tile.scale_after, GATHER=gather, MUL_WEIGHT=topk_weights is not None,
              HAS_ZEROS=pw.zeros_t is not None, SILU_MUL=silu_mul, DIRECT=routing.direct, USE_ASM=not interpreting(),
              DTYPE=_DTYPES[x.dtype])
    _LAUNCH(grid, args, cx, tile.num_warps, tile.num_stages)
    return out
