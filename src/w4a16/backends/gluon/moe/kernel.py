"""The Gluon mixture-of-experts decode kernel for Hopper (sm_90a): one token's expert layer in two
launches, straight from the experts' codes in the Triton kernels' layout (no second copy).

The experts of a projection are one weight [E * R, K] (R rows per expert) in the Triton layout
(``backends/triton/layout.py``, version 2; ``w4a16.moe.QuantizedExperts``): per block of 16 rows
and chunk of K the same fragment bytes as the Gluon layout in another order, which the consumer
reads through ``code_smem_layout(..., CODES=2)`` and one ``prmt`` per word. Symmetric weights only
(the Triton layout keeps zero points as z, the Gluon dequant wants -z * s).

The pipeline is the decode kernel's (``decode/pipeline.py``: a ring of STAGES slots filled by a
one-warp TMA producer partition, the consumer warpgroup's dequant and register-A wgmmas, swap-AB
with the token as the wgmma N of 8); what differs is which rows a program reads and where its
result goes. Token x [1, H], the router's ids [k] and weights [k]; pair j is the token's j-th
choice, expert e_j = ids[j] (an id outside [0, E) reads nothing and contributes zero):

- GATE_UP: gate_up weight [E * 2I, H] (gate rows, then up rows, per expert). Program
  (j * I / BN + t, s) of the grid (k * I / BN, KSPLIT) computes gate rows t * BN .. and the same
  up rows of expert e_j over the s-th K range (a ring for each, filled by the same loads' barrier:
  two accumulators of one layout) and writes h[j, t * BN + i] = SiLU(gate) * up (each rounded to
  the activation dtype first, as the unfused layer stores them) into h [k, I]; with KSPLIT > 1
  (SPLIT 1) the last of a tile's programs to arrive sums the gate and up partials in split order
  first (``_split_silu_mul_store``: deterministic), so a small layer's grid can fill the GPU.
- DOWN: down weight [E * H, I]. Program (n, j * KSPLIT + s) of the grid (H / BN, k * KSPLIT)
  computes rows n * BN .. of expert e_j over the s-th K range, from x row j (h [k, I]), times the
  routing weight w_j; the k * KSPLIT partial tiles of an output tile are summed in split order by
  the last program to arrive (``common.epilogue``, SPLIT 1: deterministic), which writes y [1, H]:
  the weighted sum over the k choices needs no combine kernel.

PDL (DOWN): launched as a programmatic dependent of the gate_up launch. Its ids and weights were
written before the gate_up launch began, so they and the first stages of the expert's weight are
read before ``griddepcontrol.wait``; h, the partials and y after it. Both launches let their
dependents start once their loads are issued.
"""
import triton  # noqa: F401
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier

from ...triton_compat import tma_load
from ..common import epilogue, gdc_launch_dependents, gdc_wait, split_arrive, split_release
from ..decode.pipeline import consume_stage


