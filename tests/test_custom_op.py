"""The torch.library custom op on CPU (kernels in Triton's interpreter): opcheck and the fake impl."""
import os

import pytest
import torch

import w4a16
from w4a16.ops import _config_to_list, prepare
from w4a16.config import GemmConfig

pytestmark = pytest.mark.skipif(
    torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") != "1",
    reason="CPU interpreter test; tests/gpu runs opcheck on the GPU")
pytest.importorskip("triton")


def _args(zeros):
    qw = w4a16.quantize(torch.randn(32, 256), 64, symmetric=not zeros)
    x = torch.randn(3, 256).half()
    b = torch.randn(32).half()
    pw = prepare(qw)
    cfg = _config_to_list(GemmConfig("splitk", 16, 16, split_k=2, num_warps=4, num_stages=2))
    return qw, x, b, (x, pw.qk, pw.scales_t, pw.zeros_t, b, 0.5, 256, pw.group, pw.kc, cfg, True)


@pytest.mark.parametrize("zeros", [False, True])
def test_opcheck_cpu(zeros):
    _, _, _, args = _args(zeros)
    torch.library.opcheck(torch.ops.w4a16.gemm.default, args,
                          test_utils=("test_schema", "test_faketensor"))


def test_op_matches_reference():
    qw, x, b, args = _args(True)
    y = torch.ops.w4a16.gemm(*args)
    ref = w4a16.reference.gemm(x, qw, b, 0.5)
    assert float((y.float() - ref.float()).norm() / ref.float().norm()) <= 2e-3
