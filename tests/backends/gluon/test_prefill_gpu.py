"""The Gluon prefill kernel (M >= 65) on an sm_90 GPU against w4a16.reference.gemm: the full option
matrix on ragged M / N / K, outputs poisoned with NaN and every element checked, every shipped
config and the sweep's candidates, determinism, CUDA-graph capture, and the backend dispatch."""
import pytest
import torch

pytestmark = pytest.mark.gpu   # selected by: pytest -m gpu tests

if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9:
    pytest.skip("needs an sm_90 (Hopper) GPU", allow_module_level=True)
from gluon_helpers import skip_unless_gluon  # noqa: E402

skip_unless_gluon()

from w4a16 import reference  # noqa: E402
from w4a16.backends.gluon.prefill.config import NAMED, SPLIT_CONFIGS, GluonPrefillConfig, prefill_candidates  # noqa: E402
from w4a16.backends.gluon.prefill.launch import run_prefill  # noqa: E402
from w4a16.backends.gluon.support import call_reason  # noqa: E402
from gluon_helpers import option_matrix, prep, rel  # noqa: E402
from w4a16.measure import graph_replay_matches_eager, random_weight  # noqa: E402

MS = [65, 300, 1000, 2049]
NKS = [(72, 576), (200, 1376), (4100, 4096)]


def _run(x, pw, bias, alpha, cfg):
    y = torch.full((x.shape[0], pw.N), float("nan"), dtype=x.dtype, device="cuda")
    run_prefill(x, pw, bias, alpha, cfg, out=y)
    torch.cuda.synchronize()
    return y


@option_matrix
def test_matrix(dtype, group, zeros):
    gen = torch.Generator().manual_seed(11)
    tol = 2e-3 if dtype == torch.float16 else 1e-2
    cfg = NAMED["prefill-128"]
    for i, (N, K) in enumerate(NKS):
        if group != -1 and K % group:
            continue
        w = random_weight(N, K, group, zeros, dtype, "cpu", gen).to("cuda")
        pw = prep(w)
        for j, M in enumerate(MS):
            x = torch.randn(M, K, generator=gen).to(dtype).cuda()
            bias = (torch.randn(N, generator=gen) * 0.1).to(dtype).cuda() if (i + j) % 2 else None
            alpha = 0.5 if j % 3 == 0 else 1.0
            assert call_reason(M, N, K, w.group_size_effective, dtype, x, "prefill") is None
            ref = reference.gemm(x, w, bias, alpha)
            assert rel(_run(x, pw, bias, alpha, cfg), ref) <= tol, (M, N, K, group, zeros)


def _all_configs():
    cfgs = list(NAMED.values())
    for c in prefill_candidates(4096, 28672, 4096, 128, 132) + prefill_candidates(1024, 8192, 28672, 32, 132):
        if c not in cfgs:
            cfgs.append(c)
    return cfgs


@pytest.mark.parametrize("cfg", _all_configs(), ids=lambda c: c.short())
def test_every_config(cfg):
    """Each config on ragged shapes (partial row, token and K tiles; several tiles per program)."""
    gen = torch.Generator().manual_seed(12)
    for (M, N, K, g, zeros, dtype) in [(300, 4100, 4096, 128, None, torch.float16),
                                       (2049, 200, 1376, 32, "float", torch.bfloat16),
                                       (1000, 8192, 4096, 64, "int", torch.float16)]:
        w = random_weight(N, K, g, zeros, dtype, "cpu", gen).to("cuda")
        pw = prep(w)
        x = torch.randn(M, K, generator=gen).to(dtype).cuda()
        bias = (torch.randn(N, generator=gen) * 0.1).to(dtype).cuda()
        ref = reference.gemm(x, w, bias, 0.75)
        tol = 2e-3 if dtype == torch.float16 else 1e-2
        assert rel(_run(x, pw, bias, 0.75, cfg), ref) <= tol, (cfg.short(), M, N, K)


