"""The W4A16 GEMM kernel (one Triton kernel for both the tile and the split-K shapes).

The K loop walks the layout's chunks of KC values (:mod:`.layout`, version 2): each thread loads
its own fragment bytes of a [BN, KC/2] uint8 tile (16 at a time, from 16-row fragment blocks), a
register-only reshape gives the chunk tile back, and its low and high nibbles are the weight tiles
of the two half chunks, each with one scale (and zero) per row, or one per chunk when the group
spans it (ONE_SCALE).

SWAP_AB: each program computes the transposed output tile out^T[BN, BM] = W[BN, K] @ x^T[K, BM],
so the dequantized weight is the first ``tl.dot`` operand (on Hopper, wgmma reads it from
registers). Without SWAP_AB it computes out[BM, BN] = x @ W^T and the dequantized weight is the
second operand (staged through shared memory).

With PRO (the RMSNorm prologue) x is read normalized: the program first sums the squares of its
rows of x over all of K (fp32), and every x tile it loads becomes x * rsqrt(mean + eps) * weight
in DTYPE (``w4a16.epilogue.rms_norm`` rounds the product with rsqrt from fp32 instead: each value
within about 1.5 roundings of it), the norm weight [K] read beside x.

With one split (EPILOGUE) the program applies alpha, bias, the epilogue (EPI: none, SiLU(gate) *
up of the interleaved gate/up rows, a residual, or a residual and the RMSNorm of the result;
``w4a16.epilogue``) and the cast and writes y. With the RMSNorm (EPI 3) y is [2, M, N]: each tile
stores h and its rows' partial sums of squares (of h as stored) into ``ss[tile column]``; the last
tile of a row block to arrive (an acquire-release counter per row block after the split-K tile
counters, reset after use) adds the partial sums in tile order and writes n = RMSNorm(h) * weight
for the whole rows: deterministic.
With several splits, program (tile, s) covers chunks [s * CPS, (s + 1) * CPS) and writes its fp32
partial tile to ``part[s]``; the last program of a tile to arrive (an acquire-release counter per
tile, reset to 0 after use) sums the partials in split order and writes y, so the result is
bitwise reproducible and one launch does it all. With ATOMIC the programs add their partials into
a zeroed fp32 ``part[0]`` instead (not reproducible) and :mod:`.reduce` writes y.
"""
import triton
import triton.language as tl

from .dequant import codes_magic, codes_portable
from .tiles import group_params, load_x, per_row, scaled_mma, unswizzle


@triton.jit
def _tile_coords(pid, num_m, num_n, GROUP_M: tl.constexpr):
    """Grouped tile order: GROUP_M consecutive m tiles sweep the n tiles together (L2 reuse)."""
    per_group = GROUP_M * num_n
    group = pid // per_group
    first_m = group * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % size_m
    pid_n = (pid % per_group) // size_m
    return pid_m, pid_n


