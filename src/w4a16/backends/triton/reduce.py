"""Second pass of atomic split-K (``deterministic=False``): y = alpha * part + bias, cast."""
import triton
import triton.language as tl


@triton.jit
def splitk_reduce_kernel(part_ptr, bias_ptr, y_ptr, M, N, alpha,
                         HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr,
                         DTYPE: tl.constexpr):
    """part fp32 [M, N] (the atomically summed partials) -> y [M, N] DTYPE; bias [N] (if HAS_BIAS)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < M * N
    acc = tl.load(part_ptr + offs, mask=ok, other=0.0) * alpha
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs % N, mask=ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs, acc.to(DTYPE), mask=ok)
