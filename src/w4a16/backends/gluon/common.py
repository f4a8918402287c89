"""Device-side pieces the Gluon kernels share (decode, its stream-K variant and prefill): the
shared-memory view of the codes, the programmatic-dependent-launch controls, the dequant of one
chunk into the wgmma A-operand layout, and the epilogue (alpha, bias, SiLU(gate) * up or a residual,
with or without the rows' RMSNorm, cast, masked store, and the K-split reduction in split order).
"""
import triton  # noqa: F401
from triton.experimental import gluon
from triton.experimental.gluon import language as gl

from ..triton_compat import barrier, reinterpret
from .dequant_ptx import dequant_ptx

# the dequant programs (dequant_ptx.py) by (fp16?, scaled?, code layout): q * s + o, and q - 8 for
# symmetric weights scaled after the MMA, over the Gluon layout's code bytes (1) or the Triton kernels' (2)
DEQ_PROGRAMS = gl.constexpr(tuple(dequant_ptx(dt, scaled=sc, order=order) for dt in ("fp16", "bf16")
                                  for sc in (True, False) for order in ("gluon", "triton")))


@gluon.constexpr_function
def dequant_index(DTYPE, SCALED, CODES):
    """The index in DEQ_PROGRAMS of the dequant for activations of DTYPE (gl.float16 or
    gl.bfloat16), q * s + o (SCALED) or q - 8, over code bytes of layout CODES (1 or 2)."""
    return (0 if DTYPE == gl.float16 else 4) + (0 if SCALED else 2) + (1 if CODES == 2 else 0)


@gluon.constexpr_function
def code_smem_layout(W, NCH, KH, CODES=1):
    """Shared layout of one stage's codes viewed as [16 * W, NCH * KH] uint8 (chunk ch = columns
    [ch * KH, (ch + 1) * KH)): offset
    w * NCH * 16 * KH + ch * 16 * KH + lane * KH / 2 + reg (layout.py), expressed through the
    wgmma A-operand register/lane/warp bases (DotOperandLayout, k_width = 2).

    CODES 2: the codes of the Triton kernels' layout (``backends/triton/layout.py``, version 2),
    which holds the same fragment bytes per (16-row block, chunk) with two differences: a lane's
    bytes of the second 32 values of a half chunk lie 512 bytes on (not 16), and a word's bytes
    are in the order e0 e1 e2 e3 (the dequant's ``prmt`` reorders them: ``dequant_ptx``)."""
    if CODES == 2 and KH == 64:
        bases = [[0, 1], [8, 0], [0, 8], [0, 16], [0, 2], [0, 4], [1, 0], [2, 0], [4, 0], [0, 32]]
    else:
        bases = [[0, 1], [8, 0], [0, 8], [0, 16], [0, 32]][: {32: 4, 64: 5}[KH]]
        bases += [[0, 2], [0, 4], [1, 0], [2, 0], [4, 0]]
    c = 1
    while c < NCH:
        bases.append([0, KH * c])
        c *= 2
    w = 1
    while w < W:
        bases.append([16 * w, 0])
        w *= 2
    return gl.SharedLinearLayout(offset_bases=bases)


@gluon.constexpr_function
def rowmajor_layout(R, C):
    """A plain row-major shared layout of an [R, C] tile (the scales' TMA box, swizzle 0)."""
    bases = []
    c = 1
    while c < C:
        bases.append([0, c])
        c *= 2
    r = 1
    while r < R:
        bases.append([r, 0])
        r *= 2
    return gl.SharedLinearLayout(offset_bases=bases)


@gluon.jit
def gdc_wait():
    """griddepcontrol.wait: block until the grids this one depends on (a programmatic dependent
    launch) have completed and their memory is visible; returns at once otherwise."""
    gl.inline_asm_elementwise("griddepcontrol.wait; // $0", "=r", [], dtype=gl.int32, is_pure=False, pack=1)


@gluon.jit
def gdc_launch_dependents():
    """griddepcontrol.launch_dependents: a grid launched as this one's programmatic dependent may
    start once every program of this grid has executed this (or exited)."""
    gl.inline_asm_elementwise("griddepcontrol.launch_dependents; // $0", "=r", [], dtype=gl.int32, is_pure=False,
                              pack=1)