@triton.jit
def _pairs(t, SWAP_AB: tl.constexpr):
    """(gate, up) halves of a tile in the silu_mul row order (w4a16.epilogue: weight rows 16b .. 16b
    + 7 gate, 16b + 8 .. 16b + 15 up): [BN, BM] (SWAP_AB) -> two [BN/16, 8, BM], else [BM, BN] ->
    two [BM, BN/16, 8]; register moves only (a thread holds both rows of a pair)."""
    if SWAP_AB:
        BN: tl.constexpr = t.shape[0]
        BM: tl.constexpr = t.shape[1]
        t = tl.permute(tl.reshape(t, (BN // 16, 2, 8, BM)), (0, 2, 3, 1))
    else:
        BM: tl.constexpr = t.shape[0]
        BN: tl.constexpr = t.shape[1]
        t = tl.permute(tl.reshape(t, (BM, BN // 16, 2, 8)), (0, 1, 3, 2))
    return tl.split(t)


@triton.jit
def _write_y(acc, y_ptr, bias_ptr, res_ptr, rows, offs_n, offs_m, n_ok, m_ok, M, N, alpha, HAS_BIAS: tl.constexpr,
             SWAP_AB: tl.constexpr, EPI: tl.constexpr, DTYPE: tl.constexpr, nw_ptr, ss_ptr, rc_ptr, pid_n, num_n, eps):
    """y = alpha * acc + bias, then the epilogue (EPI 0: none; 1: SiLU(gate) * up into y [M, N/2];
    2: + residual [M, N]; 3: + residual into y[0] and the norm into y[1], ``_norm_rows``), cast to
    DTYPE and stored (rows past N and tokens past M masked)."""
    acc = acc * alpha
    if HAS_BIAS:
        acc += per_row(tl.load(bias_ptr + rows), SWAP_AB)
    if SWAP_AB:
        n_idx = offs_n[:, None] + 0 * offs_m[None, :]
        m_idx = offs_m[None, :] + 0 * offs_n[:, None]
    else:
        n_idx = offs_n[None, :] + 0 * offs_m[:, None]
        m_idx = offs_m[:, None] + 0 * offs_n[None, :]
    if EPI == 1:
        gate, up = _pairs(acc, SWAP_AB)
        n_g, _n_u = _pairs(n_idx, SWAP_AB)
        m_g, _m_u = _pairs(m_idx, SWAP_AB)
        out = gate / (1.0 + tl.exp(-gate)) * up
        # weight row 16b + i (i < 8) of the gate half is output column 8b + i
        tl.store(y_ptr + m_g * (N // 2) + (n_g - 8 * (n_g // 16)), out.to(DTYPE), mask=(n_g < N) & (m_g < M))
    else:
        offs = m_idx * N + n_idx
        mask = (n_idx < N) & (m_idx < M)
        if EPI >= 2:
            acc += tl.load(res_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        h = acc.to(DTYPE)
        tl.store(y_ptr + offs, h, mask=mask)
        if EPI == 3:
            hf = tl.where(mask, h.to(tl.float32), 0.0)
            ss = tl.sum(hf * hf, axis=0 if SWAP_AB else 1)      # [BM]: this tile's part of each row
            _norm_rows(ss, y_ptr, nw_ptr, ss_ptr, rc_ptr, pid_n, num_n, offs_m, m_ok, M, N, eps, DTYPE,
                       NORM_ELEMENTS // offs_m.shape[0])


NORM_ELEMENTS = tl.constexpr(8192)   # elements of h the norm reads per step (rows x columns)


@triton.jit
def _norm_rows(ss, y_ptr, nw_ptr, ss_ptr, rc_ptr, pid_n, num_n, offs_m, m_ok, M, N, eps, DTYPE: tl.constexpr,
               BN: tl.constexpr):
    """The RMSNorm of rows ``offs_m`` of h = y[0] [M, N] into y[1] once every tile of the row block
    has stored its part of h: ``ss`` [BM] is this tile's partial sum of squares, stored to
    ss_ptr[pid_n, M]; the last of the ``num_n`` tiles to arrive at counter ``rc_ptr`` sums them in
    tile order, reads the whole rows of h back (L2), BN columns a step, and writes
    weight * (h * rsqrt(mean + eps)) (the product with rsqrt rounded to DTYPE, then the weight's
    product rounded: w4a16.epilogue.rms_norm)."""
    tl.store(ss_ptr + pid_n * M + offs_m, ss, mask=m_ok)
    tl.debug_barrier()  # every thread's stores of h and ss precede the release below
    arrived = tl.atomic_add(rc_ptr, 1, sem="acq_rel", scope="gpu")
    if arrived == num_n - 1:
        total = tl.zeros_like(ss)
        for t in range(0, num_n):
            total += tl.load(ss_ptr + t * M + offs_m, mask=m_ok, other=0.0, cache_modifier=".cg")
        tl.atomic_xchg(rc_ptr, 0, sem="relaxed", scope="gpu")   # ready for the next call
        rstd = (1.0 / tl.sqrt_rn(total / N + eps))[:, None]
        cols = tl.arange(0, BN)
        for n0 in range(0, N, BN):
            offs = offs_m[:, None] * N + (n0 + cols)[None, :]
            mask = m_ok[:, None] & ((n0 + cols) < N)[None, :]
            h = tl.load(y_ptr + offs, mask=mask, other=0.0, cache_modifier=".cg").to(tl.float32)
            w = tl.load(nw_ptr + n0 + cols, mask=(n0 + cols) < N, other=0.0).to(tl.float32)
            u = (h * rstd).to(DTYPE).to(tl.float32)
            tl.store(y_ptr + M * N + offs, (w[None, :] * u).to(DTYPE), mask=mask)


@triton.jit
def _row_rstd(x_ptr, offs_m, m_ok, K, eps, H: tl.constexpr):
    """rsqrt(mean(x^2) + eps) [BM] fp32 of rows offs_m of x [M, K] (the squares summed over all of
    K in steps of H columns)."""
    cols = tl.arange(0, H)
    ss = tl.zeros((offs_m.shape[0],), dtype=tl.float32)
    for k0 in range(0, K, H):
        v = tl.load(x_ptr + offs_m[:, None] * K + (k0 + cols)[None, :], mask=m_ok[:, None] & ((k0 + cols) < K)[None, :],
                    other=0.0).to(tl.float32)
        ss += tl.sum(v * v, axis=1)
    return 1.0 / tl.sqrt_rn(ss / K + eps)


@triton.jit
def w4a16_gemm_kernel(
    x_ptr, qk_ptr, s_ptr, z_ptr, bias_ptr, res_ptr, y_ptr, part_ptr, counter_ptr,
    M, N, K, chunks, chunks_per_split, n_blocks, alpha,
    nw_ptr, ss_ptr, eps, pn_ptr, pro_eps,
    GROUP_LOG2: tl.constexpr, KC: tl.constexpr, ONE_SCALE: tl.constexpr, EVEN_K: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, EPILOGUE: tl.constexpr, GROUP_M: tl.constexpr, SWAP_AB: tl.constexpr,
    UNROLL: tl.constexpr, PREFETCH: tl.constexpr, SCALE_AFTER: tl.constexpr,
    HAS_ZEROS: tl.constexpr, HAS_BIAS: tl.constexpr, ATOMIC: tl.constexpr, USE_ASM: tl.constexpr,
    DTYPE: tl.constexpr, EPI: tl.constexpr, PRO: tl.constexpr,
):
    """x [M, K] DTYPE; qk uint8 [n_blocks, K_pad*8] (16-row fragment blocks, see layout.py);
    s, z [G_pad, N] in DTYPE or fp32; bias [N]; res [M, N] DTYPE (EPI 2, 3); y [M, N] DTYPE ([M, N/2]
    with EPI 1, [2, M, N] with EPI 3); part fp32 [splits, M, N] and counter int32 [tiles], zero
    (both unused with EPILOGUE, the single-split case; counter unused with ATOMIC, which needs
    EPI 0). EPI 3: nw [N] the norm weight (DTYPE), ss fp32 [N tiles, M] scratch, eps, and the
    counters hold one more per row block after the tiles' (nw_ptr, ss_ptr, eps are None, constexprs
    with no kernel parameter, otherwise). PRO: x is read RMS-normalized with the norm weight pn [K]
    (DTYPE) and pro_eps (both None otherwise)."""
    H: tl.constexpr = KC // 2
    num_m = tl.cdiv(M, BM)
    num_n = tl.cdiv(N, BN)
    pid_m, pid_n = _tile_coords(tl.program_id(0), num_m, num_n, GROUP_M)
    pid_k = tl.program_id(1)

    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_h = tl.arange(0, H)
    n_ok = offs_n < N
    m_ok = offs_m < M
    # Clamped row indices: loads of rows past N read row N-1 and are never stored.
    rows = tl.minimum(offs_n, N - 1)
    # The code tile [H/32 * BN/16 (sh, b), 512]: a 512-byte row holds a 16-row block's codes of one
    # 32-byte column slice, (g, t, 16 bytes) contiguous. Two dimensions, the second contiguous, so
    # every Triton release lays the load out alike: 16 bytes a thread, lanes on (t, g), warps on
    # the blocks, which is what makes the reshape in unswizzle free. Blocks past the last are
    # clamped (their rows are never stored).
    r = tl.arange(0, (H // 32) * (BN // 16))
    blk = tl.minimum(pid_n * (BN // 16) + r % (BN // 16), n_blocks - 1)
    q_ptrs = qk_ptr + (blk * (chunks * 16 * H) + (r // (BN // 16)) * 512)[:, None] + tl.arange(0, 512)[None, :]
    if SWAP_AB:
        x_ptrs = x_ptr + offs_m[None, :] * K + offs_h[:, None]      # x^T tile [H, BM]
        acc = tl.zeros((BN, BM), dtype=tl.float32)
    else:
        x_ptrs = x_ptr + offs_m[:, None] * K + offs_h[None, :]      # x tile [BM, H]
        acc = tl.zeros((BM, BN), dtype=tl.float32)

    rstd = None
    if PRO:
        rstd = _row_rstd(x_ptr, offs_m, m_ok, K, pro_eps, H).to(DTYPE)

    c_begin = pid_k * chunks_per_split
    c_end = tl.minimum(c_begin + chunks_per_split, chunks)
    # PREFETCH: scales (and zeros) of the next chunk are loaded one iteration ahead, so their
    # latency hides behind this chunk's math. Without it they are loaded where they are used;
    # fp32 scales (4-byte loads) are then staged by Triton's cp.async pipeline like the codes,
    # 2-byte ones are not (docs/PERF_NOTES.md).
    nxt = group_params(s_ptr, z_ptr, c_begin * KC, K, N, rows, GROUP_LOG2, H, ONE_SCALE, HAS_ZEROS, DTYPE)
    for c0 in range(c_begin, c_end, UNROLL):
        for u in tl.static_range(UNROLL):
            # With UNROLL > 1 the last step may run past this split's end: such a chunk re-reads
            # the split's last weights and meets x masked to 0, so it adds nothing.
            live = c0 + u < c_end
            c = tl.minimum(c0 + u, c_end - 1)
            k0 = c * KC
            t = unswizzle(tl.load(q_ptrs + c * (16 * H)), BN, H // 32)
            if PREFETCH:
                s_lo, s_hi, z_lo, z_hi = nxt
                nxt = group_params(s_ptr, z_ptr, tl.minimum(c + 1, chunks - 1) * KC, K, N, rows,
                                    GROUP_LOG2, H, ONE_SCALE, HAS_ZEROS, DTYPE)
            else:
                s_lo, s_hi, z_lo, z_hi = group_params(s_ptr, z_ptr, k0, K, N, rows, GROUP_LOG2, H,
                                                       ONE_SCALE, HAS_ZEROS, DTYPE)
            if USE_ASM:
                w_lo, w_hi = codes_magic(t, z_lo, z_hi, HAS_ZEROS, DTYPE)
            else:
                w_lo, w_hi = codes_portable(t, z_lo, z_hi, HAS_ZEROS, DTYPE)
            x_lo = load_x(x_ptrs, k0, offs_h, m_ok, live, K, EVEN_K, SWAP_AB, PRO, pn_ptr, rstd)
            x_hi = load_x(x_ptrs, k0 + H, offs_h, m_ok, live, K, EVEN_K, SWAP_AB, PRO, pn_ptr, rstd)
            acc = scaled_mma(acc, w_lo, w_hi, x_lo, x_hi, s_lo, s_hi, SCALE_AFTER, ONE_SCALE, SWAP_AB)

    if SWAP_AB:
        out_mask = n_ok[:, None] & m_ok[None, :]
        out_offs = offs_m[None, :] * N + offs_n[:, None]
    else:
        out_mask = m_ok[:, None] & n_ok[None, :]
        out_offs = offs_m[:, None] * N + offs_n[None, :]
    rc_ptr = counter_ptr + num_m * num_n + pid_m   # EPI 3: the row block's counter, after the tiles'
    if EPILOGUE:
        _write_y(acc, y_ptr, bias_ptr, res_ptr, rows, offs_n, offs_m, n_ok, m_ok, M, N, alpha, HAS_BIAS, SWAP_AB,
                 EPI, DTYPE, nw_ptr, ss_ptr, rc_ptr, pid_n, num_n, eps)
    elif ATOMIC:
        tl.atomic_add(part_ptr + out_offs, acc, mask=out_mask, sem="relaxed")
    else:
        tl.store(part_ptr + pid_k * M * N + out_offs, acc, mask=out_mask)
        # The tile's last program to arrive sums the partial tiles in split order and writes y:
        # the same additions whichever program that is, so the result is bitwise reproducible.
        tile = tl.program_id(0)
        splits = tl.num_programs(1)
        tl.debug_barrier()  # every thread's partial stores precede the release below
        arrived = tl.atomic_add(counter_ptr + tile, 1, sem="acq_rel", scope="gpu")
        if arrived == splits - 1:
            total = tl.zeros_like(acc)
            for s in range(0, splits):
                total += tl.load(part_ptr + s * M * N + out_offs, mask=out_mask, other=0.0, cache_modifier=".cg")
            tl.atomic_xchg(counter_ptr + tile, 0, sem="relaxed", scope="gpu")  # ready for the next call
            _write_y(total, y_ptr, bias_ptr, res_ptr, rows, offs_n, offs_m, n_ok, m_ok, M, N, alpha, HAS_BIAS,
                     SWAP_AB, EPI, DTYPE, nw_ptr, ss_ptr, rc_ptr, pid_n, num_n, eps)
