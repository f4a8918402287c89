"""Second pass of split-K: y = alpha * sum_s part[s] + bias, summed in a fixed order."""
import triton
import triton.language as tl


@triton.jit
def splitk_reduce_kernel(part_ptr, bias_ptr, y_ptr, M, N, alpha, splits,
                         HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr,
                         DTYPE: tl.constexpr):
    """part fp32 [splits, M, N] -> y [M, N] DTYPE; bias [N] (if HAS_BIAS)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < M * N
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(splits):
        acc += tl.load(part_ptr + s * M * N + offs, mask=ok, other=0.0)
    acc = acc * alpha
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs % N, mask=ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs, acc.to(DTYPE), mask=ok)
