"""The torch.library custom op on CPU (kernels in Triton's interpreter): opcheck, the fake impl,
and autograd through the op."""
import os

import pytest
import torch

import w4a16
from w4a16.backends import get
from w4a16.config import GemmConfig

pytestmark = pytest.mark.skipif(
    torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") != "1",
    reason="CPU interpreter test; the GPU tests (pytest -m gpu) run opcheck on the GPU")
pytest.importorskip("triton")


def _args(zeros):
    qw = w4a16.quantize(torch.randn(32, 256), 64, symmetric=not zeros)
    x = torch.randn(3, 256).half()
    b = torch.randn(32).half()
    tb = get("triton")
    pw = qw.prepared(tb)
    cfg = GemmConfig("splitk", 16, 16, split_k=2, num_warps=4, num_stages=2)
    return qw, x, b, (x, tb.op_tensors(pw), b, 0.5, [32, 256, 64], "triton", tb.config_key(cfg), True)


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


def test_op_schema_is_backend_neutral():
    schema = str(torch.ops.w4a16.gemm.default._schema)
    assert "Tensor[] weight" in schema and "str backend" in schema and "str config" in schema
    for layout_field in ("qk", "scales_t", "kc"):
        assert layout_field not in schema
