"""The Gluon decode kernel on an sm_90 GPU against w4a16.reference.gemm: the full option matrix,
determinism, atomic split-K, CUDA-graph capture."""
import pytest
import torch

pytestmark = pytest.mark.gpu   # selected by: pytest -m gpu tests

if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9:
    pytest.skip("needs an sm_90 (Hopper) GPU", allow_module_level=True)
from gluon_helpers import skip_unless_gluon  # noqa: E402

skip_unless_gluon()

from w4a16 import reference  # noqa: E402
from w4a16.backends.gluon.decode.config import GluonDecodeConfig, heuristic  # noqa: E402
from w4a16.backends.gluon.decode.launch import run_decode  # noqa: E402
from w4a16.backends.gluon.support import call_reason  # noqa: E402
from gluon_helpers import option_matrix, prep, rel  # noqa: E402
from w4a16.measure import graph_replay_matches_eager, random_weight  # noqa: E402

MS = [1, 2, 7, 8, 15, 16, 33, 64]
NKS = [(72, 576), (200, 1376), (4100, 4096)]


@option_matrix
def test_matrix(dtype, group, zeros):
    gen = torch.Generator().manual_seed(7)
    tol = 2e-3 if dtype == torch.float16 else 1e-2
    for i, (N, K) in enumerate(NKS):
        if group != -1 and K % group:
            continue
        w = random_weight(N, K, group, zeros, dtype, "cpu", gen)
        pw = prep(w)
        for j, M in enumerate(MS):
            x = torch.randn(M, K, generator=gen).to(dtype)
            bias = (torch.randn(N, generator=gen) * 0.1).to(dtype) if (i + j) % 2 else None
            alpha = 0.5 if j % 3 == 0 else 1.0
            ref = reference.gemm(x, w, bias, alpha)
            assert call_reason(M, N, K, w.group_size_effective, dtype, x.cuda(), "decode") is None
            y = torch.full((M, N), float("nan"), dtype=dtype, device="cuda")
            cfg = heuristic(M, N, K, w.group_size_effective, 132)
            run_decode(x.cuda(), pw, None if bias is None else bias.cuda(), alpha, cfg, out=y)
            assert rel(y, ref) <= tol, (M, N, K, cfg.short())


@pytest.mark.parametrize("cfg", [GluonDecodeConfig(16, 4, 2, 4, splits=7), GluonDecodeConfig(8, 8, 4, 3, splits=3),
                                 GluonDecodeConfig(64, 8, 1, 4, splits=5), GluonDecodeConfig(16, 4, 2, 4, ws=False)],
                         ids=lambda c: c.short())
def test_split_deterministic_and_atomic(cfg):
    gen = torch.Generator().manual_seed(8)
    w = random_weight(4096, 14336, 128, "int", torch.float16, "cpu", gen)
    pw = prep(w)
    x = torch.randn(min(cfg.mt, 13), 14336, generator=gen).half()
    ref = reference.gemm(x, w)
    y1 = run_decode(x.cuda(), pw, None, 1.0, cfg)
    y2 = run_decode(x.cuda(), pw, None, 1.0, cfg)
    assert torch.equal(y1, y2)
    assert rel(y1, ref) <= 2e-3
    ya = run_decode(x.cuda(), pw, None, 1.0, cfg, deterministic=False)
    assert rel(ya, ref) <= 2e-3


def test_cuda_graph():
    gen = torch.Generator().manual_seed(9)
    w = random_weight(200, 1376, 32, "float", torch.float16, "cpu", gen)
    pw = prep(w)
    x = torch.randn(7, 1376, generator=gen).half().cuda()
    cfg = GluonDecodeConfig(8, 4, 2, 3, splits=2)
    assert graph_replay_matches_eager(lambda out: run_decode(x, pw, None, 0.5, cfg, out=out), replays=3)


def test_unsupported_reasons():
    x = torch.zeros(4, 100, dtype=torch.float16)
    assert call_reason(65, 64, 4096, 128, torch.float16, None, "decode") is not None
    assert "16" in call_reason(4, 64, 100, 100, torch.float16, None, "decode")   # K * 2 = 200 bytes: not TMA-aligned
    assert call_reason(4, 64, 4096, 128, torch.float32, None, "decode") is not None
    del x


@pytest.mark.parametrize("cfg,bias,dtype", [(GluonDecodeConfig(16, 4, 2, 4, splits=1), True, torch.float16),
                                            (GluonDecodeConfig(16, 4, 2, 4, splits=5), False, torch.float16),
                                            (GluonDecodeConfig(8, 8, 4, 3, splits=3), True, torch.bfloat16)],
                         ids=["one-split-bias", "split5", "split3-bias-bf16"])
def test_bound_launch_matches_run_decode(cfg, bias, dtype):
    """The bound eager launch (descriptors encoded once, Triton's C launcher called directly) gives
    bitwise the results of run_decode, for x at several addresses, and really takes its fast path."""
    from w4a16.backends.gluon.decode.bound import BoundDecode
    gen = torch.Generator().manual_seed(10)
    w = random_weight(1000, 4096, 128, "int", dtype, "cpu", gen)
    pw = prep(w)
    b = (torch.randn(1000, generator=gen) * 0.1).to(dtype).cuda() if bias else None
    bound = BoundDecode(pw, 5, dtype, bias, 0.5, cfg, True)
    xs = [torch.randn(5, 4096, generator=gen).to(dtype).cuda() for _ in range(3)]
    for rep in range(2):
        for x in xs:
            y = bound(x, b)
            assert torch.equal(y, run_decode(x, pw, b, 0.5, cfg)), (rep, cfg.short())
    assert bound.fast is not None, "the bound call never resolved its direct launch"
    ref = reference.gemm(xs[0].cpu(), w, None if b is None else b.cpu(), 0.5)
    assert rel(bound(xs[0], b), ref) <= (2e-3 if dtype == torch.float16 else 1e-2)


def test_gemm_fast_path_uses_bound_launch():
    """w4a16.gemm's eager fast path on the Gluon backend ends in a BoundDecode that resolved."""
    import w4a16
    from w4a16.backends.gluon.decode.bound import BoundDecode
    gen = torch.Generator().manual_seed(11)
    w = random_weight(512, 1024, 128, None, torch.float16, "cpu", gen).to("cuda")
    x = torch.randn(1, 1024, generator=gen).half().cuda()
    ys = [w4a16.gemm(x, w, backend="gluon") for _ in range(3)]
    bound = w4a16.ops.bound_calls(w)
    assert len(bound) == 1 and isinstance(bound[0], BoundDecode) and bound[0].fast is not None
    assert torch.equal(ys[0], ys[2])
    assert rel(ys[2], reference.gemm(x.cpu(), w.to("cpu"))) <= 2e-3
