"""The one-launch RMSNorm of rows (backends/triton/rms_norm.py) against w4a16.epilogue.rms_norm:
random rows (one step and several steps of the kernel's block, a width below the block, no row),
NaN-poisoned outputs, every element within two roundings of the dtype; on the CPU in Triton's
interpreter (fp16) and on a GPU (fp16, bf16), where eager w4a16.gemm calls use it."""
import pytest
import torch
from conftest import DEVICE, KERNEL_DTYPES
from kernel_cases import run_offline

from w4a16 import epilogue as E
from w4a16.backends.triton.rms_norm import MAX_BLOCK, rms_norm_rows

ULP = {torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("M,N", [(1, 7), (3, 128), (2, MAX_BLOCK + 904), (0, 16)])
def test_rows_match_the_reference_norm(M, N, dtype):
    gen = torch.Generator().manual_seed(M * 1000 + N)
    h = (torch.randn(M, N, generator=gen) * 3).to(dtype).to(DEVICE)
    w = (torch.rand(N, generator=gen) + 0.5).to(dtype).to(DEVICE)
    out = torch.full_like(h, float("nan"))
    y = rms_norm_rows(h, w, 1e-5, out=out)
    assert y is out
    ref = E.rms_norm(h.cpu(), w.cpu(), 1e-5).double()
    got = y.cpu().double()
    assert torch.isfinite(got).all(), "an element left unwritten"
    bound = 3 * ULP[dtype] * ref.abs() + 1e-6
    bad = (got - ref).abs() > bound
    assert not bad.any(), f"{int(bad.sum())} of {got.numel()} elements off, worst {float((got - ref).abs().max()):.3g}"


def test_a_fresh_output_has_the_rows_shape_and_dtype():
    h = torch.randn(2, 40, generator=torch.Generator().manual_seed(3)).half().to(DEVICE)
    y = rms_norm_rows(h, torch.ones(40, dtype=torch.float16, device=DEVICE), 1e-6)
    assert y.shape == h.shape and y.dtype == h.dtype and y.device == h.device


def test_kernel_compiles_for_sm90a():
    """The kernel lowers for sm_90a with the installed Triton, spill-free (``offline.compile_rms_norm``;
    a worker process without Triton's interpreter; no GPU needed)."""
    out = run_offline("from w4a16.backends.triton.offline import compile_rms_norm; from w4a16.sass import disasm; "
                      "ks = [compile_rms_norm(4096), compile_rms_norm(7, 'bf16'), compile_rms_norm(14336, 'bf16')]; "
                      "print('spills', sum(disasm.spills(disasm.instructions(k.asm['cubin'])) for k in ks))")
    assert "spills 0" in out, out
