"""The grouped W4A16 GEMM over experts (portable Triton; runs in the CPU interpreter too).

One program computes rows [b * BM, (b + 1) * BM) of the grouped order (:mod:`w4a16.moe.routing`:
one expert's slots per block) times BN output columns of that expert's weight, read in the plain
layout (uint8 [E, N, K/2], even k in the low nibble: a [BN, BK/2] byte tile, its two nibbles
joined into the [BN, BK] code tile) and dequantized in registers, one scale (and zero) per row
per K step (the step divides the group):

    out[slot, n] = sum_k x[row(slot), k] * W[e, n, k]     (times topk_weights[slot] with MUL_WEIGHT)

row(slot) is slot // top_k when GATHER (the first GEMM reads each token once per choice) and the
slot itself otherwise (the second GEMM reads the first one's per-slot rows). Padding rows and
blocks past the last used one (expert -1) write nothing. Each output element is written by one
program: the result does not depend on the schedule.
"""
import torch
import triton
import triton.language as tl


@triton.jit
def w4a16_moe_gemm(x_ptr, q_ptr, s_ptr, z_ptr, tw_ptr, out_ptr, slots_ptr, bexp_ptr,
                    N, K, G, num_slots, top_k, stride_xm, stride_om,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ONE_GROUP: tl.constexpr,
                    GATHER: tl.constexpr, MUL_WEIGHT: tl.constexpr, HAS_ZEROS: tl.constexpr):
    """BLOCK_K divides the group size G unless ONE_GROUP (per-channel: one scale per row)."""
    pid_b = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(bexp_ptr + pid_b)
    if e >= 0:
        e64 = e.to(tl.int64)
        offs_m = pid_b * BLOCK_M + tl.arange(0, BLOCK_M)
        slots = tl.load(slots_ptr + offs_m)
        valid = slots < num_slots
        if GATHER:
            rows = slots // top_k
        else:
            rows = slots
        rows = tl.where(valid, rows, 0).to(tl.int64)
        n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = n < N
        num_groups = K // G
        q_base = q_ptr + e64 * N * (K // 2) + n[:, None].to(tl.int64) * (K // 2)
        s_base = e64 * N * num_groups + n.to(tl.int64) * num_groups
        s_row = tl.load(s_ptr + s_base, mask=nmask, other=0.0).to(tl.float32)
        z_row = tl.full((BLOCK_N,), 8.0, tl.float32)
        if HAS_ZEROS:
            z_row = tl.load(z_ptr + s_base, mask=nmask, other=0.0).to(tl.float32)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            a = tl.load(x_ptr + rows[:, None] * stride_xm + k[None, :], mask=valid[:, None] & (k < K)[None, :],
                        other=0.0)
            kh = k0 // 2 + tl.arange(0, BLOCK_K // 2)
            byte = tl.load(q_base + kh[None, :], mask=nmask[:, None] & (kh < K // 2)[None, :], other=0)
            code = tl.reshape(tl.join(byte & 0xF, byte >> 4), (BLOCK_N, BLOCK_K)).to(tl.float32)
            if not ONE_GROUP:
                g = k0 // G
                s_row = tl.load(s_ptr + s_base + g, mask=nmask, other=0.0).to(tl.float32)
                if HAS_ZEROS:
                    z_row = tl.load(z_ptr + s_base + g, mask=nmask, other=0.0).to(tl.float32)
            w = ((code - z_row[:, None]) * s_row[:, None]).to(a.dtype)
            acc += tl.dot(a, tl.trans(w))
        if MUL_WEIGHT:
            acc = acc * tl.load(tw_ptr + slots, mask=valid, other=0.0)[:, None]
        out = out_ptr + slots[:, None].to(tl.int64) * stride_om + n[None, :]
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=valid[:, None] & nmask[None, :])


BLOCK_N = 64


def grouped_gemm(x: torch.Tensor, experts, routing, top_k: int, gather: bool, out: torch.Tensor,
                 topk_weights=None) -> torch.Tensor:
    """Launch :func:`w4a16_moe_gemm`: x [T, K] (gather) or [T*k, K], experts a QuantizedExperts
    [E, N, K], routing a :class:`w4a16.moe.routing.Routing`, out [T*k, N] (written for every
    routed slot), topk_weights float32 [T*k] or None. Returns out."""
    E, N, K = experts.shape
    G = experts.group_size_effective
    one_group = G == K
    block_k = 64 if one_group else min(64, G)
    blocks = routing.block_expert.numel()
    grid = (blocks, triton.cdiv(N, BLOCK_N))
    zeros = experts.zeros if experts.zeros is not None else experts.scales
    tw = topk_weights if topk_weights is not None else out   # unread without MUL_WEIGHT
    w4a16_moe_gemm[grid](x, experts.qweight, experts.scales, zeros, tw, out, routing.sorted_slots,
                          routing.block_expert, N, K, G, routing.slots, top_k,
                          x.stride(0), out.stride(0), BLOCK_M=routing.block_m, BLOCK_N=BLOCK_N, BLOCK_K=block_k,
                          ONE_GROUP=one_group,
                          GATHER=gather, MUL_WEIGHT=topk_weights is not None, HAS_ZEROS=experts.zeros is not None)
    return out
