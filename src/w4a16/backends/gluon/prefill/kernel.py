"""The Gluon W4A16 prefill kernel for Hopper (sm_90a): persistent, warp-specialized, two consumer
warpgroups in ping-pong, swap-AB wgmma with the dequantized weight as the register-A operand.

Same weight layout as the decode kernel (``layout.py``, version 1: one prepared copy serves both).

A program tile is out^T[2 * BN, MT] = W[2 * BN, K] @ x^T[K, MT] for MT tokens (the wgmma N: 64, 128
or 256) and 2 * BN weight rows; consumer warpgroup c (c = 0, 1) owns rows [c * BN, (c + 1) * BN)
of it: its own fp32 accumulator [BN, MT], its own epilogue. Partitions (``warp_specialize``):

- consumer 0 (the default partition, 4 warps), consumer 1 (a 4-warp worker) and the one-warp TMA
  producer (its warpgroup padded to 4 warps by Gluon: 12 warps in all). The launch holds 168
  registers per thread (12 x 32 x 168 <= 64K); the producer's warpgroup gives them back down to 40
  (setmaxnreg) and both consumers rise to 232 (the worker asks for CONSUMER_REGS, the default
  partition gets what is left): the dequant + a [64, 128] fp32 accumulator + the A registers of
  two chunks fit without spills, and ptxas puts no wait between the HGMMAs.
- The producer walks the program's tiles (persistent grid, grouped raster order) and K, and fills
  a ring of STAGES slots: per slot the codes of each warpgroup's rows (one 3-D box [BN / 16, KS / 32,
  256] each), x (2 * NCH boxes [MT, KH], shared by both warpgroups) and the scales (and offsets) of
  each warpgroup's rows; one "full" mbarrier per slot carries all of them. A slot is refilled once
  both consumers have arrived on its "empty" mbarrier (count 2).
- Each consumer, per stage: wait for the slot, per chunk one LDS.128 per 64 rows of its own A
  fragment, the dequant (``dequant_ptx.py``'s inline PTX, 13 instructions per 8 weights in fp16), two
  async wgmmas (low and high half chunk). With PINGPONG the first wgmma of a stage waits on the
  warpgroup's "turn" mbarrier, and once the stage's last wgmma is issued the warpgroup arrives on
  the other's: the two wgmma chains alternate, and each warpgroup's dequant of its next stage runs
  while the other's chain keeps the tensor cores busy (CUTLASS's ping-pong schedule at stage
  granularity). HOLD keeps a chunk's A registers alive until the next chunk's wgmmas are issued
  (``warpgroup_mma_wait(2)`` with the previous A as deps: the register-A hazard of triton issue 9433
  cannot bite); without HOLD each chunk waits for its own wgmmas. A stage ends with
  ``warpgroup_mma_wait(0)`` before the slot is released.
- Epilogue per consumer and tile: alpha, bias, cast, masked store of y [M, N] (``common.epilogue``
  on the tile's rows and tokens); it overlaps the other warpgroup's main loop.
"""
import triton  # noqa: F401
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, warpgroup_mma, warpgroup_mma_wait

from ...triton_compat import reinterpret, tma_load
from ..common import code_smem_layout, dequant_chunk, epilogue


@gluon.jit
def _tile_coords(t, n_tn, n_tm, GROUP_N: gl.constexpr):
    """(row tile, token tile) of linear tile index t: groups of GROUP_N row tiles, token tiles
    inner-major within a group (programs running together share weight rows and tokens in L2)."""
    width = GROUP_N * n_tm
    gid = t // width
    first = gid * GROUP_N
    gsize = gl.minimum(n_tn - first, GROUP_N)
    r = t % width
    return first + r % gsize, r // gsize


@gluon.jit
def _items(n_work, n_k, kps, STREAM: gl.constexpr):
    """(first, end) of this program's work items; they are visited with the step :func:`_step`.
    STREAM: the tiles that the program's run of K stages [pid * kps, (pid + 1) * kps) touches (the
    tiles' stages laid end to end, n_work tiles of n_k stages); else every num_programs-th item."""
    if STREAM:
        start = gl.program_id(0) * kps
        end = gl.minimum(start + kps, n_work * n_k)
        return start // n_k, (end + n_k - 1) // n_k
    else:
        return gl.program_id(0), n_work


@gluon.jit
def _step(STREAM: gl.constexpr):
    """The stride between a program's work items (1: stream-K's consecutive tiles)."""
    if STREAM:
        return 1
    else:
        return gl.num_programs(0)


