"""The stream-K schedule of the Gluon decode kernel (``decode_sk.py``) on an sm_90 GPU against
w4a16.reference.gemm: the option matrix, program counts that split tiles unevenly (one unit per
program, ranges crossing several tiles, a tile shared by many programs), bitwise determinism, the
tile counters left at zero, CUDA-graph replay, and the bound eager launch."""
import dataclasses

import pytest
import torch

pytestmark = pytest.mark.gpu   # selected by: pytest -m gpu tests

if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9:
    pytest.skip("needs an sm_90 (Hopper) GPU", allow_module_level=True)
from gluon_helpers import skip_unless_gluon  # noqa: E402

skip_unless_gluon()

from w4a16 import reference  # noqa: E402
from w4a16.backends.gluon.decode.config import GluonDecodeConfig, heuristic  # noqa: E402
from w4a16.backends.gluon.decode.launch import plan_for, run_decode  # noqa: E402
from w4a16.backends.workspace import tile_counters  # noqa: E402
from gluon_helpers import prep, rel  # noqa: E402
from w4a16.measure import graph_replay_matches_eager, random_weight  # noqa: E402


def _sk(M, N, K, group, programs=0):
    return dataclasses.replace(heuristic(M, N, K, group, 132), ws=True, sk=True, splits=programs)


def _run(x, pw, bias, alpha, cfg, dtype):
    y = torch.full((x.shape[0], pw.N), float("nan"), dtype=dtype, device="cuda")
    run_decode(x.cuda(), pw, None if bias is None else bias.cuda(), alpha, cfg, out=y)
    return y


@pytest.mark.parametrize("dtype,group,zeros", [(torch.float16, 128, None), (torch.float16, 32, None),
                                                (torch.float16, -1, "float"), (torch.float16, 64, "int"),
                                                (torch.bfloat16, 128, None), (torch.bfloat16, 32, "int")],
                         ids=["fp16-g128", "fp16-g32", "fp16-perchannel-float", "fp16-g64-int", "bf16-g128",
                              "bf16-g32-int"])
def test_matrix(dtype, group, zeros):
    gen = torch.Generator().manual_seed(17)
    tol = 2e-3 if dtype == torch.float16 else 1e-2
    for i, (N, K) in enumerate([(72, 576), (200, 1376), (4100, 4096)]):
        if group != -1 and K % group:
            continue
        w = random_weight(N, K, group, zeros, dtype, "cpu", gen)
        pw = prep(w)
        for j, M in enumerate([1, 16, 33]):
            x = torch.randn(M, K, generator=gen).to(dtype)
            bias = (torch.randn(N, generator=gen) * 0.1).to(dtype) if (i + j) % 2 else None
            alpha = 0.5 if j % 3 == 0 else 1.0
            cfg = _sk(M, N, K, w.group_size_effective)
            y = _run(x, pw, bias, alpha, cfg, dtype)
            assert rel(y, reference.gemm(x, w, bias, alpha)) <= tol, (M, N, K, cfg.short())


@pytest.mark.parametrize("programs", [1, 3, 7, 50, 97, 0])
@pytest.mark.parametrize("M,N,K", [(1, 72, 576), (16, 200, 14336), (5, 4100, 1376)])
def test_program_counts(programs, M, N, K):
    """Every way the units can fall: P > units (clamped), one unit per program, ranges crossing
    tiles, a tile shared by dozens of programs; deterministic, counters back at zero."""
    gen = torch.Generator().manual_seed(18)
    w = random_weight(N, K, 32, "int", torch.float16, "cpu", gen)
    pw = prep(w)
    x = torch.randn(M, K, generator=gen).half()
    b = (torch.randn(N, generator=gen) * 0.1).half()
    cfg = _sk(M, N, K, 32, programs)
    plan = plan_for(pw, M, cfg, True)
    assert plan.split_mode == 3 and plan.grid[0] <= plan.sps
    y1 = _run(x, pw, b, 0.5, cfg, torch.float16)
    y2 = _run(x, pw, b, 0.5, cfg, torch.float16)
    assert torch.equal(y1, y2)
    assert rel(y1, reference.gemm(x, w, b, 0.5)) <= 2e-3
    torch.cuda.synchronize()
    assert int(tile_counters(torch.device("cuda", torch.cuda.current_device()), plan.n_counters).abs().sum()) == 0


def test_cuda_graph():
    gen = torch.Generator().manual_seed(19)
    w = random_weight(200, 1376, 32, "float", torch.float16, "cpu", gen)
    pw = prep(w)
    x = torch.randn(7, 1376, generator=gen).half().cuda()
    cfg = GluonDecodeConfig(8, 4, 2, 3, splits=5, sk=True)
    assert graph_replay_matches_eager(lambda out: run_decode(x, pw, None, 0.5, cfg, out=out), replays=3)


@pytest.mark.parametrize("bias", [True, False])
def test_bound_launch_matches_run_decode(bias):
    from w4a16.backends.gluon.decode.bound import BoundDecode
    gen = torch.Generator().manual_seed(20)
    w = random_weight(1000, 4096, 128, "int", torch.float16, "cpu", gen)
    pw = prep(w)
    b = (torch.randn(1000, generator=gen) * 0.1).half().cuda() if bias else None
    cfg = GluonDecodeConfig(16, 4, 2, 4, sk=True)
    bound = BoundDecode(pw, 5, torch.float16, bias, 0.5, cfg, True)
    xs = [torch.randn(5, 4096, generator=gen).half().cuda() for _ in range(3)]
    for _ in range(2):
        for x in xs:
            assert torch.equal(bound(x, b), run_decode(x, pw, b, 0.5, cfg))
    assert bound.fast is not None
    assert rel(bound(xs[0], b), reference.gemm(xs[0].cpu(), w, None if b is None else b.cpu(), 0.5)) <= 2e-3
