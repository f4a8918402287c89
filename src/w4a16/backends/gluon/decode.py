"""The Gluon W4A16 decode kernel for Hopper (sm_90a): swap-AB wgmma with register-A operands.

One program computes out^T[BN, MT] = W[BN, K-range] @ x^T[K-range, MT] for BN = 16 * W rows (W
warps = one warpgroup per 64 rows) and MT tokens (the wgmma N: 8, 16, 32 or 64; rows of x past M
read as zero through TMA's out-of-bounds fill). Grid: (N tiles, K splits).

Pipeline: a ring of STAGES shared-memory slots, each holding NCH chunks
(KS = NCH * 2 * KH values of K): the codes (one TMA box [W, KS/32, 256] of ``layout.py``'s
tensor), x (2 * NCH boxes [MT, KH]) and the scales (and offsets) of the groups the stage spans
(one box [GPS, BN] of the transposed [G, N8] tensors), all completing on one mbarrier per slot.
With WS a one-warp producer partition (``warp_specialize``) issues the loads of every stage once
the consumers have released its slot (an "empty" mbarrier per slot); without WS one partition
issues the loads of stage i + STAGES - 1 into the slot stage i - 1 used (all warps have passed a
thread barrier, and the wgmmas that read it have been waited for) before consuming stage i.
The consumers wait for stage i, and for each chunk: one shared-memory load of the thread's own
fragment bytes (16 B per LDS.128, no shuffles), the dequant in inline PTX (``dequant_ptx.py``:
lop3 into the magic number, subtract the magic, then q * s + o: 13 instructions per 8 weights in
fp16, 15 in bf16) straight into the wgmma A register layout, and two async wgmmas (low and high
half chunk). With SA (symmetric weights) the A operand is the exact integer q - 8 (9 / 11
instructions), the chunk's wgmmas start a fresh fp32 sum per group, and acc += s * sum once they
are done. A chunk's A registers stay alive (``warpgroup_mma_wait`` deps) until its wgmmas are
waited for, one chunk later.

PDL (a programmatic dependent launch): the weight's part of the first stages is loaded before
``griddepcontrol.wait`` (the previous grid on the stream may still be running: the weight was
written long before it), x's part and every store after it; ``launch_dependents`` once every
load is issued.

Epilogue: alpha, bias (fp32), cast, masked store of y [M, N]. With several K splits (SPLIT = 1)
each program writes its fp32 partial tile to ``part[split]`` and the last program of a tile to
arrive (acq_rel counter per tile, reset to 0 after) sums the partials in split order and writes
y: deterministic, one launch. SPLIT = 2 adds the partials atomically into a zeroed fp32 buffer
(the launcher then applies alpha, bias and the cast).
"""
import triton  # noqa: F401
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, warpgroup_mma, warpgroup_mma_wait

from ..triton_compat import barrier, reinterpret, tma_load
from .dequant_ptx import dequant_ptx

# the dequant programs (dequant_ptx.py): q * s + o, and q - 8 for symmetric weights scaled after the MMA
DEQ_FP16 = gl.constexpr(dequant_ptx("fp16", scaled=True))
DEQ_BF16 = gl.constexpr(dequant_ptx("bf16", scaled=True))
DEQ_INT_FP16 = gl.constexpr(dequant_ptx("fp16", scaled=False))
DEQ_INT_BF16 = gl.constexpr(dequant_ptx("bf16", scaled=False))


