"""The Gluon decode kernel with a stream-K schedule (persistent, one pipeline per program).

The plain decode kernel (``kernel.py``) runs one program per (N tile, K split); when the programs
do not fill a whole number of waves the last wave runs part-empty (70B gate_up at M = 1: 896
tiles on 396 resident programs, 2.26 waves), and a small layer's programs stream only a few
stages each, paying the pipeline's fill per program. Here the grid is exactly the programs that
fit on the GPU at once (P), the N tiles x K stages form U = n_tiles * n_stages units in tile-major
order, and program p takes units [p * U // P, (p + 1) * U // P): every program streams the same
number of stages, and its producer warp keeps loading across tile boundaries while the consumers
finish a tile.

A tile covered by one program is stored directly (alpha, bias, cast). A tile shared by several
programs (only a program's first and last tile can be) gets each one's fp32 partial in slot
2 * p (the program's first tile) or 2 * p + 1 (its last) of ``part`` [2 * P, M, BN]; an acq_rel
counter per tile counts arrivals, and the last program to arrive sums the partials in program
order (deterministic: the same sum whoever arrives last), stores y and resets the counter to 0.
The host guarantees P <= U and U * P < 2^31 (32-bit unit arithmetic).
"""
import triton  # noqa: F401
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier

from ..common import epilogue, gdc_launch_dependents, gdc_wait, split_arrive, split_release
from .pipeline import allocate_rings, consume_stage, issue_stage