@gluon.jit
def _issue(it, st0, c_desc, x_desc, s_desc, c_ring, c_up, x_ring, s_ring, s_up, bars, row_a, row_b, x_row, group,
           STAGES: gl.constexpr, NCH: gl.constexpr, KH: gl.constexpr, GATE_UP: gl.constexpr, PART: gl.constexpr = 0):
    """TMA loads of the program's stage ``it`` (global stage st0 + it) into slot it % STAGES: the
    codes and scales of rows from row_a (and with GATE_UP those of rows from row_b into the up
    rings), and x. PART 0: everything; 1: the weight's part (the barrier expects the whole stage);
    2: x's part."""
    KS: gl.constexpr = NCH * 2 * KH
    slot = it % STAGES
    bar = bars.index(slot)
    k0 = (st0 + it) * KS
    g0 = k0 // group
    if PART != 2:
        NW: gl.constexpr = (2 if GATE_UP else 1) * (c_desc.block_type.nbytes + s_desc.block_type.nbytes)
        mbarrier.expect(bar, NW + 2 * NCH * x_desc.block_type.nbytes)
        tma_load(c_desc, [row_a // 16, k0 // 32, 0], bar, c_ring.index(slot))
        tma_load(s_desc, [g0, row_a], bar, s_ring.index(slot))
        if GATE_UP:
            tma_load(c_desc, [row_b // 16, k0 // 32, 0], bar, c_up.index(slot))
            tma_load(s_desc, [g0, row_b], bar, s_up.index(slot))
    if PART != 1:
        for j in gl.static_range(2 * NCH):
            tma_load(x_desc, [x_row, k0 + j * KH], bar, x_ring.index(slot * 2 * NCH + j))


@gluon.jit
def _producer(n_it, st0, c_desc, x_desc, s_desc, c_ring, c_up, x_ring, s_ring, s_up, bars, empty, row_a, row_b,
              x_row, group, STAGES: gl.constexpr, NCH: gl.constexpr, KH: gl.constexpr, GATE_UP: gl.constexpr,
              PDL: gl.constexpr):
    """Worker partition (one warp): the loads of every stage once its slot is free; with PDL the
    weight's part of the first STAGES stages before waiting for the previous grid. Dependents may
    launch once every load is issued."""
    n_pre = 0
    if PDL:
        n_pre = gl.minimum(n_it, STAGES)
        for it in range(n_pre):
            _issue(it, st0, c_desc, x_desc, s_desc, c_ring, c_up, x_ring, s_ring, s_up, bars, row_a, row_b, x_row,
                   group, STAGES, NCH, KH, GATE_UP, 1)
        gdc_wait()
        for it in range(n_pre):
            _issue(it, st0, c_desc, x_desc, s_desc, c_ring, c_up, x_ring, s_ring, s_up, bars, row_a, row_b, x_row,
                   group, STAGES, NCH, KH, GATE_UP, 2)
    for it in range(n_pre, n_it):
        slot = it % STAGES
        mbarrier.wait(empty.index(slot), ((it // STAGES) & 1) ^ 1, pred=it >= STAGES)
        _issue(it, st0, c_desc, x_desc, s_desc, c_ring, c_up, x_ring, s_ring, s_up, bars, row_a, row_b, x_row,
               group, STAGES, NCH, KH, GATE_UP)
    gdc_launch_dependents()


@gluon.jit
def _silu_mul_store(acc, acc_u, h_ptr, col0, acc_l: gl.constexpr, BN: gl.constexpr, MT: gl.constexpr,
                    DTYPE: gl.constexpr):
    """h[col0 + i] = SiLU(gate_i) * up_i for the token (column 0 of the gate and up tiles [BN, MT]),
    each rounded to DTYPE first."""
    gate = acc.to(DTYPE).to(gl.float32)
    up = acc_u.to(DTYPE).to(gl.float32)
    h = gate / (1.0 + gl.exp(-gate)) * up
    rows = gl.arange(0, BN, layout=gl.SliceLayout(1, acc_l))
    cols = gl.arange(0, MT, layout=gl.SliceLayout(0, acc_l))
    offs = gl.expand_dims(col0 + rows, 1) + gl.expand_dims(cols, 0) * 0
    gl.store(h_ptr + offs, h.to(DTYPE), mask=gl.expand_dims(cols == 0, 0) & gl.expand_dims(rows >= 0, 1))


@gluon.jit
def _split_silu_mul_store(acc, acc_u, h_ptr, part_ptr, cnt_ptr, col0, pid_k, nsplit, acc_l: gl.constexpr,
                          BN: gl.constexpr, MT: gl.constexpr, DTYPE: gl.constexpr):
    """This K range's gate and up partials (the token's column of the tiles [BN, MT]) into
    part [nsplit, units, 2, BN] fp32 at unit = program_id(0); the tile's counter (``cnt_ptr +
    unit``) counts arrivals, and the last of ``nsplit`` sums both in split order, resets the
    counter and stores SiLU(gate) * up (``_silu_mul_store``)."""
    unit = gl.program_id(0)
    n_units = gl.num_programs(0)
    rows = gl.arange(0, BN, layout=gl.SliceLayout(1, acc_l))
    cols = gl.arange(0, MT, layout=gl.SliceLayout(0, acc_l))
    offs = gl.expand_dims(rows, 1) + gl.expand_dims(cols, 0) * 0
    mask = gl.expand_dims(cols == 0, 0) & gl.expand_dims(rows >= 0, 1)
    mine = part_ptr + (pid_k * n_units + unit) * (2 * BN)
    gl.store(mine + offs, acc, mask=mask)
    gl.store(mine + BN + offs, acc_u, mask=mask)
    if split_arrive(cnt_ptr + unit, nsplit):
        gate = gl.zeros([BN, MT], gl.float32, acc_l)
        up = gl.zeros([BN, MT], gl.float32, acc_l)
        for s in range(0, nsplit):
            theirs = part_ptr + (s * n_units + unit) * (2 * BN)
            gate += gl.load(theirs + offs, mask=mask, other=0.0, cache_modifier=".cg")
            up += gl.load(theirs + BN + offs, mask=mask, other=0.0, cache_modifier=".cg")
        split_release(cnt_ptr + unit)
        _silu_mul_store(gate, up, h_ptr, col0, acc_l, BN, MT, DTYPE)


@gluon.jit
def _consumer(n_it, c_ring, c_up, x_ring, s_ring, s_up, bars, empty, y_ptr, part_ptr, cnt_ptr, n_out, col0, wj,
              pid_k, nsplit, acc_l: gl.constexpr, W: gl.constexpr, KH: gl.constexpr, NCH: gl.constexpr,
              MT: gl.constexpr, STAGES: gl.constexpr, GDIV: gl.constexpr, DTYPE: gl.constexpr, SA: gl.constexpr,
              GATE_UP: gl.constexpr, SPLIT: gl.constexpr, PDL: gl.constexpr):
    """Default partition: dequant + wgmma of every stage (the gate and up rings with GATE_UP),
    handing each slot back, then the epilogue: GATE_UP SiLU(gate) * up into h (SPLIT 1: after the
    split sum of both); else w_j times the tile into the split sum of y."""
    if PDL:
        gdc_wait()
    acc = gl.zeros([16 * W, MT], gl.float32, acc_l)
    acc_u = gl.zeros([16 * W, MT], gl.float32, acc_l)
    for it in range(n_it):
        acc = consume_stage(acc, it, c_ring, x_ring, s_ring, s_ring, bars, acc_l, W, KH, NCH, STAGES, GDIV, False,
                            DTYPE, SA, 2)
        if GATE_UP:
            acc_u = consume_stage(acc_u, it, c_up, x_ring, s_up, s_up, bars, acc_l, W, KH, NCH, STAGES, GDIV, False,
                                  DTYPE, SA, 2)
        mbarrier.arrive(empty.index(it % STAGES), count=1)
    if GATE_UP:
        if SPLIT == 1:
            _split_silu_mul_store(acc, acc_u, y_ptr, part_ptr, cnt_ptr, col0, pid_k, nsplit, acc_l, 16 * W, MT, DTYPE)
        else:
            _silu_mul_store(acc, acc_u, y_ptr, col0, acc_l, 16 * W, MT, DTYPE)
    else:
        epilogue(acc * wj, y_ptr, y_ptr, part_ptr, cnt_ptr, 1, n_out, 1.0, col0, pid_k, nsplit, acc_l, 16 * W, MT,
                 SPLIT, False, DTYPE)


@gluon.jit
def w4a16_moe_decode_kernel(
    c_desc, x_desc, s_desc, y_ptr, ids_ptr, tw_ptr, part_ptr, cnt_ptr,
    rows_per_expert, n_out, num_experts, group, n_stages, stages_per_split, ksplit, tiles,
    MT: gl.constexpr, W: gl.constexpr, KH: gl.constexpr, NCH: gl.constexpr, STAGES: gl.constexpr,
    GDIV: gl.constexpr, DTYPE: gl.constexpr, SA: gl.constexpr, GATE_UP: gl.constexpr, SPLIT: gl.constexpr,
    PDL: gl.constexpr, PRODUCER_REGS: gl.constexpr,
):
    """See the module docstring. c_desc: codes [E * R / 16, K_pad / 32, 256] in boxes of W row
    blocks; s_desc: scales [G, E * R] in boxes [1, BN] (one scale row per stage); x_desc: x [1, H]
    (GATE_UP) or h [k, I], boxes [MT, KH] (symmetric weights: no offsets). y_ptr: h [k, I]
    (GATE_UP) or y [1, H]; part_ptr: fp32 partials (SPLIT 1), [ksplit, k * I / BN, 2, BN]
    (GATE_UP) or [k * ksplit, H]; cnt_ptr: a zeroed int32 counter per output tile. n_stages: the
    K stages of 128 values; stages_per_split: those of a K range; rows_per_expert: R; n_out: I
    (GATE_UP) or H; tiles: I / BN (GATE_UP)."""
    BN: gl.constexpr = 16 * W
    acc_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[W, 1], instr_shape=[16, MT, 16])
    KS: gl.constexpr = NCH * 2 * KH
    pid_n = gl.program_id(0)
    pid_k = gl.program_id(1)
    if GATE_UP:
        j = pid_n // tiles
        col0 = (pid_n - j * tiles) * BN
        e = gl.load(ids_ptr + j).to(gl.int32)
        row_a = e * rows_per_expert + col0
        row_b = row_a + rows_per_expert // 2
        x_row = 0
        st0 = pid_k * stages_per_split
        n_it = gl.minimum(stages_per_split, n_stages - st0)
        y_out = y_ptr + j * n_out
        wj = 1.0
    else:
        j = pid_k // ksplit
        col0 = pid_n * BN
        e = gl.load(ids_ptr + j).to(gl.int32)
        row_a = e * rows_per_expert + col0
        row_b = row_a
        x_row = j
        st0 = (pid_k - j * ksplit) * stages_per_split
        n_it = gl.minimum(stages_per_split, n_stages - st0)
        y_out = y_ptr
        wj = gl.load(tw_ptr + j).to(gl.float32)
    ok = (e >= 0) & (e < num_experts)      # else a choice another rank owns: no loads, a zero contribution
    n_it = gl.where(ok, n_it, 0)
    if not GATE_UP:
        wj = gl.where(ok, wj, 0.0)

    c_ring = gl.allocate_shared_memory(gl.uint8, [STAGES, W, KS // 32, 256], c_desc.layout)
    x_ring = gl.allocate_shared_memory(DTYPE, [STAGES * 2 * NCH] + x_desc.block_type.shape, x_desc.layout)
    s_ring = gl.allocate_shared_memory(DTYPE, [STAGES, 1, BN], s_desc.layout)
    if GATE_UP:   # the up rows' codes and scales (each TMA destination 128-byte aligned)
        c_up = gl.allocate_shared_memory(gl.uint8, [STAGES, W, KS // 32, 256], c_desc.layout)
        s_up = gl.allocate_shared_memory(DTYPE, [STAGES, 1, BN], s_desc.layout)
    else:
        c_up = c_ring
        s_up = s_ring
    bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(bars.index(i), count=1)
        mbarrier.init(empty.index(i), count=1)
    gl.warp_specialize([
        (_consumer, (n_it, c_ring, c_up, x_ring, s_ring, s_up, bars, empty, y_out, part_ptr, cnt_ptr, n_out, col0,
                     wj, pid_k, gl.num_programs(1), acc_l, W, KH, NCH, MT, STAGES, GDIV, DTYPE, SA, GATE_UP, SPLIT,
                     PDL)),
        (_producer, (n_it, st0, c_desc, x_desc, s_desc, c_ring, c_up, x_ring, s_ring, s_up, bars, empty, row_a,
                     row_b, x_row, group, STAGES, NCH, KH, GATE_UP, PDL)),
    ], [1], [PRODUCER_REGS])