@gluon.constexpr_function
def code_smem_layout(W, NCH, KH):
    """Shared layout of one stage's codes viewed as [16 * W, NCH * KH] uint8 (chunk ch = columns
    [ch * KH, (ch + 1) * KH)): offset
    w * NCH * 16 * KH + ch * 16 * KH + lane * KH / 2 + reg (layout.py), expressed through the
    wgmma A-operand register/lane/warp bases (DotOperandLayout, k_width = 2)."""
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
def _issue(it, st0, c_desc, x_desc, s_desc, o_desc, c_ring, x_ring, s_ring, o_ring, bars, row0, group,
           STAGES: gl.constexpr, NCH: gl.constexpr, KH: gl.constexpr, GPS: gl.constexpr, W: gl.constexpr,
           HAS_ZEROS: gl.constexpr, PART: gl.constexpr = 0):
    """TMA loads of the program's stage ``it`` (global stage st0 + it) into slot it % STAGES.
    PART 0: all of them; 1: the weight's (codes, scales, offsets; the barrier expects the whole
    stage); 2: x's (after a PART 1 of the same stage)."""
    KS: gl.constexpr = NCH * 2 * KH
    slot = it % STAGES
    bar = bars.index(slot)
    k0 = (st0 + it) * KS
    NB0: gl.constexpr = c_desc.block_type.nbytes + 2 * NCH * x_desc.block_type.nbytes + s_desc.block_type.nbytes
    if PART != 2:
        if HAS_ZEROS:
            mbarrier.expect(bar, NB0 + o_desc.block_type.nbytes)
        else:
            mbarrier.expect(bar, NB0)
        tma_load(c_desc, [row0 // 16, k0 // 32, 0], bar, c_ring.index(slot))
    if PART != 1:
        for j in gl.static_range(2 * NCH):
            tma_load(x_desc, [0, k0 + j * KH], bar, x_ring.index(slot * 2 * NCH + j))
    if PART != 2:
        g0 = k0 // group
        tma_load(s_desc, [g0, row0], bar, s_ring.index(slot))
        if HAS_ZEROS:
            tma_load(o_desc, [g0, row0], bar, o_ring.index(slot))


@gluon.jit
def _scale_pair(s_ring, o_ring, slot, gi: gl.constexpr, row_l: gl.constexpr, HAS_ZEROS: gl.constexpr):
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
def _epilogue(acc, y_ptr, bias_ptr, part_ptr, cnt_ptr, M, N, alpha, row0, pid_k, nsplit,
              acc_l: gl.constexpr, BN: gl.constexpr, MT: gl.constexpr, SPLIT: gl.constexpr,
              HAS_BIAS: gl.constexpr, DTYPE: gl.constexpr, part_stride=None, cnt_idx=None):
    """alpha * acc (+ bias) cast and stored into y [M, N] at rows row0.. (the tile's BN rows, MT
    tokens, masked). SPLIT 1: this program's fp32 partial goes to ``part_ptr + pid_k *
    part_stride`` (None: M * N), the tile's counter ``cnt_ptr + cnt_idx`` (None: the program id)
    counts arrivals, and the last of ``nsplit`` sums the partials in split order, stores, and
    resets the counter. SPLIT 2: fp32 atomics into part_ptr (the host finishes)."""
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
            barrier()
            arrived = gl.atomic_add(counter, 1, sem="acq_rel", scope="gpu")
            if arrived == nsplit - 1:
                total = gl.zeros([BN, MT], gl.float32, acc_l)
                for s in range(0, nsplit):
                    if part_stride is None:
                        total += gl.load(part_ptr + s * M * N + offs, mask=mask, other=0.0, cache_modifier=".cg")
                    else:
                        total += gl.load(part_ptr + s * part_stride + offs, mask=mask, other=0.0, cache_modifier=".cg")
                gl.atomic_xchg(counter, 0, sem="relaxed", scope="gpu")
                out = total * alpha
                if HAS_BIAS:
                    out += gl.expand_dims(gl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(gl.float32), 1)
                gl.store(y_ptr + offs, out.to(DTYPE), mask=mask)
        else:
            out = acc * alpha
            if HAS_BIAS:
                out += gl.expand_dims(gl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(gl.float32), 1)
            gl.store(y_ptr + offs, out.to(DTYPE), mask=mask)


@gluon.jit
def dequant_chunk(cview, s_ring, o_ring, slot, ch: gl.constexpr, a_l: gl.constexpr, KH: gl.constexpr,
                  GDIV: gl.constexpr, HAS_ZEROS: gl.constexpr, DTYPE: gl.constexpr):
    """Chunk ``ch`` of a stage's codes (``cview`` [BN, NCH * KH] uint8 in shared memory) as the two
    wgmma A operands (w_lo, w_hi) [BN, KH] in DTYPE: each 16-byte load is a thread's fragment,
    lop3 magic-number dequant to exact q, then q * s + o with its half chunk's scales/offsets."""
    KC: gl.constexpr = 2 * KH
    row_l: gl.constexpr = gl.SliceLayout(1, a_l)
    s_lo, o_lo = _scale_pair(s_ring, o_ring, slot, (ch * KC) // GDIV, row_l, HAS_ZEROS)
    if (ch * KC + KH) // GDIV == (ch * KC) // GDIV:
        s_hi = s_lo
        o_hi = o_lo
    else:
        s_hi, o_hi = _scale_pair(s_ring, o_ring, slot, (ch * KC + KH) // GDIV, row_l, HAS_ZEROS)
    codes = cview.slice(ch * KH, KH, dim=1).load(a_l)
    if DTYPE == gl.float16:
        w_lo, w_hi = gl.inline_asm_elementwise(
            DEQ_FP16, "=r,=r,=r,=r,r,r,r,r,r,r,r,r,r", [codes, s_lo, o_lo, s_hi, o_hi],
            dtype=(gl.float16, gl.float16), is_pure=True, pack=4)
    else:
        w_lo, w_hi = gl.inline_asm_elementwise(
            DEQ_BF16, "=r,=r,=r,=r,r,r,r,r,r,r,r,r,r", [codes, s_lo, o_lo, s_hi, o_hi],
            dtype=(gl.bfloat16, gl.bfloat16), is_pure=True, pack=4)
    return w_lo, w_hi


@gluon.jit
def _stage_codes(it, c_ring, bars, W: gl.constexpr, KH: gl.constexpr, NCH: gl.constexpr, STAGES: gl.constexpr):
    """Wait for stage ``it``; (its slot, its codes viewed as [16 * W, NCH * KH] uint8 in the
    wgmma A-fragment order of ``code_smem_layout``)."""
    slot = it % STAGES
    mbarrier.wait(bars.index(slot), (it // STAGES) & 1)
    cview = reinterpret(c_ring.index(slot), gl.uint8, [16 * W, NCH * KH], code_smem_layout(W, NCH, KH))
    return slot, cview


@gluon.jit
def _acc_scale(s_ring, slot, gi: gl.constexpr, acc_l: gl.constexpr):
    """The scales of local group ``gi`` of the slot as a [BN, 1] fp32 tensor in the accumulator's
    row layout (to scale a group's integer dot products after the MMA)."""
    GPS: gl.constexpr = s_ring.shape[1]
    BN: gl.constexpr = s_ring.shape[2]
    fl: gl.constexpr = gl.SwizzledSharedLayout(vec=1, per_phase=1, max_phase=1, order=[0])
    s = reinterpret(s_ring.index(slot), s_ring.dtype, [GPS * BN], fl).slice(gi * BN, BN).load(
        gl.SliceLayout(1, acc_l))
    return gl.expand_dims(s.to(gl.float32), 1)


@gluon.jit
def _consume_stage_sa(acc, it, c_ring, x_ring, s_ring, bars, acc_l: gl.constexpr, W: gl.constexpr,
                      KH: gl.constexpr, NCH: gl.constexpr, STAGES: gl.constexpr, GDIV: gl.constexpr,
                      DTYPE: gl.constexpr):
    """_consume_stage for symmetric weights with the scale applied after the MMA: each chunk's
    wgmmas multiply the exact integers q - 8 into a fresh fp32 accumulator per group (one for the
    chunk when both half chunks share a group, else one per half), and acc += s * that once its
    wgmmas are done (one chunk later)."""
    BN: gl.constexpr = 16 * W
    MT: gl.constexpr = acc.shape[1]
    KC: gl.constexpr = 2 * KH
    a_l: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_l, k_width=2)
    slot, cview = _stage_codes(it, c_ring, bars, W, KH, NCH, STAGES)
    zero = gl.zeros([BN, MT], gl.float32, acc_l)
    for ch in gl.static_range(NCH):
        codes = cview.slice(ch * KH, KH, dim=1).load(a_l)
        if DTYPE == gl.float16:
            q_lo, q_hi = gl.inline_asm_elementwise(DEQ_INT_FP16, "=r,=r,=r,=r,r", [codes],
                                                   dtype=(gl.float16, gl.float16), is_pure=True, pack=4)
        else:
            q_lo, q_hi = gl.inline_asm_elementwise(DEQ_INT_BF16, "=r,=r,=r,=r,r", [codes],
                                                   dtype=(gl.bfloat16, gl.bfloat16), is_pure=True, pack=4)
        xb = slot * 2 * NCH + 2 * ch
        p_lo = warpgroup_mma(q_lo, x_ring.index(xb).permute((1, 0)), zero, use_acc=False, is_async=True)
        if (ch * KC + KH) // GDIV == (ch * KC) // GDIV:
            # both halves in one group: one chain (only its end is waited for: waiting for p_lo
            # too would force the first wgmma to complete before the second could take its sum)
            p_hi = warpgroup_mma(q_hi, x_ring.index(xb + 1).permute((1, 0)), p_lo, is_async=True)
            p_lo = p_hi
        else:
            p_hi = warpgroup_mma(q_hi, x_ring.index(xb + 1).permute((1, 0)), zero, use_acc=False, is_async=True)
        if ch > 0:
            # the previous chunk's wgmmas are done: scale its sums into acc, free its A registers
            acc = _retire_chunk(acc, prev_plo, prev_phi, prev_lo, prev_hi, 2, s_ring, slot, ch - 1, acc_l, KH, GDIV)
        prev_plo = p_lo
        prev_phi = p_hi
        prev_lo = q_lo
        prev_hi = q_hi
    acc = _retire_chunk(acc, prev_plo, prev_phi, prev_lo, prev_hi, 0, s_ring, slot, NCH - 1, acc_l, KH, GDIV)
    return acc


@gluon.jit
def _retire_chunk(acc, p_lo, p_hi, q_lo, q_hi, outstanding: gl.constexpr, s_ring, slot, ch: gl.constexpr,
                  acc_l: gl.constexpr, KH: gl.constexpr, GDIV: gl.constexpr):
    """Wait until at most ``outstanding`` wgmmas are in flight (chunk ch's are done), then
    acc + s * its integer sums: p_hi alone (p_lo is p_hi) when both halves share a group."""
    KC: gl.constexpr = 2 * KH
    if (ch * KC + KH) // GDIV == (ch * KC) // GDIV:
        p, a, b = warpgroup_mma_wait(num_outstanding=outstanding, deps=(p_hi, q_lo, q_hi))
        acc = acc + _acc_scale(s_ring, slot, (ch * KC) // GDIV, acc_l) * p
    else:
        p0, p1, a, b = warpgroup_mma_wait(num_outstanding=outstanding, deps=(p_lo, p_hi, q_lo, q_hi))
        acc = acc + _acc_scale(s_ring, slot, (ch * KC) // GDIV, acc_l) * p0
        acc = acc + _acc_scale(s_ring, slot, (ch * KC + KH) // GDIV, acc_l) * p1
    return acc


@gluon.jit
def _consume_stage(acc, it, c_ring, x_ring, s_ring, o_ring, bars,
                   acc_l: gl.constexpr, W: gl.constexpr, KH: gl.constexpr, NCH: gl.constexpr,
                   STAGES: gl.constexpr, GDIV: gl.constexpr, HAS_ZEROS: gl.constexpr, DTYPE: gl.constexpr,
                   SA: gl.constexpr = False):
    """Wait for stage ``it`` and add its products to acc; all its wgmmas are complete on return.
    SA: symmetric weights, scale applied after the MMA (``_consume_stage_sa``)."""
    if SA:
        acc = _consume_stage_sa(acc, it, c_ring, x_ring, s_ring, bars, acc_l, W, KH, NCH, STAGES, GDIV, DTYPE)
    else:
        acc = _consume_stage_fold(acc, it, c_ring, x_ring, s_ring, o_ring, bars, acc_l, W, KH, NCH, STAGES, GDIV,
                                  HAS_ZEROS, DTYPE)
    return acc


@gluon.jit
def _consume_stage_fold(acc, it, c_ring, x_ring, s_ring, o_ring, bars,
                        acc_l: gl.constexpr, W: gl.constexpr, KH: gl.constexpr, NCH: gl.constexpr,
                        STAGES: gl.constexpr, GDIV: gl.constexpr, HAS_ZEROS: gl.constexpr, DTYPE: gl.constexpr):
    """_consume_stage with the scales (and offsets) folded into the dequant: q * s + o."""
    a_l: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_l, k_width=2)
    slot, cview = _stage_codes(it, c_ring, bars, W, KH, NCH, STAGES)
    for ch in gl.static_range(NCH):
        w_lo, w_hi = dequant_chunk(cview, s_ring, o_ring, slot, ch, a_l, KH, GDIV, HAS_ZEROS, DTYPE)
        xb = slot * 2 * NCH + 2 * ch
        acc = warpgroup_mma(w_lo, x_ring.index(xb).permute((1, 0)), acc, is_async=True)
        acc = warpgroup_mma(w_hi, x_ring.index(xb + 1).permute((1, 0)), acc, is_async=True)
        if ch > 0:
            # the previous chunk's wgmmas are done: its A registers may be reused
            acc, p_lo, p_hi = warpgroup_mma_wait(num_outstanding=2, deps=(acc, prev_lo, prev_hi))
        prev_lo = w_lo
        prev_hi = w_hi
    acc, p_lo, p_hi = warpgroup_mma_wait(num_outstanding=0, deps=(acc, prev_lo, prev_hi))
    return acc


@gluon.jit
def _ws_consumer(n_it, c_ring, x_ring, s_ring, o_ring, bars, empty, y_ptr, bias_ptr, part_ptr, cnt_ptr, M, N, alpha,
                 row0, pid_k, nsplit, acc_l: gl.constexpr, W: gl.constexpr, KH: gl.constexpr, NCH: gl.constexpr,
                 MT: gl.constexpr, STAGES: gl.constexpr, GDIV: gl.constexpr, SPLIT: gl.constexpr,
                 HAS_ZEROS: gl.constexpr, HAS_BIAS: gl.constexpr, DTYPE: gl.constexpr, SA: gl.constexpr,
                 PDL: gl.constexpr):
    """Default partition: dequant + wgmma of every stage, handing each slot back to the producer,
    then the epilogue. PDL: its stores wait for the grids this one depends on. The epilogue runs
    inside the partition: after the warp-specialized region Triton may reuse the shared bytes that
    hold the region's state (which the producer warp reads once more to leave), and the split
    epilogue's scalar atomic broadcasts through shared memory (compute-sanitizer's racecheck
    reported that pair)."""
    if PDL:
        gdc_wait()
    acc = gl.zeros([16 * W, MT], gl.float32, acc_l)
    for it in range(n_it):
        acc = _consume_stage(acc, it, c_ring, x_ring, s_ring, o_ring, bars, acc_l, W, KH, NCH, STAGES, GDIV,
                             HAS_ZEROS, DTYPE, SA)
        mbarrier.arrive(empty.index(it % STAGES), count=1)
    _epilogue(acc, y_ptr, bias_ptr, part_ptr, cnt_ptr, M, N, alpha, row0, pid_k, nsplit, acc_l, 16 * W, MT, SPLIT,
              HAS_BIAS, DTYPE)


@gluon.jit
def _ws_producer(n_it, st0, c_desc, x_desc, s_desc, o_desc, c_ring, x_ring, s_ring, o_ring, bars, empty, row0,
                 group, STAGES: gl.constexpr, NCH: gl.constexpr, KH: gl.constexpr, GPS: gl.constexpr,
                 W: gl.constexpr, HAS_ZEROS: gl.constexpr, PDL: gl.constexpr):
    """Worker partition (one warp): TMA loads of every stage once its slot is free. PDL: the
    weight's part of the first STAGES stages is loaded before waiting for the grids this one
    depends on (it was written before them), x's after; once every load is issued, dependents
    may launch."""
    n_pre = 0
    if PDL:
        n_pre = gl.minimum(n_it, STAGES)
        for it in range(n_pre):
            _issue(it, st0, c_desc, x_desc, s_desc, o_desc, c_ring, x_ring, s_ring, o_ring, bars, row0, group,
                   STAGES, NCH, KH, GPS, W, HAS_ZEROS, 1)
        gdc_wait()
        for it in range(n_pre):
            _issue(it, st0, c_desc, x_desc, s_desc, o_desc, c_ring, x_ring, s_ring, o_ring, bars, row0, group,
                   STAGES, NCH, KH, GPS, W, HAS_ZEROS, 2)
    for it in range(n_pre, n_it):
        slot = it % STAGES
        mbarrier.wait(empty.index(slot), ((it // STAGES) & 1) ^ 1, pred=it >= STAGES)
        _issue(it, st0, c_desc, x_desc, s_desc, o_desc, c_ring, x_ring, s_ring, o_ring, bars, row0, group,
               STAGES, NCH, KH, GPS, W, HAS_ZEROS)
    if PDL:
        gdc_launch_dependents()


@gluon.jit
def allocate_rings(c_desc, x_desc, s_desc, o_desc, STAGES: gl.constexpr, NCH: gl.constexpr, DTYPE: gl.constexpr,
                   HAS_ZEROS: gl.constexpr, WITH_EMPTY: gl.constexpr):
    """The shared-memory ring of the decode kernels: (codes, x, scales, offsets (the scales' ring
    without zeros), "full" mbarriers, "empty" mbarriers (WITH_EMPTY; else the full ones again)),
    every mbarrier initialized with count 1."""
    c_ring = gl.allocate_shared_memory(gl.uint8, [STAGES] + c_desc.block_type.shape, c_desc.layout)
    x_ring = gl.allocate_shared_memory(DTYPE, [STAGES * 2 * NCH] + x_desc.block_type.shape, x_desc.layout)
    s_ring = gl.allocate_shared_memory(DTYPE, [STAGES] + s_desc.block_type.shape, s_desc.layout)
    if HAS_ZEROS:
        o_ring = gl.allocate_shared_memory(DTYPE, [STAGES] + o_desc.block_type.shape, o_desc.layout)
    else:
        o_ring = s_ring
    bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(bars.index(i), count=1)
    if WITH_EMPTY:
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(empty.index(i), count=1)
    else:
        empty = bars
    return c_ring, x_ring, s_ring, o_ring, bars, empty


@gluon.jit
def w4a16_decode_kernel(
    c_desc, x_desc, s_desc, o_desc, y_ptr, bias_ptr, part_ptr, cnt_ptr,
    M, N, group, n_stages, stages_per_split, alpha,
    MT: gl.constexpr, W: gl.constexpr, KH: gl.constexpr, NCH: gl.constexpr, STAGES: gl.constexpr,
    GPS: gl.constexpr, GDIV: gl.constexpr, SPLIT: gl.constexpr, HAS_ZEROS: gl.constexpr,
    HAS_BIAS: gl.constexpr, DTYPE: gl.constexpr, WS: gl.constexpr, PRODUCER_REGS: gl.constexpr,
    SA: gl.constexpr, PDL: gl.constexpr,
):
    """See the module docstring. GPS: groups per stage (box rows of the scales); GDIV: g when a
    stage spans several groups, else 1 << 30 (one group per stage: every local index is 0).
    WS: a one-warp TMA producer partition (warp_specialize) instead of the single-partition
    software pipeline. SA: symmetric weights with the scale applied after the MMA. PDL: launched
    as a programmatic dependent (the weight's first stages load before the wait for the previous
    grid, x and every store after it)."""
    BN: gl.constexpr = 16 * W
    acc_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[W, 1], instr_shape=[16, MT, 16])

    pid_n = gl.program_id(0)
    pid_k = gl.program_id(1)
    nsplit = gl.num_programs(1)
    row0 = pid_n * BN
    st0 = pid_k * stages_per_split
    n_it = gl.minimum(stages_per_split, n_stages - st0)

    c_ring, x_ring, s_ring, o_ring, bars, empty = allocate_rings(c_desc, x_desc, s_desc, o_desc, STAGES, NCH, DTYPE,
                                                                 HAS_ZEROS, WS)
    if WS:
        gl.warp_specialize([
            (_ws_consumer, (n_it, c_ring, x_ring, s_ring, o_ring, bars, empty, y_ptr, bias_ptr, part_ptr, cnt_ptr, M,
                            N, alpha, row0, pid_k, nsplit, acc_l, W, KH, NCH, MT, STAGES, GDIV, SPLIT, HAS_ZEROS,
                            HAS_BIAS, DTYPE, SA, PDL)),
            (_ws_producer, (n_it, st0, c_desc, x_desc, s_desc, o_desc, c_ring, x_ring, s_ring, o_ring, bars, empty,
                            row0, group, STAGES, NCH, KH, GPS, W, HAS_ZEROS, PDL)),
        ], [1], [PRODUCER_REGS])
    else:
        if PDL:   # the weight's part first, then wait for the previous grid, then x's
            for i in gl.static_range(STAGES - 1):
                if i < n_it:
                    _issue(i, st0, c_desc, x_desc, s_desc, o_desc, c_ring, x_ring, s_ring, o_ring, bars, row0, group,
                           STAGES, NCH, KH, GPS, W, HAS_ZEROS, 1)
            gdc_wait()
            for i in gl.static_range(STAGES - 1):
                if i < n_it:
                    _issue(i, st0, c_desc, x_desc, s_desc, o_desc, c_ring, x_ring, s_ring, o_ring, bars, row0, group,
                           STAGES, NCH, KH, GPS, W, HAS_ZEROS, 2)
        else:
            for i in gl.static_range(STAGES - 1):
                if i < n_it:
                    _issue(i, st0, c_desc, x_desc, s_desc, o_desc, c_ring, x_ring, s_ring, o_ring, bars, row0, group,
                           STAGES, NCH, KH, GPS, W, HAS_ZEROS)
        acc = gl.zeros([BN, MT], gl.float32, acc_l)
        for it in range(n_it):
            # Every warp is done with slot (it - 1) % STAGES (its wgmmas were waited for at the end
            # of the last iteration): refill it with stage it + STAGES - 1.
            barrier()
            nxt = it + STAGES - 1
            if nxt < n_it:
                _issue(nxt, st0, c_desc, x_desc, s_desc, o_desc, c_ring, x_ring, s_ring, o_ring, bars, row0, group,
                       STAGES, NCH, KH, GPS, W, HAS_ZEROS)
            acc = _consume_stage(acc, it, c_ring, x_ring, s_ring, o_ring, bars, acc_l, W, KH, NCH, STAGES, GDIV,
                                 HAS_ZEROS, DTYPE, SA)
        if PDL:
            gdc_launch_dependents()
        _epilogue(acc, y_ptr, bias_ptr, part_ptr, cnt_ptr, M, N, alpha, row0, pid_k, nsplit, acc_l, BN, MT, SPLIT,
                  HAS_BIAS, DTYPE)
