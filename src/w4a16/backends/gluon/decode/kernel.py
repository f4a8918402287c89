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

Epilogue: alpha, bias (fp32), SiLU(gate) * up or a residual (EPI), with the rows' RMSNorm written
by the last tile to finish (EPI 3, ``common.norm_rows``), cast, masked store of y. With several K splits (SPLIT = 1)
each program writes its fp32 partial tile to ``part[split]`` and the last program of a tile to
arrive (acq_rel counter per tile, reset to 0 after) sums the partials in split order and writes
y: deterministic, one launch. SPLIT = 2 adds the partials atomically into a zeroed fp32 buffer
(the launcher then applies alpha, bias and the cast).
"""
import triton  # noqa: F401
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier

from ...triton_compat import barrier
from ..common import epilogue, gdc_launch_dependents, gdc_wait
from .pipeline import allocate_rings, consume_stage, issue_stage


@gluon.jit
def _ws_consumer(n_it, c_ring, x_ring, s_ring, o_ring, bars, empty, y_ptr, bias_ptr, res_ptr, part_ptr, cnt_ptr,
                 nw_ptr, ss_ptr, M, N, alpha, eps, row0, pid_k, nsplit, acc_l: gl.constexpr, W: gl.constexpr, KH: gl.constexpr,
                 NCH: gl.constexpr, MT: gl.constexpr, STAGES: gl.constexpr, GDIV: gl.constexpr, SPLIT: gl.constexpr,
                 HAS_ZEROS: gl.constexpr, HAS_BIAS: gl.constexpr, DTYPE: gl.constexpr, SA: gl.constexpr,
                 PDL: gl.constexpr, EPI: gl.constexpr):
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
        acc = consume_stage(acc, it, c_ring, x_ring, s_ring, o_ring, bars, acc_l, W, KH, NCH, STAGES, GDIV,
                             HAS_ZEROS, DTYPE, SA)
        mbarrier.arrive(empty.index(it % STAGES), count=1)
    epilogue(acc, y_ptr, bias_ptr, part_ptr, cnt_ptr, M, N, alpha, row0, pid_k, nsplit, acc_l, 16 * W, MT, SPLIT,
              HAS_BIAS, DTYPE, res_ptr=res_ptr, EPI=EPI, nw_ptr=nw_ptr, ss_ptr=ss_ptr,
              rc_ptr=cnt_ptr + gl.num_programs(0), eps=eps)


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
            issue_stage(it, st0, c_desc, x_desc, s_desc, o_desc, c_ring, x_ring, s_ring, o_ring, bars, row0, group,
                   STAGES, NCH, KH, GPS, W, HAS_ZEROS, 1)
        gdc_wait()
        for it in range(n_pre):
            issue_stage(it, st0, c_desc, x_desc, s_desc, o_desc, c_ring, x_ring, s_ring, o_ring, bars, row0, group,
                   STAGES, NCH, KH, GPS, W, HAS_ZEROS, 2)
    for it in range(n_pre, n_it):
        slot = it % STAGES
        mbarrier.wait(empty.index(slot), ((it // STAGES) & 1) ^ 1, pred=it >= STAGES)
        issue_stage(it, st0, c_desc, x_desc, s_desc, o_desc, c_ring, x_ring, s_ring, o_ring, bars, row0, group,
               STAGES, NCH, KH, GPS, W, HAS_ZEROS)
    if PDL:
        gdc_launch_dependents()


@gluon.jit
def w4a16_decode_kernel(
    c_desc, x_desc, s_desc, o_desc, y_ptr, bias_ptr, res_ptr, part_ptr, cnt_ptr,
    M, N, group, n_stages, stages_per_split, alpha, nw_ptr, ss_ptr, eps,
    MT: gl.constexpr, W: gl.constexpr, KH: gl.constexpr, NCH: gl.constexpr, STAGES: gl.constexpr,
    GPS: gl.constexpr, GDIV: gl.constexpr, SPLIT: gl.constexpr, HAS_ZEROS: gl.constexpr,
    HAS_BIAS: gl.constexpr, DTYPE: gl.constexpr, WS: gl.constexpr, PRODUCER_REGS: gl.constexpr,
    SA: gl.constexpr, PDL: gl.constexpr, EPI: gl.constexpr,
):
    """See the module docstring. GPS: groups per stage (box rows of the scales); GDIV: g when a
    stage spans several groups, else 1 << 30 (one group per stage: every local index is 0).
    WS: a one-warp TMA producer partition (warp_specialize) instead of the single-partition
    software pipeline. SA: symmetric weights with the scale applied after the MMA. PDL: launched
    as a programmatic dependent (the weight's first stages load before the wait for the previous
    grid, x and every store after it). EPI: the epilogue (common.store_out); res_ptr: the residual
    [M, N] with EPI 2 and 3, else None (a constexpr: no kernel parameter). EPI 3 (the residual and
    the rows' RMSNorm, y [2, M, N]): nw_ptr the norm weight [N], ss_ptr fp32 [N tiles, M] scratch,
    eps, and cnt_ptr holds one counter after the tiles' (the call's row counter, zero before and
    after); all three None otherwise."""
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
            (_ws_consumer, (n_it, c_ring, x_ring, s_ring, o_ring, bars, empty, y_ptr, bias_ptr, res_ptr, part_ptr,
                            cnt_ptr, nw_ptr, ss_ptr, M, N, alpha, eps, row0, pid_k, nsplit, acc_l, W, KH, NCH, MT, STAGES, GDIV, SPLIT,
                            HAS_ZEROS, HAS_BIAS, DTYPE, SA, PDL, EPI)),
            (_ws_producer, (n_it, st0, c_desc, x_desc, s_desc, o_desc, c_ring, x_ring, s_ring, o_ring, bars, empty,
                            row0, group, STAGES, NCH, KH, GPS, W, HAS_ZEROS, PDL)),
        ], [1], [PRODUCER_REGS])
    else:
        if PDL:   # the weight's part first, then wait for the previous grid, then x's
            for i in gl.static_range(STAGES - 1):
                if i < n_it:
                    issue_stage(i, st0, c_desc, x_desc, s_desc, o_desc, c_ring, x_ring, s_ring, o_ring, bars, row0, group,
                           STAGES, NCH, KH, GPS, W, HAS_ZEROS, 1)
            gdc_wait()
            for i in gl.static_range(STAGES - 1):
                if i < n_it:
                    issue_stage(i, st0, c_desc, x_desc, s_desc, o_desc, c_ring, x_ring, s_ring, o_ring, bars, row0, group,
                           STAGES, NCH, KH, GPS, W, HAS_ZEROS, 2)
        else:
            for i in gl.static_range(STAGES - 1):
                if i < n_it:
                    issue_stage(i, st0, c_desc, x_desc, s_desc, o_desc, c_ring, x_ring, s_ring, o_ring, bars, row0, group,
                           STAGES, NCH, KH, GPS, W, HAS_ZEROS)
        acc = gl.zeros([BN, MT], gl.float32, acc_l)
        for it in range(n_it):
            # Every warp is done with slot (it - 1) % STAGES (its wgmmas were waited for at the end
            # of the last iteration): refill it with stage it + STAGES - 1.
            barrier()
            nxt = it + STAGES - 1
            if nxt < n_it:
                issue_stage(nxt, st0, c_desc, x_desc, s_desc, o_desc, c_ring, x_ring, s_ring, o_ring, bars, row0, group,
                       STAGES, NCH, KH, GPS, W, HAS_ZEROS)
            acc = consume_stage(acc, it, c_ring, x_ring, s_ring, o_ring, bars, acc_l, W, KH, NCH, STAGES, GDIV,
                                 HAS_ZEROS, DTYPE, SA)
        if PDL:
            gdc_launch_dependents()
        epilogue(acc, y_ptr, bias_ptr, part_ptr, cnt_ptr, M, N, alpha, row0, pid_k, nsplit, acc_l, BN, MT, SPLIT,
                  HAS_BIAS, DTYPE, res_ptr=res_ptr, EPI=EPI, nw_ptr=nw_ptr, ss_ptr=ss_ptr,
                  rc_ptr=cnt_ptr + gl.num_programs(0), eps=eps)
