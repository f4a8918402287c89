"""What the Gluon kernels' GPU tests share: a QuantizedWeight in the kernels' layout, on the GPU,
the relative error of an output that must be finite everywhere, and the option matrix."""
import pytest
import torch

from w4a16.backends.gluon.layout import prepare_weight as prep  # noqa: F401  (the kernels' layout, on the GPU)
from w4a16.measure import rel_error


def rel(y, ref) -> float:
    """Relative Frobenius error of y against ref; every element of y must be finite (outputs are
    poisoned with NaN first, so an unwritten element, or one written past M / N, fails here)."""
    assert torch.isfinite(y).all(), "NaN/Inf in the output (an element left unwritten, or rows past M / N written)"
    return rel_error(y, ref.to(y.device))


def skip_unless_gluon() -> None:
    """Skip the calling test module unless this Triton runs the Gluon kernels (call it after the
    module's GPU check)."""
    pytest.importorskip("triton")
    from w4a16.backends.triton_compat import gluon_unsupported
    if gluon_unsupported():
        pytest.skip(gluon_unsupported(), allow_module_level=True)


def option_matrix(test):
    """Parametrize ``test(dtype, group, zeros)`` over fp16 / bf16 x group 32..256 and per channel x
    no / integer / float zero points."""
    test = pytest.mark.parametrize("zeros", [None, "int", "float"])(test)
    test = pytest.mark.parametrize("group", [32, 64, 128, 256, -1])(test)
    return pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])(test)
