"""The decode kernels' pipeline (the plain kernel's and the stream-K kernel's): the ring of
shared-memory stages, the TMA loads of one stage, and the consumption of one stage (dequant and
wgmma, the scales folded into the dequant or applied after the MMA). See ``kernel.py``.
"""
import triton  # noqa: F401
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, warpgroup_mma, warpgroup_mma_wait

from ...triton_compat import reinterpret, tma_load
from ..common import DEQ_PROGRAMS, code_smem_layout, dequant_chunk, dequant_index


@gluon.jit
def issue_stage(it, st0, c_desc, x_desc, s_desc, o_desc, c_ring, x_ring, s_ring, o_ring, bars, row0, group,
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
def _stage_codes(it, c_ring, bars, W: gl.constexpr, KH: gl.constexpr, NCH: gl.constexpr, STAGES: gl.constexpr,
                 CODES: gl.constexpr = 1):
    """Wait for stage ``it``; (its slot, its codes viewed as [16 * W, NCH * KH] uint8 in the
    wgmma A-fragment order of ``code_smem_layout``; CODES: the codes' layout, see there)."""
    slot = it % STAGES
    mbarrier.wait(bars.index(slot), (it // STAGES) & 1)
    cview = reinterpret(c_ring.index(slot), gl.uint8, [16 * W, NCH * KH], code_smem_layout(W, NCH, KH, CODES))
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
                      DTYPE: gl.constexpr, CODES: gl.constexpr = 1):
    """_consume_stage for symmetric weights with the scale applied after the MMA: each chunk's
    wgmmas multiply the exact integers q - 8 into a fresh fp32 accumulator per group (one for the
    chunk when both half chunks share a group, else one per half), and acc += s * that once its
    wgmmas are done (one chunk later)."""
    BN: gl.constexpr = 16 * W
    MT: gl.constexpr = acc.shape[1]
    KC: gl.constexpr = 2 * KH
    a_l: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_l, k_width=2)
    slot, cview = _stage_codes(it, c_ring, bars, W, KH, NCH, STAGES, CODES)
    zero = gl.zeros([BN, MT], gl.float32, acc_l)
    for ch in gl.static_range(NCH):
        codes = cview.slice(ch * KH, KH, dim=1).load(a_l)
        q_lo, q_hi = gl.inline_asm_elementwise(DEQ_PROGRAMS[dequant_index(DTYPE, False, CODES)], "=r,=r,=r,=r,r",
                                               [codes],
                                               dtype=(DTYPE.value, DTYPE.value), is_pure=True, pack=4)
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
def consume_stage(acc, it, c_ring, x_ring, s_ring, o_ring, bars,
                   acc_l: gl.constexpr, W: gl.constexpr, KH: gl.constexpr, NCH: gl.constexpr,
                   STAGES: gl.constexpr, GDIV: gl.constexpr, HAS_ZEROS: gl.constexpr, DTYPE: gl.constexpr,
                   SA: gl.constexpr = False, CODES: gl.constexpr = 1):
    """Wait for stage ``it`` and add its products to acc; all its wgmmas are complete on return.
    SA: symmetric weights, scale applied after the MMA (``_consume_stage_sa``). CODES: the codes'
    layout, 1 the Gluon layout, 2 the Triton kernels' (``common.code_smem_layout``)."""
    if SA:
        acc = _consume_stage_sa(acc, it, c_ring, x_ring, s_ring, bars, acc_l, W, KH, NCH, STAGES, GDIV, DTYPE,
                                CODES)
    else:
        acc = _consume_stage_fold(acc, it, c_ring, x_ring, s_ring, o_ring, bars, acc_l, W, KH, NCH, STAGES, GDIV,
                                  HAS_ZEROS, DTYPE, CODES)
    return acc


@gluon.jit
def _consume_stage_fold(acc, it, c_ring, x_ring, s_ring, o_ring, bars,
                        acc_l: gl.constexpr, W: gl.constexpr, KH: gl.constexpr, NCH: gl.constexpr,
                        STAGES: gl.constexpr, GDIV: gl.constexpr, HAS_ZEROS: gl.constexpr, DTYPE: gl.constexpr,
                        CODES: gl.constexpr = 1):
    """_consume_stage with the scales (and offsets) folded into the dequant: q * s + o."""
    a_l: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_l, k_width=2)
    slot, cview = _stage_codes(it, c_ring, bars, W, KH, NCH, STAGES, CODES)
    for ch in gl.static_range(NCH):
        w_lo, w_hi = dequant_chunk(cview, s_ring, o_ring, slot, ch, a_l, KH, GDIV, HAS_ZEROS, DTYPE, CODES)
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
