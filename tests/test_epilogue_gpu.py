"""The GEMM epilogues on the GPU: SiLU(gate) * up and the residual in the Gluon decode kernel (split,
stream-K), the Gluon prefill kernel (every named config, a K-split one) and the Triton kernel, the
residual and the rows' RMSNorm in the Gluon decode kernel (configs with a producer warp) and the
Triton kernel, fp16 and bf16, into NaN-poisoned outputs, every element against the reference; the
fused decoder layers of a tiny Llama against the unfused model, eager and in a CUDA graph."""
import pytest
import torch

pytestmark = pytest.mark.gpu   # selected by: pytest -m gpu tests

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from epilogue_cases import close_everywhere, paired_weight, run_epilogue, silu_mul_close  # noqa: E402

import w4a16  # noqa: E402
from w4a16 import epilogue as E  # noqa: E402
from w4a16.measure import random_weight  # noqa: E402

HOPPER = torch.cuda.get_device_capability()[0] == 9


@pytest.fixture(autouse=True)
def kernel_norm(monkeypatch):
    """The Gluon decode kernel's own RMSNorm epilogue, on for these tests at every size, whatever
    its default."""
    from w4a16.backends.gluon.decode import config

    monkeypatch.setattr(config, "KERNEL_NORM", True)
    monkeypatch.setattr(config, "NORM_MAX_ELEMENTS", 1 << 30)
DTYPES = pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])


def _gluon_configs():
    from w4a16.backends.gluon.decode.config import GluonDecodeConfig
    from w4a16.backends.gluon.prefill.config import NAMED as PREFILL
    from w4a16.backends.gluon.prefill.config import GluonPrefillConfig

    decode = [("decode-one-split", 5, GluonDecodeConfig(16, 4, 2, 4, splits=1)),
              ("decode-split5", 7, GluonDecodeConfig(16, 4, 2, 4, splits=5)),
              ("decode-nows-split3", 8, GluonDecodeConfig(8, 8, 4, 3, splits=3, ws=False)),
              ("decode-stream-k", 1, GluonDecodeConfig(8, 4, 2, 4, sk=True)),
              ("decode-m64", 64, GluonDecodeConfig(64, 4, 1, 4))]
    prefill = [(f"prefill-{name}", 300, cfg) for name, cfg in PREFILL.items()]
    prefill.append(("prefill-split2", 130, GluonPrefillConfig(128, 64, 1, 4, pingpong=False, splits=2)))
    return decode + prefill


CASES = _gluon_configs() if HOPPER else []


@pytest.mark.skipif(not HOPPER, reason="the Gluon kernels need an sm_90 GPU")
@DTYPES
@pytest.mark.parametrize("name,M,cfg", CASES, ids=[c[0] for c in CASES])
def test_gluon_epilogues(name, M, cfg, dtype):
    gen = torch.Generator().manual_seed(M)
    _, _, w = paired_weight(1040, 2048, 128, "int", dtype, gen)        # N = 2080: a partial row tile
    w = w.to("cuda")
    x = torch.randn(M, 2048, generator=gen).to(dtype).cuda()
    bias = (torch.randn(2080, generator=gen) * 0.1).to(dtype).cuda()
    y = run_epilogue(x, w, "silu_mul", bias=bias, alpha=0.75, config=cfg, backend="gluon")
    silu_mul_close(y, x, w, bias, 0.75, dtype)
    r = torch.randn(M, 2080, generator=gen).to(dtype).cuda()
    y = run_epilogue(x, w, "residual", residual=r, config=cfg, backend="gluon")
    close_everywhere(y, w4a16.reference.gemm(x.cpu(), w.to("cpu"), residual=r.cpu()), dtype)
    # the norm in the kernel where the config has it (E.out_shape), after it in torch otherwise
    norm = E.Norm((torch.rand(2080, generator=gen) + 0.5).to(dtype).cuda(), 1e-5)
    for rep in range(2):   # the row counter is back at zero after each call
        h, n = run_epilogue(x, w, "residual_rmsnorm", residual=r, norm=norm, config=cfg, backend="gluon")
        close_everywhere(h, w4a16.reference.gemm(x.cpu(), w.to("cpu"), residual=r.cpu()), dtype)
        close_everywhere(n, E.rms_norm(h.cpu(), norm.weight.cpu(), norm.eps), dtype)