@gluon.jit
def _sk_producer(u0, u1, n_stages, c_desc, x_desc, s_desc, o_desc, c_ring, x_ring, s_ring, o_ring, bars, empty,
                 group, STAGES: gl.constexpr, NCH: gl.constexpr, KH: gl.constexpr, GPS: gl.constexpr,
                 W: gl.constexpr, HAS_ZEROS: gl.constexpr, PDL: gl.constexpr):
    """Worker partition (one warp): TMA loads of units u0..u1-1, tile after tile, each once its
    slot is free. PDL: as the plain kernel's producer (the weight's part of the first STAGES
    units before waiting for the previous grid)."""
    n_pre = 0
    if PDL:
        n_pre = gl.minimum(u1 - u0, STAGES)
        for it in range(n_pre):
            t = (u0 + it) // n_stages
            issue_stage(it, u0 - t * n_stages, c_desc, x_desc, s_desc, o_desc, c_ring, x_ring, s_ring, o_ring,
                   bars, t * 16 * W, group, STAGES, NCH, KH, GPS, W, HAS_ZEROS, 1)
        gdc_wait()
        for it in range(n_pre):
            t = (u0 + it) // n_stages
            issue_stage(it, u0 - t * n_stages, c_desc, x_desc, s_desc, o_desc, c_ring, x_ring, s_ring, o_ring,
                   bars, t * 16 * W, group, STAGES, NCH, KH, GPS, W, HAS_ZEROS, 2)
    it = 0
    for t in range(u0 // n_stages, (u1 - 1) // n_stages + 1):
        ts = t * n_stages
        for kk in range(gl.maximum(u0 - ts, 0), gl.minimum(u1 - ts, n_stages)):
            if it >= n_pre:
                slot = it % STAGES
                mbarrier.wait(empty.index(slot), ((it // STAGES) & 1) ^ 1, pred=it >= STAGES)
                # issue_stage loads K stage st0 + it into slot it % STAGES
                issue_stage(it, kk - it, c_desc, x_desc, s_desc, o_desc, c_ring, x_ring, s_ring, o_ring, bars, t * 16 * W,
                       group, STAGES, NCH, KH, GPS, W, HAS_ZEROS)
            it += 1
    if PDL:
        gdc_launch_dependents()


@gluon.jit
def _sk_tile_done(acc, t, kb, ke, u0, n_stages, n_units, y_ptr, bias_ptr, res_ptr, part_ptr, cnt_ptr, M, N, alpha,
                  acc_l: gl.constexpr, BN: gl.constexpr, MT: gl.constexpr, HAS_BIAS: gl.constexpr,
                  DTYPE: gl.constexpr, EPI: gl.constexpr):
    """Tile t's stages kb..ke-1 are in acc [BN, MT] fp32: store y, or hand over the partial (see
    the module docstring)."""
    row0 = t * BN
    if (kb == 0) & (ke == n_stages):
        epilogue(acc, y_ptr, bias_ptr, part_ptr, cnt_ptr, M, N, alpha, row0, 0, 1, acc_l, BN, MT, 0,
                  HAS_BIAS, DTYPE, res_ptr=res_ptr, EPI=EPI)
    else:
        P = gl.num_programs(0)
        offs_n = gl.arange(0, BN, layout=gl.SliceLayout(1, acc_l))
        offs_m = gl.arange(0, MT, layout=gl.SliceLayout(0, acc_l))
        mask = gl.expand_dims(row0 + offs_n < N, 1) & gl.expand_dims(offs_m < M, 0)
        offs = gl.expand_dims(offs_m, 0) * BN + gl.expand_dims(offs_n, 1)
        mine = 2 * gl.program_id(0) + (t != u0 // n_stages).to(gl.int32)
        gl.store(part_ptr + mine * (M * BN) + offs, acc, mask=mask)
        ts = t * n_stages
        first = ((ts + 1) * P - 1) // n_units            # the program holding unit ts
        last = ((ts + n_stages) * P - 1) // n_units      # ... and unit ts + n_stages - 1
        if split_arrive(cnt_ptr + t, last - first + 1):
            total = gl.zeros([BN, MT], gl.float32, acc_l)
            for q in range(first, last + 1):
                qs = 2 * q + ((q * n_units // P) // n_stages != t).to(gl.int32)
                total += gl.load(part_ptr + qs * (M * BN) + offs, mask=mask, other=0.0, cache_modifier=".cg")
            split_release(cnt_ptr + t)
            epilogue(total, y_ptr, bias_ptr, part_ptr, cnt_ptr, M, N, alpha, row0, 0, 1, acc_l, BN, MT, 0,
                      HAS_BIAS, DTYPE, res_ptr=res_ptr, EPI=EPI)


@gluon.jit
def _sk_consumer(u0, u1, n_stages, n_units, c_ring, x_ring, s_ring, o_ring, bars, empty, y_ptr, bias_ptr, res_ptr,
                 part_ptr, cnt_ptr, M, N, alpha, acc_l: gl.constexpr, W: gl.constexpr, KH: gl.constexpr,
                 NCH: gl.constexpr, MT: gl.constexpr, STAGES: gl.constexpr, GDIV: gl.constexpr,
                 HAS_ZEROS: gl.constexpr, HAS_BIAS: gl.constexpr, DTYPE: gl.constexpr, SA: gl.constexpr,
                 PDL: gl.constexpr, EPI: gl.constexpr):
    """Default partition: dequant + wgmma of units u0..u1-1; each tile's epilogue as it ends
    (PDL: after the grids this one depends on)."""
    if PDL:
        gdc_wait()
    it = 0
    for t in range(u0 // n_stages, (u1 - 1) // n_stages + 1):
        ts = t * n_stages
        kb = gl.maximum(u0 - ts, 0)
        ke = gl.minimum(u1 - ts, n_stages)
        acc = gl.zeros([16 * W, MT], gl.float32, acc_l)
        for kk in range(kb, ke):
            acc = consume_stage(acc, it, c_ring, x_ring, s_ring, o_ring, bars, acc_l, W, KH, NCH, STAGES, GDIV,
                                 HAS_ZEROS, DTYPE, SA)
            mbarrier.arrive(empty.index(it % STAGES), count=1)
            it += 1
        _sk_tile_done(acc, t, kb, ke, u0, n_stages, n_units, y_ptr, bias_ptr, res_ptr, part_ptr, cnt_ptr, M, N, alpha,
                      acc_l, 16 * W, MT, HAS_BIAS, DTYPE, EPI)


@gluon.jit
def w4a16_decode_sk_kernel(
    c_desc, x_desc, s_desc, o_desc, y_ptr, bias_ptr, res_ptr, part_ptr, cnt_ptr,
    M, N, group, n_stages, n_units, alpha, nw_ptr, ss_ptr, eps,
    MT: gl.constexpr, W: gl.constexpr, KH: gl.constexpr, NCH: gl.constexpr, STAGES: gl.constexpr,
    GPS: gl.constexpr, GDIV: gl.constexpr, SPLIT: gl.constexpr, HAS_ZEROS: gl.constexpr,
    HAS_BIAS: gl.constexpr, DTYPE: gl.constexpr, WS: gl.constexpr, PRODUCER_REGS: gl.constexpr,
    SA: gl.constexpr, PDL: gl.constexpr, EPI: gl.constexpr,
):
    """The decode kernel's arguments (``kernel.w4a16_decode_kernel``), with n_units = n_tiles *
    n_stages in place of stages_per_split; part_ptr: fp32 [2 * P, M, BN]; cnt_ptr: int32
    [n_tiles], zero before and after. SPLIT, WS, nw_ptr, ss_ptr and eps are accepted for the
    common signature (the schedule is always stream-K with a producer warp; the RMSNorm epilogue,
    EPI 3, is not built here: its registers spill in the tile loop, GluonDecodeConfig.norm_epilogue)."""
    acc_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[W, 1], instr_shape=[16, MT, 16])
    P = gl.num_programs(0)
    pid = gl.program_id(0)
    u0 = pid * n_units // P
    u1 = (pid + 1) * n_units // P

    c_ring, x_ring, s_ring, o_ring, bars, empty = allocate_rings(c_desc, x_desc, s_desc, o_desc, STAGES, NCH, DTYPE,
                                                                 HAS_ZEROS, True)

    gl.warp_specialize([
        (_sk_consumer, (u0, u1, n_stages, n_units, c_ring, x_ring, s_ring, o_ring, bars, empty, y_ptr, bias_ptr,
                        res_ptr, part_ptr, cnt_ptr, M, N, alpha, acc_l, W, KH, NCH, MT, STAGES, GDIV, HAS_ZEROS,
                        HAS_BIAS, DTYPE, SA, PDL, EPI)),
        (_sk_producer, (u0, u1, n_stages, c_desc, x_desc, s_desc, o_desc, c_ring, x_ring, s_ring, o_ring, bars, empty,
                        group, STAGES, NCH, KH, GPS, W, HAS_ZEROS, PDL)),
    ], [1], [PRODUCER_REGS])
