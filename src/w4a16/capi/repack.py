"""Repack kernels of the C library: plain weights -> layout version 2, on the GPU.

The C entry points take weights in the plain format (:mod:`w4a16.weight`): codes uint8 [N, K/2]
(k in byte k // 2, even k in the low nibble), scales and zeros [N, K/g]. The GEMM kernel reads
layout version 2 (:mod:`w4a16.backends.triton.layout`): codes in 16-row fragment blocks, scales
and zeros transposed to [G_pad, N]. These two kernels build that layout on the device; the C
library launches them from cubins compiled ahead of time, like the GEMM kernel.

Scales may be re-grouped to a smaller group ``gdst`` that divides the source group (each source
group's value repeated): the C library bakes three group classes (32, 64, 128) into its cubins,
and any group size that is a multiple of 32, or one group over all of K, maps onto one of them.
"""
import triton
import triton.language as tl


@triton.jit
def repack_codes_kernel(b_ptr, qk_ptr, N, K, chunks, H: tl.constexpr):
    """b uint8 [N, K/2] plain -> qk uint8 [ceil(N/16), chunks * 16 * H] fragment blocks.

    Program (blk, c) writes the 16 * H bytes of row block ``blk`` and chunk ``c`` (KC = 2H values
    of K): byte p = 512*sh + 64*g + 16*t + 8*sl + 4*h + 2*r8 + j holds chunk-interleaved byte
    i = 32*sh + 16*sl + 8*h + 2*t + j of row 16*blk + 8*r8 + g, whose low nibble is the code of
    k = c*KC + i and whose high nibble that of k + H. Rows past N and k past K are code 0.
    """
    blk = tl.program_id(0)
    c = tl.program_id(1)
    p = tl.arange(0, 16 * H)
    sh = p // 512
    g = (p // 64) % 8
    t = (p // 16) % 4
    sl = (p // 8) % 2
    h = (p // 4) % 2
    r8 = (p // 2) % 2
    j = p % 2
    i = 32 * sh + 16 * sl + 8 * h + 2 * t + j
    n = blk * 16 + 8 * r8 + g
    packed = pair_of_codes(b_ptr, n, c * (2 * H) + i, H, N, K)
    out = qk_ptr + blk.to(tl.int64) * (chunks * 16 * H) + c * (16 * H) + p
    tl.store(out, packed)


@triton.jit
def pair_of_codes(b_ptr, n, k, H, N, K):
    """uint8: the code of (n, k) in the low nibble and that of (n, k + H) in the high nibble, read
    from plain codes b uint8 [N, K/2] (k in byte k // 2, even k low); 0 past N or K."""
    row = b_ptr + n.to(tl.int64) * (K // 2)
    k_hi = k + H
    lo = tl.load(row + k // 2, mask=(n < N) & (k < K), other=0).to(tl.int32)
    hi = tl.load(row + k_hi // 2, mask=(n < N) & (k_hi < K), other=0).to(tl.int32)
    lo = (lo >> ((k & 1) * 4)) & 0xF
    hi = (hi >> ((k_hi & 1) * 4)) & 0xF
    return (lo | (hi << 4)).to(tl.uint8)


@triton.jit
def repack_scales_kernel(src_ptr, dst_ptr, dst32_ptr, N, K, G, group, gdst, BLOCK: tl.constexpr):
    """src [N, G] (scales or zeros, group ``group`` along K) -> dst [G_pad, N] in src's dtype and
    dst32 [G_pad, N] fp32, regrouped to ``gdst`` (which divides ``group``): dst[gp, n] =
    src[n, gp * gdst // group] where gp * gdst < K, else 0. Program (gp, nb) writes BLOCK values."""
    gp = tl.program_id(0)
    n = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = n < N
    k = gp * gdst
    src_g = tl.minimum(k // group, G - 1)
    v = tl.load(src_ptr + n.to(tl.int64) * G + src_g, mask=ok & (k < K), other=0.0)
    out = gp.to(tl.int64) * N + n
    tl.store(dst_ptr + out, v, mask=ok)
    tl.store(dst32_ptr + out, v.to(tl.float32), mask=ok)