@DTYPES
@pytest.mark.parametrize("M", [1, 16, 300])
def test_triton_epilogues(M, dtype):
    gen = torch.Generator().manual_seed(M + 1)
    _, _, w = paired_weight(520, 1024, 64, None, dtype, gen)
    w = w.to("cuda")
    x = torch.randn(M, 1024, generator=gen).to(dtype).cuda()
    y = run_epilogue(x, w, "silu_mul", backend="triton")
    silu_mul_close(y, x, w, None, 1.0, dtype)
    v = random_weight(1000, 1024, 128, "float", dtype, "cpu", gen).to("cuda")
    r = torch.randn(M, 1000, generator=gen).to(dtype).cuda()
    y = run_epilogue(x, v, "residual", residual=r, backend="triton")
    close_everywhere(y, w4a16.reference.gemm(x.cpu(), v.to("cpu"), residual=r.cpu()), dtype)


@DTYPES
@pytest.mark.parametrize("backend", ["triton", "gluon"])
@pytest.mark.parametrize("M", [1, 16, 300])
def test_residual_rmsnorm(M, backend, dtype):
    """h and its RMSNorm: the Triton kernel's own row reduction (every named config, several row
    blocks at M = 300), the Gluon decode kernel's (M = 1, 16) and the Gluon prefill kernel's
    residual epilogue with the norm run in torch (M = 300)."""
    if backend == "gluon" and not HOPPER:
        pytest.skip("the Gluon kernels need an sm_90 GPU")
    gen = torch.Generator().manual_seed(M + 7)
    w = random_weight(4096, 1024, 128, "int", dtype, "cpu", gen).to("cuda")   # N = 4096: a Llama hidden size
    x = torch.randn(M, 1024, generator=gen).to(dtype).cuda()
    r = (torch.randn(M, 4096, generator=gen) * 2).to(dtype).cuda()
    norm = E.Norm((torch.rand(4096, generator=gen) + 0.5).to(dtype).cuda(), 1e-5)
    configs = list(w4a16.backends.selection.get("triton").named_configs()) if backend == "triton" else ["auto"]
    for cfg in configs:
        h, n = run_epilogue(x, w, "residual_rmsnorm", residual=r, norm=norm, config=cfg, backend=backend)
        close_everywhere(h, w4a16.reference.gemm(x.cpu(), w.to("cpu"), residual=r.cpu()), dtype)
        close_everywhere(n, E.rms_norm(h.cpu(), norm.weight.cpu(), norm.eps), dtype)


@DTYPES
@pytest.mark.parametrize("backend", ["triton", "gluon"])
@pytest.mark.parametrize("M", [1, 16, 300])
def test_input_norm(M, backend, dtype):
    """x read RMS-normalized: the Triton kernel's prologue (every named config), the Gluon kernels
    after the norm in torch; against the reference on the normalized x."""
    if backend == "gluon" and not HOPPER:
        pytest.skip("the Gluon kernels need an sm_90 GPU")
    gen = torch.Generator().manual_seed(M + 11)
    w = random_weight(1536, 4096, 128, "int", dtype, "cpu", gen).to("cuda")
    x = (torch.randn(M, 4096, generator=gen) * 4).to(dtype).cuda()
    norm = ((torch.rand(4096, generator=gen) + 0.5).to(dtype).cuda(), 1e-5)
    want = w4a16.reference.gemm(E.rms_norm(x.cpu(), norm[0].cpu(), norm[1]), w.to("cpu"))
    configs = list(w4a16.backends.selection.get("triton").named_configs()) if backend == "triton" else ["auto"]
    for cfg in configs:
        y = w4a16.gemm(x, w, config=cfg, backend=backend, input_norm=norm)
        close_everywhere(y, want, dtype)