@gluon.jit
def scale_pair(s_ring, o_ring, slot, gi: gl.constexpr, row_l: gl.constexpr, HAS_ZEROS: gl.constexpr):
    """(s, o) of local group ``gi`` of the slot: [BN, 1] tensors in the A-operand layout."""
    GPS: gl.constexpr = s_ring.shape[1]
    BN: gl.constexpr = s_ring.shape[2]
    fl: gl.constexpr = gl.SwizzledSharedLayout(vec=1, per_phase=1, max_phase=1, order=[0])
    START: gl.constexpr = gi * BN
    s = reinterpret(s_ring.index(slot), s_ring.dtype, [GPS * BN], fl).slice(START, BN).load(row_l)
    if HAS_ZEROS:
        o = reinterpret(o_ring.index(slot), s_ring.dtype, [GPS * BN], fl).slice(START, BN).load(row_l)
    else:
        o = s * -8.0
    return gl.expand_dims(s, 1), gl.expand_dims(o, 1)


@gluon.jit
def _pairs(t):
    """(gate, up) halves of an [BN, MT] tile whose rows are in the silu_mul order (w4a16.epilogue:
    rows 16b .. 16b + 7 gate, 16b + 8 .. 16b + 15 up), each [BN/16, 8, MT]. In the wgmma
    accumulator layout a thread holds rows r and r + 8 of its 16-row slab: register moves only."""
    BN: gl.constexpr = t.shape[0]
    MT: gl.constexpr = t.shape[1]
    return gl.split(gl.permute(gl.reshape(t, [BN // 16, 2, 8, MT]), [0, 2, 3, 1]))


@gluon.jit
def store_out(out, y_ptr, res_ptr, offs, mask, offs_n, offs_m, M, N, EPI: gl.constexpr, DTYPE: gl.constexpr,
              row0=0, nw_ptr=None, ss_ptr=None, rc_ptr=None, eps=None):
    """Store the fp32 tile out [BN weight rows, MT tokens] (alpha and bias applied) into y after
    the epilogue EPI: 0 none (y [M, N] at offs, mask); 2 + residual [M, N] (read at offs);
    1 SiLU(gate) * up of the interleaved gate/up rows into y [M, N/2]; 3 + residual into y[0] of
    y [2, M, N] and, once every row tile of the call has stored its part, the RMSNorm of the rows
    into y[1] (:func:`norm_rows`; the tile's first row ``row0``, the norm weight ``nw_ptr`` [N],
    the partial sums ``ss_ptr`` [N tiles, M], the call's row counter ``rc_ptr``, ``eps``)."""
    if EPI == 1:
        n_idx = gl.expand_dims(offs_n, 1) + gl.expand_dims(offs_m, 0) * 0
        m_idx = gl.expand_dims(offs_m, 0) + gl.expand_dims(offs_n, 1) * 0
        gate, up = _pairs(out)
        n_g, n_u = _pairs(n_idx)
        m_g, m_u = _pairs(m_idx)
        h = gate / (1.0 + gl.exp(-gate)) * up
        # weight row 16b + i (i < 8) of the gate half is output column 8b + i
        gl.store(y_ptr + m_g * (N // 2) + (n_g - 8 * (n_g // 16)), h.to(DTYPE), mask=(n_g < N) & (m_g < M))
    else:
        if EPI >= 2:
            out += gl.load(res_ptr + offs, mask=mask, other=0.0).to(gl.float32)
        h = out.to(DTYPE)
        gl.store(y_ptr + offs, h, mask=mask)
        if EPI == 3:
            BN: gl.constexpr = out.shape[0]
            hf = gl.where(mask, h.to(gl.float32), 0.0)
            norm_rows(gl.sum(hf * hf, axis=0), offs_m, y_ptr, nw_ptr, ss_ptr, rc_ptr, row0 // BN, (N + BN - 1) // BN,
                      M, N, eps, DTYPE, BN // 16)


NORM_STEP = gl.constexpr(4096)   # elements of a row the norm's last program reads per step


@gluon.jit
def norm_rows(ss, offs_m, y_ptr, nw_ptr, ss_ptr, rc_ptr, tile, n_tiles, M, N, eps, DTYPE: gl.constexpr,
              NW: gl.constexpr):
    """The RMSNorm of the call's rows of h = y[0] [M, N] into y[1], once every row tile has stored
    its part of h: ``ss`` [MT] (tokens ``offs_m``) is this tile's sum of squares of its columns of
    h (as stored, in DTYPE), kept at ss_ptr[tile, M]; the last of the ``n_tiles`` tiles to arrive
    at ``rc_ptr`` (``split_arrive``) takes the rows one by one with its NW warps: sums the row's
    partials in a fixed order, reads the row of h back (L2, ``.cg``) NORM_STEP elements at a time
    (32 a thread with 4 warps: one step for a 4096-wide row) and writes
    weight * (h * rsqrt(mean + eps)) (the product with rsqrt rounded to DTYPE, then the weight's
    product rounded: ``w4a16.epilogue.rms_norm``), then resets the counter for the next call."""
    gl.store(ss_ptr + tile * M + offs_m, ss, mask=offs_m < M)
    if split_arrive(rc_ptr, n_tiles):
        L: gl.constexpr = gl.BlockedLayout([NORM_STEP // (32 * NW)], [32], [NW], [0])
        cols = gl.arange(0, NORM_STEP, layout=L)
        for m in range(0, M):
            total = 0.0
            for t0 in range(0, n_tiles, NORM_STEP):   # the row's partials, NORM_STEP tiles a step
                t = t0 + cols
                total += gl.sum(gl.load(ss_ptr + t * M + m, mask=t < n_tiles, other=0.0, cache_modifier=".cg"), axis=0)
            rstd = 1.0 / gl.sqrt_rn(total / N + eps)
            for n0 in range(0, N, NORM_STEP):
                c = n0 + cols
                c_ok = c < N
                h = gl.load(y_ptr + m * N + c, mask=c_ok, other=0.0, cache_modifier=".cg").to(gl.float32)
                w = gl.load(nw_ptr + c, mask=c_ok, other=0.0).to(gl.float32)
                u = (h * rstd).to(DTYPE).to(gl.float32)
                gl.store(y_ptr + (M + m) * N + c, (w * u).to(DTYPE), mask=c_ok)
        split_release(rc_ptr)


@gluon.jit
def split_arrive(counter, expected):
    """The arrival of one piece of a tile summed by its last piece, after this program stored its
    fp32 partial: all threads' stores are made visible (CTA barrier, then a gpu-scope acq_rel
    add on the tile's int32 counter), and True for the program that arrives last of ``expected``,
    which then sees every partial (read them with ``.cg`` loads) and calls :func:`split_release`.
    The one arrival protocol of the decode, stream-K, prefill and MoE kernels."""
    barrier()
    arrived = gl.atomic_add(counter, 1, sem="acq_rel", scope="gpu")
    return arrived == expected - 1


@gluon.jit
def split_release(counter):
    """The last piece resets the tile's counter to 0, ready for the next call (see split_arrive)."""
    gl.atomic_xchg(counter, 0, sem="relaxed", scope="gpu")


@gluon.jit
def epilogue(acc, y_ptr, bias_ptr, part_ptr, cnt_ptr, M, N, alpha, row0, pid_k, nsplit,
              acc_l: gl.constexpr, BN: gl.constexpr, MT: gl.constexpr, SPLIT: gl.constexpr,
              HAS_BIAS: gl.constexpr, DTYPE: gl.constexpr, part_stride=None, cnt_idx=None, res_ptr=None,
              EPI: gl.constexpr = 0, nw_ptr=None, ss_ptr=None, rc_ptr=None, eps=None):
    """alpha * acc (+ bias), the epilogue EPI (``store_out``), cast and stored into y [M, N] ([M, N/2]
    with EPI 1) at rows row0.. (the tile's BN rows, MT tokens, masked). SPLIT 1: this program's
    fp32 partial goes to ``part_ptr + pid_k * part_stride`` (None: M * N), the tile's counter
    ``cnt_ptr + cnt_idx`` (None: the program id) counts arrivals, and the last of ``nsplit`` sums
    the partials in split order, stores, and resets the counter. SPLIT 2: fp32 atomics into
    part_ptr (the host finishes; EPI 0 only). EPI 3: nw_ptr, ss_ptr, rc_ptr, eps of ``store_out``."""
    offs_n = row0 + gl.arange(0, BN, layout=gl.SliceLayout(1, acc_l))
    offs_m = gl.arange(0, MT, layout=gl.SliceLayout(0, acc_l))
    n_ok = offs_n < N
    mask = gl.expand_dims(n_ok, 1) & gl.expand_dims(offs_m < M, 0)
    offs = gl.expand_dims(offs_m, 0) * N + gl.expand_dims(offs_n, 1)
    if SPLIT == 2:
        gl.atomic_add(part_ptr + offs, acc, mask=mask, sem="relaxed")
    else:
        if SPLIT == 1:
            if part_stride is None:   # the decode kernel: partials [nsplit, M, N], a counter per program
                gl.store(part_ptr + pid_k * M * N + offs, acc, mask=mask)
                counter = cnt_ptr + gl.program_id(0)
            else:
                gl.store(part_ptr + pid_k * part_stride + offs, acc, mask=mask)
                counter = cnt_ptr + cnt_idx
            if split_arrive(counter, nsplit):
                total = gl.zeros([BN, MT], gl.float32, acc_l)
                for s in range(0, nsplit):
                    if part_stride is None:
                        total += gl.load(part_ptr + s * M * N + offs, mask=mask, other=0.0, cache_modifier=".cg")
                    else:
                        total += gl.load(part_ptr + s * part_stride + offs, mask=mask, other=0.0, cache_modifier=".cg")
                split_release(counter)
                out = total * alpha
                if HAS_BIAS:
                    out += gl.expand_dims(gl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(gl.float32), 1)
                store_out(out, y_ptr, res_ptr, offs, mask, offs_n, offs_m, M, N, EPI, DTYPE, row0, nw_ptr, ss_ptr, rc_ptr,
                          eps)
        else:
            out = acc * alpha
            if HAS_BIAS:
                out += gl.expand_dims(gl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(gl.float32), 1)
            store_out(out, y_ptr, res_ptr, offs, mask, offs_n, offs_m, M, N, EPI, DTYPE, row0, nw_ptr, ss_ptr, rc_ptr,
                          eps)


@gluon.jit
def dequant_chunk(cview, s_ring, o_ring, slot, ch: gl.constexpr, a_l: gl.constexpr, KH: gl.constexpr,
                  GDIV: gl.constexpr, HAS_ZEROS: gl.constexpr, DTYPE: gl.constexpr, CODES: gl.constexpr = 1):
    """Chunk ``ch`` of a stage's codes (``cview`` [BN, NCH * KH] uint8 in shared memory) as the two
    wgmma A operands (w_lo, w_hi) [BN, KH] in DTYPE: each 16-byte load is a thread's fragment,
    lop3 magic-number dequant to exact q, then q * s + o with its half chunk's scales/offsets.
    CODES: the codes' layout (``code_smem_layout``)."""
    KC: gl.constexpr = 2 * KH
    row_l: gl.constexpr = gl.SliceLayout(1, a_l)
    s_lo, o_lo = scale_pair(s_ring, o_ring, slot, (ch * KC) // GDIV, row_l, HAS_ZEROS)
    if (ch * KC + KH) // GDIV == (ch * KC) // GDIV:
        s_hi = s_lo
        o_hi = o_lo
    else:
        s_hi, o_hi = scale_pair(s_ring, o_ring, slot, (ch * KC + KH) // GDIV, row_l, HAS_ZEROS)
    codes = cview.slice(ch * KH, KH, dim=1).load(a_l)
    w_lo, w_hi = gl.inline_asm_elementwise(
        DEQ_PROGRAMS[dequant_index(DTYPE, True, CODES)], "=r,=r,=r,=r,r,r,r,r,r,r,r,r,r", [codes, s_lo, o_lo, s_hi, o_hi],
        dtype=(DTYPE.value, DTYPE.value), is_pure=True, pack=4)
    return w_lo, w_hi
