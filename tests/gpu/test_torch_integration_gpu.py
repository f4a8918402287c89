"""The custom op under torch.library.opcheck and torch.compile(fullgraph=True), on the GPU."""
import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

import w4a16  # noqa: E402
from w4a16.ops import _config_to_list, chosen_config, prepare  # noqa: E402


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_opcheck(dtype):
    qw = w4a16.quantize(torch.randn(256, 512, device="cuda"), 128, symmetric=False, dtype=dtype)
    x = torch.randn(8, 512, device="cuda", dtype=dtype)
    b = torch.randn(256, device="cuda", dtype=dtype)
    pw = prepare(qw)
    cfg = _config_to_list(chosen_config(x, qw))
    torch.library.opcheck(torch.ops.w4a16.gemm.default,
                          (x, pw.qk, pw.scales_t, pw.zeros_t, b, 1.0, 512, pw.group, pw.kc, cfg, True))


def test_compile_fullgraph_matches_eager():
    model = torch.nn.Sequential(torch.nn.Linear(512, 1024), torch.nn.SiLU(), torch.nn.Linear(1024, 256))
    model = model.to("cuda", torch.float16)
    w4a16.quantize_model(model, group_size=64, progress=False)
    x = torch.randn(4, 7, 512, device="cuda", dtype=torch.float16)
    eager = model(x)
    compiled = torch.compile(model, fullgraph=True)
    out = compiled(x)
    torch.testing.assert_close(out, eager, rtol=2e-3, atol=2e-3)
