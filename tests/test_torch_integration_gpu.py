"""The custom op under torch.library.opcheck and torch.compile(fullgraph=True), on the GPU."""
import pytest
import torch

pytestmark = pytest.mark.gpu   # selected by: pytest -m gpu tests

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

import w4a16  # noqa: E402


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_opcheck(dtype):
    qw = w4a16.quantize(torch.randn(256, 512, device="cuda"), 128, symmetric=False, dtype=dtype)
    x = torch.randn(8, 512, device="cuda", dtype=dtype, requires_grad=True)
    b = torch.randn(256, device="cuda", dtype=dtype, requires_grad=True)
    choice = w4a16.choose(x, qw)
    be = choice.backend
    pw = qw.prepared(be)
    torch.library.opcheck(torch.ops.w4a16.gemm.default,
                          (x, be.op_tensors(pw), b, 1.0, [256, 512, 128], be.name, be.config_key(choice.config), True))


def test_compile_fullgraph_matches_eager():
    model = torch.nn.Sequential(torch.nn.Linear(512, 1024), torch.nn.SiLU(), torch.nn.Linear(1024, 256))
    model = model.to("cuda", torch.float16)
    w4a16.quantize_model(model, group_size=64, progress=False)
    x = torch.randn(4, 7, 512, device="cuda", dtype=torch.float16)
    eager = model(x)
    compiled = torch.compile(model, fullgraph=True)
    out = compiled(x)
    torch.testing.assert_close(out, eager, rtol=2e-3, atol=2e-3)


def test_compile_backward_matches_eager_reference():
    """Autograd through the custom op under torch.compile: dX = dY W and dbias = sum dY."""
    torch.manual_seed(0)
    qw = w4a16.quantize(torch.randn(384, 256, device="cuda") * 0.05, 64, dtype=torch.float16)
    W = qw.dequantize(torch.float32)
    x = torch.randn(32, 256, device="cuda", dtype=torch.float16, requires_grad=True)
    b = torch.randn(384, device="cuda", dtype=torch.float16, requires_grad=True)
    w4a16.gemm(x, qw, b, alpha=0.5)  # an eager call first: it prepares the weight and its choice
    f = torch.compile(lambda x, b: w4a16.gemm(x, qw, b, alpha=0.5), fullgraph=True)
    y = f(x, b)
    g = torch.randn_like(y)
    y.backward(g)
    gx = 0.5 * g.float() @ W
    assert float((x.grad.float() - gx).norm() / gx.norm()) < 2e-3
    assert torch.allclose(b.grad.float(), g.float().sum(0), rtol=1e-2, atol=1e-2)
