"""The pieces of a K loop over layout-2 chunks (:mod:`.layout`) that the dense kernel
(:mod:`.gemm`) and the grouped MoE kernel (:mod:`.moe_packed`) share: a chunk's code tile back
from its fragment blocks, the group parameters of its two half chunks, the x tile, the MMA in
either operand order. Inlined into each kernel (no cost of their own)."""
import triton
import triton.language as tl


@triton.jit
def group_of(k, K, GROUP_LOG2: tl.constexpr):
    """Quantization group of K index ``k``: k >> log2(g); per-channel: 0 below K, 1 (padding) past it."""
    if GROUP_LOG2 >= 0:
        return k >> GROUP_LOG2
    else:
        return (k >= K).to(tl.int32)


@triton.jit
def group_params(s_ptr, z_ptr, k0, K, N, rows, GROUP_LOG2: tl.constexpr, H: tl.constexpr,
                 ONE_SCALE: tl.constexpr, HAS_ZEROS: tl.constexpr, DTYPE: tl.constexpr):
    """(s_lo, s_hi, z_lo, z_hi), each [BN] in DTYPE (stored as DTYPE or fp32), for the two half
    chunks starting at K index k0. Without zeros the z values are unused placeholders (the scales)."""
    g_lo = group_of(k0, K, GROUP_LOG2)
    s_lo = tl.load(s_ptr + g_lo * N + rows).to(DTYPE)
    z_lo = s_lo
    if HAS_ZEROS:
        z_lo = tl.load(z_ptr + g_lo * N + rows).to(DTYPE)
    if ONE_SCALE:
        s_hi = s_lo
        z_hi = z_lo
    else:
        g_hi = group_of(k0 + H, K, GROUP_LOG2)
        s_hi = tl.load(s_ptr + g_hi * N + rows).to(DTYPE)
        z_hi = s_hi
        if HAS_ZEROS:
            z_hi = tl.load(z_ptr + g_hi * N + rows).to(DTYPE)
    return s_lo, s_hi, z_lo, z_hi


@triton.jit
def unswizzle(t, BN: tl.constexpr, SH: tl.constexpr):
    """A loaded fragment-block tile [SH * BN/16 (sh, b), 512 (g, t, 16 bytes)] -> the chunk tile
    [BN, 32 * SH] (layout.py: row 16b + 8*r8 + g, byte 32*sh + 16*sl + 8*h + 2*t + j); register
    moves only."""
    t = tl.reshape(t, (SH, BN // 16, 8, 4, 2, 2, 2, 2))        # sh b g t sl h r8 j
    t = tl.permute(t, (1, 6, 2, 0, 4, 5, 3, 7))                # b r8 g sh sl h t j
    return tl.reshape(t, (BN, 32 * SH))


@triton.jit
def mma(w, x, SWAP_AB: tl.constexpr, acc=None):
    """acc + w @ x ([BN, BM], SWAP_AB) or acc + x @ w^T ([BM, BN]), fp32; w [BN, H], x as loaded."""
    if SWAP_AB:
        return tl.dot(w, x, acc)
    else:
        return tl.dot(x, tl.trans(w), acc)


@triton.jit
def per_row(v, SWAP_AB: tl.constexpr):
    """A per-weight-row vector [BN] as fp32, broadcastable against the accumulator."""
    if SWAP_AB:
        return v.to(tl.float32)[:, None]
    else:
        return v.to(tl.float32)[None, :]


@triton.jit
def load_x(x_ptrs, k0, offs_h, m_ok, live, K, EVEN_K: tl.constexpr, SWAP_AB: tl.constexpr, PRO: tl.constexpr,
            pn_ptr, rstd):
    """The x tile of K range [k0, k0 + H): [H, BM] (x^T) with SWAP_AB, else [BM, H]; rows past M,
    columns past K and chunks that are not ``live`` read as 0. PRO: normalized (``rstd`` [BM] the
    rows' rsqrt(mean(x^2) + eps), pn_ptr the norm weight [K])."""
    rows_ok = m_ok & live
    if SWAP_AB:
        mask = rows_ok[None, :]
        if not EVEN_K:
            mask = mask & ((k0 + offs_h) < K)[:, None]
    else:
        mask = rows_ok[:, None]
        if not EVEN_K:
            mask = mask & ((k0 + offs_h) < K)[None, :]
    x = tl.load(x_ptrs + k0, mask=mask, other=0.0)
    if PRO:
        # in x's dtype (packed two-value multiplies): rstd rounded to it first, so each value is
        # within about 1.5 roundings of w4a16.epilogue.rms_norm's rather than one
        g = tl.load(pn_ptr + k0 + offs_h, mask=(k0 + offs_h) < K, other=0.0)
        if SWAP_AB:
            x = x * rstd[None, :] * g[:, None]
        else:
            x = x * rstd[:, None] * g[None, :]
    return x


@triton.jit
def scaled_mma(acc, w_lo, w_hi, x_lo, x_hi, s_lo, s_hi, SCALE_AFTER: tl.constexpr, ONE_SCALE: tl.constexpr,
               SWAP_AB: tl.constexpr):
    """acc + the products of one chunk: the half-chunk weight tiles w_lo, w_hi [BN, H] (integer
    values q - z) with their x tiles, each scaled by its per-row scales s_lo, s_hi [BN]. SCALE_AFTER:
    the integer-valued tiles go into the MMA as they are and each half chunk's fp32 partial product
    is scaled per row afterwards (fewer instructions when the accumulator tile is small, as in
    decode); else the tiles are scaled first and accumulate in the MMA."""
    if SCALE_AFTER:
        if ONE_SCALE:
            p = mma(w_lo, x_lo, SWAP_AB)
            p = mma(w_hi, x_hi, SWAP_AB, p)
            acc += p * per_row(s_lo, SWAP_AB)
        else:
            acc += mma(w_lo, x_lo, SWAP_AB) * per_row(s_lo, SWAP_AB)
            acc += mma(w_hi, x_hi, SWAP_AB) * per_row(s_hi, SWAP_AB)
    else:
        acc = mma(w_lo * s_lo[:, None], x_lo, SWAP_AB, acc)
        acc = mma(w_hi * s_hi[:, None], x_hi, SWAP_AB, acc)
    return acc
