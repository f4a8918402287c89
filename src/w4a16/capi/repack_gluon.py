"""Repack kernels of the C library for the Gluon kernels: plain weights -> the Gluon layout, on the GPU.

The layout is ``w4a16.backends.gluon.layout`` (version 1): codes uint8 [ceil(N / 16), K_pad / 32, 256]
in wgmma register-fragment order, scales transposed to [G, N8] and, with zero points, the offsets
-z * s in the same form. ``layout.prepare_decode`` builds it with torch; these kernels build the
same bytes on the device, and the C library launches them from cubins compiled ahead of time.
The CPU tests check them against ``prepare_decode`` under Triton's interpreter.
"""
import triton
import triton.language as tl

from .repack import pair_of_codes


@triton.jit
def repack_gluon_codes_kernel(b_ptr, out_ptr, N, K, chunks, KH: tl.constexpr):
    """b uint8 [N, K/2] plain -> out uint8 [ceil(N/16), chunks * 16 * KH] (chunks of KC = 2 KH values).

    Program (blk, c) writes the 16 * KH bytes of row block ``blk`` and chunk ``c``: byte p belongs
    to lane l = p // (KH/2) (gr = l // 4, t = l % 4) at position q of its KH/2 bytes; inside each
    32-bit word the bytes carry fragment registers (0, 2, 1, 3), so byte p holds register
    r = 4 (q // 4) + (0, 2, 1, 3)[q % 4], i.e. weight (row, k) with row = gr + 8 r[1] and
    k = 2t + r[0] + 8 r[2] + 16 r[3] + 32 r[4]. Its low nibble is the code of (row, c KC + k), its
    high nibble that of (row, c KC + KH + k); rows past N and k past K are code 0.
    """
    blk = tl.program_id(0)
    c = tl.program_id(1)
    p = tl.arange(0, 16 * KH)
    lane = p // (KH // 2)
    q = p % (KH // 2)
    gr = lane // 4
    t = lane % 4
    w = q % 4
    r = (q - w) + ((w & 1) << 1) + (w >> 1)
    row = gr + 8 * ((r >> 1) & 1)
    k = 2 * t + (r & 1) + 8 * ((r >> 2) & 1) + 16 * ((r >> 3) & 1) + 32 * ((r >> 4) & 1)
    packed = pair_of_codes(b_ptr, blk * 16 + row, c * (2 * KH) + k, KH, N, K)
    out = out_ptr + blk.to(tl.int64) * (chunks * 16 * KH) + c * (16 * KH) + p
    tl.store(out, packed)


@triton.jit
def repack_gluon_params_kernel(s_ptr, z_ptr, st_ptr, ot_ptr, N, G, N8, HAS_ZEROS: tl.constexpr, BLOCK: tl.constexpr):
    """scales s [N, G] (and zero points z [N, G]) -> st [G, N8] = s^T and ot [G, N8] = -(z s)^T
    (computed in fp32, rounded once to s's dtype), zero for n >= N. Program (j, nb) writes BLOCK
    columns of row j."""
    j = tl.program_id(0)
    n = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inside = n < N
    src = n.to(tl.int64) * G + j
    s = tl.load(s_ptr + src, mask=inside, other=0.0)
    dst = j.to(tl.int64) * N8 + n
    tl.store(st_ptr + dst, s, mask=n < N8)
    if HAS_ZEROS:
        z = tl.load(z_ptr + src, mask=inside, other=0.0)
        o = -(z.to(tl.float32) * s.to(tl.float32))
        tl.store(ot_ptr + dst, o.to(st_ptr.dtype.element_ty), mask=n < N8)