@DTYPES
def test_fused_decoder_layers_eager_and_graph(dtype):
    pytest.importorskip("transformers")
    import copy

    from w4a16.e2e.speed import build_model, llama_config, llama_dims
    from w4a16.measure import rel_error

    dims = llama_dims(2, hidden_size=512, intermediate_size=1024, num_attention_heads=8, num_key_value_heads=2,
                      vocab_size=1000)
    plain = build_model(llama_config(dims), "cuda", dtype=dtype)
    fused = copy.deepcopy(plain)
    w4a16.quantize_model(plain, group_size=128, progress=False)
    w4a16.quantize_model(fused, group_size=128, progress=False, fuse="layers")
    ids = torch.randint(0, 1000, (1, 33), generator=torch.Generator().manual_seed(2)).cuda()
    with torch.no_grad():
        a, b = plain(input_ids=ids).logits, fused(input_ids=ids).logits
        assert rel_error(b, a) <= (3e-3 if dtype == torch.float16 else 2e-2)
        one = ids[:, :1]
        eager = fused(input_ids=one).logits
        g = torch.cuda.CUDAGraph()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            fused(input_ids=one)
        torch.cuda.current_stream().wait_stream(s)
        with torch.cuda.graph(g):
            out = fused(input_ids=one).logits
        g.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, eager)


@pytest.mark.skipif(not HOPPER, reason="the Gluon kernels need an sm_90 GPU")
@pytest.mark.parametrize("epilogue", ["silu_mul", "residual", "residual_rmsnorm"])
def test_bound_decode_launch_with_epilogues(epilogue):
    """The bound eager launch (Triton's C launcher called directly) with an epilogue gives bitwise
    run_decode's results, for inputs at several addresses, and really takes its fast path."""
    from w4a16.backends.gluon.decode.bound import BoundDecode
    from w4a16.backends.gluon.decode.config import GluonDecodeConfig
    from w4a16.backends.gluon.decode.launch import run_decode
    from w4a16.backends.gluon.layout import prepare_weight

    gen = torch.Generator().manual_seed(21)
    _, _, w = paired_weight(512, 4096, 128, "int", torch.float16, gen)
    pw = prepare_weight(w)
    cfg = GluonDecodeConfig(16, 4, 2, 4, splits=3)
    bound = BoundDecode(pw, 5, torch.float16, False, 1.0, cfg, True, epilogue)
    norm = None
    if epilogue == "residual_rmsnorm":
        norm = E.Norm((torch.rand(1024, generator=gen) + 0.5).half().cuda(), 1e-6)
    for rep in range(2):
        for i in range(3):
            x = torch.randn(5, 4096, generator=gen).half().cuda()
            r = torch.randn(5, 1024, generator=gen).half().cuda() if epilogue != "silu_mul" else None
            y = bound(x, None, r, norm)
            assert torch.equal(y, run_decode(x, pw, None, 1.0, cfg, True, None, epilogue, r, norm)), (rep, i)
    assert bound.fast is not None, "the bound call never resolved its direct launch"
    if epilogue == "silu_mul":
        silu_mul_close(y, x, w, None, 1.0, torch.float16)
    elif epilogue == "residual":
        close_everywhere(y, w4a16.reference.gemm(x.cpu(), w, residual=r.cpu()), torch.float16)
    else:
        close_everywhere(y[0], w4a16.reference.gemm(x.cpu(), w, residual=r.cpu()), torch.float16)
        close_everywhere(y[1], E.rms_norm(y[0].cpu(), norm.weight.cpu(), norm.eps), torch.float16)