# The child of test_split_configs_in_a_child_process: each config (a repr) on a ragged call with the
# output poisoned, then twice on a long K (bitwise equal, right); one line per config.
SPLIT_CHILD = """
import sys, torch
from w4a16 import reference
from w4a16.backends.gluon.layout import prepare_weight
from w4a16.backends.gluon.prefill.config import GluonPrefillConfig
from w4a16.backends.gluon.prefill.launch import run_prefill
from w4a16.measure import random_weight, rel_error
for arg in sys.argv[1:]:
    cfg = eval(arg, {"GluonPrefillConfig": GluonPrefillConfig})
    print("START", arg, flush=True)
    gen = torch.Generator().manual_seed(1)
    w = random_weight(200, 1376, 32, "float", torch.float16, "cpu", gen).to("cuda")
    x = torch.randn(300, 1376, generator=gen).half().cuda()
    b = (torch.randn(200, generator=gen) * 0.1).half().cuda()
    y = torch.full((300, 200), float("nan"), dtype=torch.float16, device="cuda")
    run_prefill(x, prepare_weight(w), b, 0.5, cfg, out=y)
    err = rel_error(y, reference.gemm(x, w, b, 0.5))
    w = random_weight(4096, 14336, 128, "int", torch.float16, "cpu", gen).to("cuda")
    x = torch.randn(1000, 14336, generator=gen).half().cuda()
    pw = prepare_weight(w)
    y1, y2 = run_prefill(x, pw, None, 1.0, cfg), run_prefill(x, pw, None, 1.0, cfg)
    derr = rel_error(y1, reference.gemm(x, w))
    ok = err <= 2e-3 and derr <= 2e-3 and bool(torch.equal(y1, y2))
    print("OK" if ok else "FAIL", arg, f"err={err:.2e} long-K err={derr:.2e} bitwise={bool(torch.equal(y1, y2))}",
          flush=True)
"""


def test_split_configs_in_a_child_process():
    """The K-split configs on a ragged problem, in a child process with a time limit, so that a
    deadlock fails this test instead of hanging the suite; then bitwise equal twice and right on a
    long K, in the same child."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    src = str(Path(__file__).resolve().parents[3] / "src")
    args = [repr(c).replace(" ", "") for c in SPLIT_CONFIGS]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]))
    try:
        r = subprocess.run([sys.executable, "-c", SPLIT_CHILD, *args], capture_output=True, text=True,
                           timeout=300, env=env)
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        pytest.fail(f"a split config hung (child killed after 300 s); last lines:\n{out[-2000:]}")
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith(("OK", "FAIL"))]
    assert r.returncode == 0 and len(lines) == len(args), r.stdout[-3000:] + r.stderr[-3000:]
    assert all(ln.startswith("OK") for ln in lines), "\n".join(lines)


def test_deterministic():
    gen = torch.Generator().manual_seed(13)
    w = random_weight(4096, 14336, 128, "int", torch.float16, "cpu", gen).to("cuda")
    pw = prep(w)
    x = torch.randn(1000, 14336, generator=gen).half().cuda()
    for cfg in NAMED.values():
        y1 = _run(x, pw, None, 1.0, cfg)
        y2 = _run(x, pw, None, 1.0, cfg)
        assert torch.equal(y1, y2), cfg.short()
    assert rel(y1, reference.gemm(x, w)) <= 2e-3


def test_cuda_graph():
    gen = torch.Generator().manual_seed(14)
    w = random_weight(200, 1376, 32, "float", torch.float16, "cpu", gen).to("cuda")
    pw = prep(w)
    x = torch.randn(300, 1376, generator=gen).half().cuda()
    cfg = NAMED["prefill-128"]
    assert graph_replay_matches_eager(lambda out: run_prefill(x, pw, None, 0.5, cfg, out=out), replays=3)


def test_backend_dispatch():
    """backend="auto" and backend="gluon" run the prefill kernel above M = 64 on sm_90 (tuned or by
    the heuristic); a prefill config object or name runs it too."""
    import w4a16
    from w4a16.backends import selection
    from w4a16.backends.gluon.backend import GluonBackend
    gen = torch.Generator().manual_seed(15)
    w = random_weight(4096, 4096, 128, None, torch.float16, "cpu", gen).to("cuda")
    x = torch.randn(512, 4096, generator=gen).half().cuda()
    ref = reference.gemm(x, w)
    p = selection.problem_of(x, w)
    assert isinstance(GluonBackend().default_config(p), GluonPrefillConfig)
    auto = selection.choose(p, "auto")
    assert auto.backend.name == "gluon" and isinstance(auto.config, GluonPrefillConfig), auto.reason
    ch = selection.choose(p, "gluon")
    assert ch.backend.name == "gluon" and isinstance(ch.config, GluonPrefillConfig)
    assert rel(w4a16.gemm(x, w), ref) <= 2e-3
    assert rel(w4a16.gemm(x, w, backend="gluon"), ref) <= 2e-3
    assert rel(w4a16.gemm(x, w, config=NAMED["prefill-128-coop"]), ref) <= 2e-3
    assert rel(w4a16.gemm(x, w, config="gluon-prefill-128"), ref) <= 2e-3


def test_unsupported_reasons():
    assert call_reason(64, 4096, 4096, 128, torch.float16, None, "prefill") is not None      # the decode kernel's range
    assert call_reason(65536, 57344, 4096, 128, torch.float16, None, "prefill") is not None  # 32-bit offsets
    assert call_reason(1024, 64, 100, 100, torch.float16, None, "prefill") is not None       # K * 2 not 16-byte aligned
    assert call_reason(1024, 64, 4096, 96, torch.float16, None, "prefill") is not None       # group size
