"""The W4A16 GEMM kernel (one Triton kernel for both the tile and the split-K shapes).

The K loop walks layout-v1 chunks of KC values: one uint8 [BN, KC/2] load gives the weight tiles
of both half chunks (low / high nibbles), each with one scale (and zero) per row, or one per
chunk when the group spans it (ONE_SCALE).

SWAP_AB: each program computes the transposed output tile out^T[BN, BM] = W[BN, K] @ x^T[K, BM],
so the dequantized weight is the first ``tl.dot`` operand (on Hopper, wgmma reads it from
registers). Without SWAP_AB it computes out[BM, BN] = x @ W^T and the dequantized weight is the
second operand (staged through shared memory).

With one split (EPILOGUE) the program applies alpha, bias and the cast and writes y.
With several splits, program (tile, s) covers chunks [s * CPS, (s + 1) * CPS) and writes its fp32
partial tile to ``part[s]`` (deterministic; :mod:`.reduce` sums them in a fixed order), or with
ATOMIC adds it into a zeroed fp32 ``part[0]`` (not bitwise reproducible).
"""
import triton
import triton.language as tl

from .dequant import codes_magic, codes_portable


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
def _group_of(k, K, GROUP_LOG2: tl.constexpr):
    """Quantization group of K index ``k``: k >> log2(g); per-channel: 0 below K, 1 (padding) past it."""
    if GROUP_LOG2 >= 0:
        return k >> GROUP_LOG2
    else:
        return (k >= K).to(tl.int32)


@triton.jit
def _group_params(s_ptr, z_ptr, k0, K, N, rows, GROUP_LOG2: tl.constexpr, H: tl.constexpr,
                  ONE_SCALE: tl.constexpr, HAS_ZEROS: tl.constexpr):
    """(s_lo, s_hi, z_lo, z_hi), each [BN], for the two half chunks starting at K index k0.
    Without zeros the z values are unused placeholders (the scales)."""
    g_lo = _group_of(k0, K, GROUP_LOG2)
    s_lo = tl.load(s_ptr + g_lo * N + rows)
    z_lo = s_lo
    if HAS_ZEROS:
        z_lo = tl.load(z_ptr + g_lo * N + rows)
    if ONE_SCALE:
        s_hi = s_lo
        z_hi = z_lo
    else:
        g_hi = _group_of(k0 + H, K, GROUP_LOG2)
        s_hi = tl.load(s_ptr + g_hi * N + rows)
        z_hi = s_hi
        if HAS_ZEROS:
            z_hi = tl.load(z_ptr + g_hi * N + rows)
    return s_lo, s_hi, z_lo, z_hi


@triton.jit
def _load_x(x_ptrs, k0, offs_h, m_ok, live, K, EVEN_K: tl.constexpr, SWAP_AB: tl.constexpr):
    """The x tile of K range [k0, k0 + H): [H, BM] (x^T) with SWAP_AB, else [BM, H]; rows past M,
    columns past K and chunks that are not ``live`` read as 0."""
    rows_ok = m_ok & live
    if SWAP_AB:
        mask = rows_ok[None, :]
        if not EVEN_K:
            mask = mask & ((k0 + offs_h) < K)[:, None]
    else:
        mask = rows_ok[:, None]
        if not EVEN_K:
            mask = mask & ((k0 + offs_h) < K)[None, :]
    return tl.load(x_ptrs + k0, mask=mask, other=0.0)