@gluon.jit
def _work(w, n_split, kps, n_k, SPLIT: gl.constexpr, STREAM: gl.constexpr):
    """(tile, piece, first K stage, end K stage, pieces) of work item w. SPLIT: the n_split K
    ranges of one tile are consecutive items (a piece each). STREAM: item w is tile w, of which this
    program runs the stages inside its run (``_items``); the tile's pieces are the runs of the
    programs that share it, in program order. Else one item per tile, all of K, one piece."""
    if STREAM:
        start = gl.program_id(0) * kps
        first = (w * n_k) // kps
        last = ((w + 1) * n_k - 1) // kps
        return (w, gl.program_id(0) - first, gl.maximum(start - w * n_k, 0),
                gl.minimum(start + kps - w * n_k, n_k), last - first + 1)
    else:
        if SPLIT:
            t = w // n_split
            s = w - t * n_split
            k_lo = s * kps
            return t, s, k_lo, gl.minimum(k_lo + kps, n_k), n_split
        else:
            return w, 0, 0, n_k, 1


@gluon.jit
def _pf_producer(n_work, n_tn, n_tm, n_k, n_split, kps, c_desc, x_desc, s_desc, o_desc, c0, c1, x_ring, s0, s1, o0,
                 o1, full, empty, group, BN: gl.constexpr, MT: gl.constexpr, STAGES: gl.constexpr, NCH: gl.constexpr,
                 KH: gl.constexpr, GROUP_N: gl.constexpr, HAS_ZEROS: gl.constexpr, SPLIT: gl.constexpr,
                 STREAM: gl.constexpr):
    """Worker partition (one warp): TMA loads of every stage of every tile of the program."""
    KS: gl.constexpr = NCH * 2 * KH
    RB: gl.constexpr = BN // 16
    NB: gl.constexpr = 2 * c_desc.block_type.nbytes + 2 * NCH * x_desc.block_type.nbytes + 2 * s_desc.block_type.nbytes
    NBZ: gl.constexpr = NB + 2 * o_desc.block_type.nbytes
    it = 0
    w_lo, w_end = _items(n_work, n_k, kps, STREAM)
    for w in range(w_lo, w_end, _step(STREAM)):
        t, piece, k_lo, k_hi, pieces = _work(w, n_split, kps, n_k, SPLIT, STREAM)
        pid_n, pid_m = _tile_coords(t, n_tn, n_tm, GROUP_N)
        row0 = pid_n * 2 * BN
        tok0 = pid_m * MT
        for kk in range(k_lo, k_hi):
            slot = it % STAGES
            mbarrier.wait(empty.index(slot), ((it // STAGES) & 1) ^ 1, pred=it >= STAGES)
            bar = full.index(slot)
            if HAS_ZEROS:
                mbarrier.expect(bar, NBZ)
            else:
                mbarrier.expect(bar, NB)
            k0 = kk * KS
            tma_load(c_desc, [row0 // 16, k0 // 32, 0], bar, c0.index(slot))
            tma_load(c_desc, [row0 // 16 + RB, k0 // 32, 0], bar, c1.index(slot))
            for j in gl.static_range(2 * NCH):
                tma_load(x_desc, [tok0, k0 + j * KH], bar, x_ring.index(slot * 2 * NCH + j))
            g0 = k0 // group
            tma_load(s_desc, [g0, row0], bar, s0.index(slot))
            tma_load(s_desc, [g0, row0 + BN], bar, s1.index(slot))
            if HAS_ZEROS:
                tma_load(o_desc, [g0, row0], bar, o0.index(slot))
                tma_load(o_desc, [g0, row0 + BN], bar, o1.index(slot))
            it += 1


@gluon.jit
def _pf_stage(acc, it, c_ring, x_ring, s_ring, o_ring, full, empty, turn_mine, turn_other,
              acc_l: gl.constexpr, BN: gl.constexpr, KH: gl.constexpr, NCH: gl.constexpr, STAGES: gl.constexpr,
              GDIV: gl.constexpr, HAS_ZEROS: gl.constexpr, DTYPE: gl.constexpr, WG: gl.constexpr,
              PINGPONG: gl.constexpr, HOLD: gl.constexpr):
    """One stage of one consumer warpgroup: wait for the slot, dequant + wgmma every chunk (taking
    its turn before the first wgmma), hand the turn over, wait for its wgmmas, release the slot."""
    a_l: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_l, k_width=2)
    cview_l: gl.constexpr = code_smem_layout(BN // 16, NCH, KH)
    slot = it % STAGES
    mbarrier.wait(full.index(slot), (it // STAGES) & 1)
    cview = reinterpret(c_ring.index(slot), gl.uint8, [BN, NCH * KH], cview_l)
    for ch in gl.static_range(NCH):
        w_lo, w_hi = dequant_chunk(cview, s_ring, o_ring, slot, ch, a_l, KH, GDIV, HAS_ZEROS, DTYPE)
        if PINGPONG:
            if ch == 0:
                # my turn: the other warpgroup has issued its wgmmas of the previous stage
                if WG == 0:
                    mbarrier.wait(turn_mine, (it & 1) ^ 1, pred=it > 0)
                else:
                    mbarrier.wait(turn_mine, it & 1)
        xb = slot * 2 * NCH + 2 * ch
        acc = warpgroup_mma(w_lo, x_ring.index(xb).permute((1, 0)), acc, is_async=True)
        acc = warpgroup_mma(w_hi, x_ring.index(xb + 1).permute((1, 0)), acc, is_async=True)
        if HOLD:
            if ch > 0:
                # the previous chunk's wgmmas are done: its A registers may be reused
                acc, p_lo, p_hi = warpgroup_mma_wait(num_outstanding=2, deps=(acc, prev_lo, prev_hi))
            prev_lo = w_lo
            prev_hi = w_hi
        else:
            acc, p_lo, p_hi = warpgroup_mma_wait(num_outstanding=0, deps=(acc, w_lo, w_hi))
    if PINGPONG:
        mbarrier.arrive(turn_other, count=1)
    if HOLD:
        acc, p_lo, p_hi = warpgroup_mma_wait(num_outstanding=0, deps=(acc, prev_lo, prev_hi))
    mbarrier.arrive(empty.index(slot), count=1)
    return acc


@gluon.jit
def _halves(acc, BN: gl.constexpr, MT: gl.constexpr):
    """acc [BN, MT] -> (tokens [0, MT/2), tokens [MT/2, MT)): the high token bit is a register bit of
    the wgmma accumulator layout, so this is free."""
    return gl.split(acc.reshape([BN, 2, MT // 2]).permute((0, 2, 1)))


@gluon.jit
def _y_at(y_ptr, tok0, N, EPI: gl.constexpr):
    """y's pointer at token tok0: its rows are N / 2 long with EPI 1 (silu_mul), N otherwise."""
    if EPI == 1:
        y0 = y_ptr + tok0 * (N // 2)
    else:
        y0 = y_ptr + tok0 * N
    return y0


@gluon.jit
def _pf_store(part, y_ptr, bias_ptr, res_ptr, M, N, alpha, row0, tok0, BN: gl.constexpr, MT: gl.constexpr,
              HAS_BIAS: gl.constexpr, DTYPE: gl.constexpr, EPI: gl.constexpr):
    p_l: gl.constexpr = part.type.layout
    y0 = _y_at(y_ptr, tok0, N, EPI)
    if EPI == 2:   # the residual [M, N] at token tok0 (else res_ptr is None)
        epilogue(part, y0, bias_ptr, y_ptr, y_ptr, M - tok0, N, alpha, row0, 0, 1, p_l, BN, MT, 0,
                  HAS_BIAS, DTYPE, res_ptr=res_ptr + tok0 * N, EPI=EPI)
    else:
        epilogue(part, y0, bias_ptr, y_ptr, y_ptr, M - tok0, N, alpha, row0, 0, 1, p_l, BN, MT, 0,
                  HAS_BIAS, DTYPE, EPI=EPI)


@gluon.jit
def _pf_epilogue(acc, y_ptr, bias_ptr, res_ptr, M, N, alpha, row0, tok0, BN: gl.constexpr, MT: gl.constexpr,
                 HAS_BIAS: gl.constexpr, DTYPE: gl.constexpr, EPI_PARTS: gl.constexpr, EPI: gl.constexpr):
    """y rows tok0 .. tok0 + MT: the decode epilogue (alpha, bias, cast, masked store) with the tile's
    tokens as its M, in EPI_PARTS (1, 2 or 4) slices of tokens, which divides the epilogue's live
    offsets and pointers: the 256-token and 128-row tiles spill without it."""
    if EPI_PARTS == 1:
        _pf_store(acc, y_ptr, bias_ptr, res_ptr, M, N, alpha, row0, tok0, BN, MT, HAS_BIAS, DTYPE, EPI)
    else:
        H: gl.constexpr = MT // 2
        lo, hi = _halves(acc, BN, MT)
        if EPI_PARTS == 2:
            _pf_store(lo, y_ptr, bias_ptr, res_ptr, M, N, alpha, row0, tok0, BN, H, HAS_BIAS, DTYPE, EPI)
            _pf_store(hi, y_ptr, bias_ptr, res_ptr, M, N, alpha, row0, tok0 + H, BN, H, HAS_BIAS, DTYPE, EPI)
        else:
            Q: gl.constexpr = MT // 4
            a, b = _halves(lo, BN, H)
            _pf_store(a, y_ptr, bias_ptr, res_ptr, M, N, alpha, row0, tok0, BN, Q, HAS_BIAS, DTYPE, EPI)
            _pf_store(b, y_ptr, bias_ptr, res_ptr, M, N, alpha, row0, tok0 + Q, BN, Q, HAS_BIAS, DTYPE, EPI)
            c, d = _halves(hi, BN, H)
            _pf_store(c, y_ptr, bias_ptr, res_ptr, M, N, alpha, row0, tok0 + H, BN, Q, HAS_BIAS, DTYPE, EPI)
            _pf_store(d, y_ptr, bias_ptr, res_ptr, M, N, alpha, row0, tok0 + H + Q, BN, Q, HAS_BIAS, DTYPE, EPI)


@gluon.jit
def _pf_split_store(part, y_ptr, bias_ptr, res_ptr, part_ptr, cnt_ptr, cnt_idx, split, n_split, M, N, alpha, row0,
                    tok0, BN: gl.constexpr, MT: gl.constexpr, HAS_BIAS: gl.constexpr, DTYPE: gl.constexpr,
                    EPI: gl.constexpr):
    """One token slice of a K-split tile: its fp32 partial into part [n_split, M, N], and the last
    split to arrive sums them in split order and stores y (common.epilogue, SPLIT 1)."""
    p_l: gl.constexpr = part.type.layout
    y0 = _y_at(y_ptr, tok0, N, EPI)
    if EPI == 2:   # the residual [M, N] at token tok0 (else res_ptr is None)
        epilogue(part, y0, bias_ptr, part_ptr + tok0 * N, cnt_ptr, M - tok0, N, alpha, row0, split,
                  n_split, p_l, BN, MT, 1, HAS_BIAS, DTYPE, M * N, cnt_idx, res_ptr=res_ptr + tok0 * N, EPI=EPI)
    else:
        epilogue(part, y0, bias_ptr, part_ptr + tok0 * N, cnt_ptr, M - tok0, N, alpha, row0, split,
                  n_split, p_l, BN, MT, 1, HAS_BIAS, DTYPE, M * N, cnt_idx, EPI=EPI)


@gluon.jit
def _pf_split_epilogue(acc, y_ptr, bias_ptr, res_ptr, part_ptr, cnt_ptr, t, split, n_split, M, N, alpha, row0,
                       tok0, BN: gl.constexpr, MT: gl.constexpr, HAS_BIAS: gl.constexpr, DTYPE: gl.constexpr,
                       EPI_PARTS: gl.constexpr, WG: gl.constexpr, EPI: gl.constexpr):
    """_pf_epilogue for a K-split tile: each token slice has its own counter,
    (t * 2 + WG) * EPI_PARTS + slice."""
    c0 = (t * 2 + WG) * EPI_PARTS
    if EPI_PARTS == 1:
        _pf_split_store(acc, y_ptr, bias_ptr, res_ptr, part_ptr, cnt_ptr, c0, split, n_split, M, N, alpha, row0, tok0, BN, MT,
                        HAS_BIAS, DTYPE, EPI)
    else:
        H: gl.constexpr = MT // 2
        lo, hi = _halves(acc, BN, MT)
        if EPI_PARTS == 2:
            _pf_split_store(lo, y_ptr, bias_ptr, res_ptr, part_ptr, cnt_ptr, c0, split, n_split, M, N, alpha, row0, tok0,
                            BN, H, HAS_BIAS, DTYPE, EPI)
            _pf_split_store(hi, y_ptr, bias_ptr, res_ptr, part_ptr, cnt_ptr, c0 + 1, split, n_split, M, N, alpha, row0,
                            tok0 + H, BN, H, HAS_BIAS, DTYPE, EPI)
        else:
            Q: gl.constexpr = MT // 4
            a, b = _halves(lo, BN, H)
            _pf_split_store(a, y_ptr, bias_ptr, res_ptr, part_ptr, cnt_ptr, c0, split, n_split, M, N, alpha, row0, tok0,
                            BN, Q, HAS_BIAS, DTYPE, EPI)
            _pf_split_store(b, y_ptr, bias_ptr, res_ptr, part_ptr, cnt_ptr, c0 + 1, split, n_split, M, N, alpha, row0,
                            tok0 + Q, BN, Q, HAS_BIAS, DTYPE, EPI)
            c, d = _halves(hi, BN, H)
            _pf_split_store(c, y_ptr, bias_ptr, res_ptr, part_ptr, cnt_ptr, c0 + 2, split, n_split, M, N, alpha, row0,
                            tok0 + H, BN, Q, HAS_BIAS, DTYPE, EPI)
            _pf_split_store(d, y_ptr, bias_ptr, res_ptr, part_ptr, cnt_ptr, c0 + 3, split, n_split, M, N, alpha, row0,
                            tok0 + H + Q, BN, Q, HAS_BIAS, DTYPE, EPI)


@gluon.jit
def _pf_consumer(n_work, n_tn, n_tm, n_k, n_split, kps, c_ring, x_ring, s_ring, o_ring, full, empty, turns,
                 y_ptr, bias_ptr, res_ptr, part_ptr, cnt_ptr, M, N, alpha,
                 BN: gl.constexpr, MT: gl.constexpr, KH: gl.constexpr, NCH: gl.constexpr, STAGES: gl.constexpr,
                 GDIV: gl.constexpr, GROUP_N: gl.constexpr, HAS_ZEROS: gl.constexpr, HAS_BIAS: gl.constexpr,
                 DTYPE: gl.constexpr, WG: gl.constexpr, PINGPONG: gl.constexpr, HOLD: gl.constexpr,
                 EPI_PARTS: gl.constexpr, SPLIT: gl.constexpr, EPI: gl.constexpr, STREAM: gl.constexpr):
    """Consumer warpgroup WG: its BN rows of every tile of the program, then the tile's epilogue
    (a tile of several pieces: the split epilogue, the last piece to arrive sums them)."""
    acc_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, MT, 16])
    turn_mine = turns.index(WG)
    turn_other = turns.index(1 - WG)
    it = 0
    w_lo, w_end = _items(n_work, n_k, kps, STREAM)
    for w in range(w_lo, w_end, _step(STREAM)):
        t, piece, k_lo, k_hi, pieces = _work(w, n_split, kps, n_k, SPLIT, STREAM)
        pid_n, pid_m = _tile_coords(t, n_tn, n_tm, GROUP_N)
        row0 = pid_n * 2 * BN + WG * BN
        tok0 = pid_m * MT
        acc = gl.zeros([BN, MT], gl.float32, acc_l)
        for kk in range(k_lo, k_hi):
            acc = _pf_stage(acc, it, c_ring, x_ring, s_ring, o_ring, full, empty, turn_mine, turn_other, acc_l,
                            BN, KH, NCH, STAGES, GDIV, HAS_ZEROS, DTYPE, WG, PINGPONG, HOLD)
            it += 1
        if STREAM:
            if pieces == 1:
                _pf_epilogue(acc, y_ptr, bias_ptr, res_ptr, M, N, alpha, row0, tok0, BN, MT, HAS_BIAS, DTYPE, EPI_PARTS,
                             EPI)
            else:
                _pf_split_epilogue(acc, y_ptr, bias_ptr, res_ptr, part_ptr, cnt_ptr, t, piece, pieces, M, N, alpha, row0,
                                   tok0, BN, MT, HAS_BIAS, DTYPE, EPI_PARTS, WG, EPI)
        elif SPLIT:
            _pf_split_epilogue(acc, y_ptr, bias_ptr, res_ptr, part_ptr, cnt_ptr, t, piece, pieces, M, N, alpha, row0, tok0,
                               BN, MT, HAS_BIAS, DTYPE, EPI_PARTS, WG, EPI)
        else:
            _pf_epilogue(acc, y_ptr, bias_ptr, res_ptr, M, N, alpha, row0, tok0, BN, MT, HAS_BIAS, DTYPE, EPI_PARTS, EPI)


@gluon.jit
def w4a16_prefill_kernel(
    c_desc, x_desc, s_desc, o_desc, y_ptr, bias_ptr, res_ptr, part_ptr, cnt_ptr,
    M, N, group, n_k, n_tn, n_tm, n_split, kps, alpha,
    MT: gl.constexpr, BN: gl.constexpr, KH: gl.constexpr, NCH: gl.constexpr, STAGES: gl.constexpr,
    GPS: gl.constexpr, GDIV: gl.constexpr, GROUP_N: gl.constexpr, PINGPONG: gl.constexpr, HOLD: gl.constexpr,
    HAS_ZEROS: gl.constexpr, HAS_BIAS: gl.constexpr, DTYPE: gl.constexpr, EPI_PARTS: gl.constexpr,
    SPLIT: gl.constexpr, CONSUMER_REGS: gl.constexpr, PRODUCER_REGS: gl.constexpr, EPI: gl.constexpr,
    STREAM: gl.constexpr,
):
    """See the module docstring. n_k: stages of K per tile; n_tn / n_tm: row tiles (of 2 * BN) and
    token tiles (of MT). GPS: groups per stage (scale box rows); GDIV: g when a stage spans several
    groups, else 1 << 30. SPLIT: each tile's K is split in n_split ranges of kps stages (work items
    tile x split); fp32 partials go to part_ptr [n_split, M, N] and int32 counters cnt_ptr
    [tiles * 2 * EPI_PARTS] (zero before, left zero after) let the last split of each slice sum
    them in split order (deterministic). STREAM (stream-K, not with SPLIT): the tiles' K stages laid
    end to end are dealt out in runs of kps stages, one run per program (grid = ceil(tiles * n_k /
    kps)); a tile whose stages fall in several runs is summed the same way over its pieces (the
    runs in program order; part_ptr holds n_split >= the most pieces of a tile). Without SPLIT or
    STREAM, part_ptr, cnt_ptr, n_split and kps are unused. EPI: the epilogue (common.store_out);
    res_ptr: the residual [M, N] with EPI 2, else None."""
    n_tiles = n_tn * n_tm
    if SPLIT:
        n_work = n_tiles * n_split
    else:
        n_work = n_tiles
    c0 = gl.allocate_shared_memory(gl.uint8, [STAGES] + c_desc.block_type.shape, c_desc.layout)
    c1 = gl.allocate_shared_memory(gl.uint8, [STAGES] + c_desc.block_type.shape, c_desc.layout)
    x_ring = gl.allocate_shared_memory(DTYPE, [STAGES * 2 * NCH] + x_desc.block_type.shape, x_desc.layout)
    s0 = gl.allocate_shared_memory(DTYPE, [STAGES] + s_desc.block_type.shape, s_desc.layout)
    s1 = gl.allocate_shared_memory(DTYPE, [STAGES] + s_desc.block_type.shape, s_desc.layout)
    if HAS_ZEROS:
        o0 = gl.allocate_shared_memory(DTYPE, [STAGES] + o_desc.block_type.shape, o_desc.layout)
        o1 = gl.allocate_shared_memory(DTYPE, [STAGES] + o_desc.block_type.shape, o_desc.layout)
    else:
        o0 = s0
        o1 = s1
    full = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    turns = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(full.index(i), count=1)
        mbarrier.init(empty.index(i), count=2)
    for i in gl.static_range(2):
        mbarrier.init(turns.index(i), count=1)

    gl.warp_specialize([
        (_pf_consumer, (n_work, n_tn, n_tm, n_k, n_split, kps, c0, x_ring, s0, o0, full, empty, turns, y_ptr,
                        bias_ptr, res_ptr, part_ptr, cnt_ptr, M, N, alpha, BN, MT, KH, NCH, STAGES, GDIV, GROUP_N,
                        HAS_ZEROS, HAS_BIAS, DTYPE, 0, PINGPONG, HOLD, EPI_PARTS, SPLIT, EPI, STREAM)),
        (_pf_consumer, (n_work, n_tn, n_tm, n_k, n_split, kps, c1, x_ring, s1, o1, full, empty, turns, y_ptr,
                        bias_ptr, res_ptr, part_ptr, cnt_ptr, M, N, alpha, BN, MT, KH, NCH, STAGES, GDIV, GROUP_N,
                        HAS_ZEROS, HAS_BIAS, DTYPE, 1, PINGPONG, HOLD, EPI_PARTS, SPLIT, EPI, STREAM)),
        (_pf_producer, (n_work, n_tn, n_tm, n_k, n_split, kps, c_desc, x_desc, s_desc, o_desc, c0, c1, x_ring, s0,
                        s1, o0, o1, full, empty, group, BN, MT, STAGES, NCH, KH, GROUP_N, HAS_ZEROS, SPLIT, STREAM)),
    ], [4, 1], [CONSUMER_REGS, PRODUCER_REGS])