@triton.jit
def w4a16_gemm_kernel(
    x_ptr, qk_ptr, s_ptr, z_ptr, bias_ptr, y_ptr, part_ptr,
    M, N, K, chunks, chunks_per_split, alpha,
    GROUP_LOG2: tl.constexpr, KC: tl.constexpr, ONE_SCALE: tl.constexpr, EVEN_K: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, EPILOGUE: tl.constexpr, GROUP_M: tl.constexpr, SWAP_AB: tl.constexpr,
    UNROLL: tl.constexpr, PREFETCH: tl.constexpr,
    HAS_ZEROS: tl.constexpr, HAS_BIAS: tl.constexpr, ATOMIC: tl.constexpr, USE_ASM: tl.constexpr,
    DTYPE: tl.constexpr,
):
    """x [M, K] DTYPE; qk uint8 [N, K_pad/2] (layout v1); s, z [G_pad, N] DTYPE; bias [N];
    y [M, N] DTYPE; part fp32 [splits, M, N] (unused with EPILOGUE, the single-split case)."""
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
    q_ptrs = qk_ptr + rows[:, None] * (chunks * H) + offs_h[None, :]
    if SWAP_AB:
        x_ptrs = x_ptr + offs_m[None, :] * K + offs_h[:, None]      # x^T tile [H, BM]
        acc = tl.zeros((BN, BM), dtype=tl.float32)
    else:
        x_ptrs = x_ptr + offs_m[:, None] * K + offs_h[None, :]      # x tile [BM, H]
        acc = tl.zeros((BM, BN), dtype=tl.float32)

    c_begin = pid_k * chunks_per_split
    c_end = tl.minimum(c_begin + chunks_per_split, chunks)
    # PREFETCH: scales (and zeros) of the next chunk are loaded one iteration ahead, so their
    # latency hides behind this chunk's math. A side effect seen in the TTGIR on sm_90: with it,
    # Triton stages the dequantized tile through shared memory for some tile shapes instead of
    # feeding the MMA from registers (docs/PERF_NOTES.md).
    nxt = _group_params(s_ptr, z_ptr, c_begin * KC, K, N, rows, GROUP_LOG2, H, ONE_SCALE, HAS_ZEROS)
    for c0 in range(c_begin, c_end, UNROLL):
        for u in tl.static_range(UNROLL):
            # With UNROLL > 1 the last step may run past this split's end: such a chunk re-reads
            # the split's last weights and meets x masked to 0, so it adds nothing.
            live = c0 + u < c_end
            c = tl.minimum(c0 + u, c_end - 1)
            k0 = c * KC
            t = tl.load(q_ptrs + c * H)
            if PREFETCH:
                s_lo, s_hi, z_lo, z_hi = nxt
                nxt = _group_params(s_ptr, z_ptr, tl.minimum(c + 1, chunks - 1) * KC, K, N, rows,
                                    GROUP_LOG2, H, ONE_SCALE, HAS_ZEROS)
            else:
                s_lo, s_hi, z_lo, z_hi = _group_params(s_ptr, z_ptr, k0, K, N, rows, GROUP_LOG2, H,
                                                       ONE_SCALE, HAS_ZEROS)
            if USE_ASM:
                w_lo, w_hi = codes_magic(t, z_lo, z_hi, HAS_ZEROS, DTYPE)
            else:
                w_lo, w_hi = codes_portable(t, z_lo, z_hi, HAS_ZEROS, DTYPE)
            w_lo = w_lo * s_lo[:, None]
            w_hi = w_hi * s_hi[:, None]
            x_lo = _load_x(x_ptrs, k0, offs_h, m_ok, live, K, EVEN_K, SWAP_AB)
            x_hi = _load_x(x_ptrs, k0 + H, offs_h, m_ok, live, K, EVEN_K, SWAP_AB)
            if SWAP_AB:
                acc = tl.dot(w_lo, x_lo, acc)
                acc = tl.dot(w_hi, x_hi, acc)
            else:
                acc = tl.dot(x_lo, tl.trans(w_lo), acc)
                acc = tl.dot(x_hi, tl.trans(w_hi), acc)

    if SWAP_AB:
        out_mask = n_ok[:, None] & m_ok[None, :]
        out_offs = offs_m[None, :] * N + offs_n[:, None]
    else:
        out_mask = m_ok[:, None] & n_ok[None, :]
        out_offs = offs_m[:, None] * N + offs_n[None, :]
    if EPILOGUE:
        acc = acc * alpha
        if HAS_BIAS:
            b = tl.load(bias_ptr + rows).to(tl.float32)
            if SWAP_AB:
                acc += b[:, None]
            else:
                acc += b[None, :]
        tl.store(y_ptr + out_offs, acc.to(DTYPE), mask=out_mask)
    elif ATOMIC:
        tl.atomic_add(part_ptr + out_offs, acc, mask=out_mask, sem="relaxed")
    else:
        tl.store(part_ptr + pid_k * M * N + out_offs, acc, mask=out_mask)
