"""The Gluon kernels' support rule (backends/gluon/support.py) is the one the backend answers with,
and the C library's rule (capi.loader.gluon_applies, the mirror of its gluon_class) never accepts
a problem the Python rule refuses."""
import itertools

import torch

from w4a16 import spec
from w4a16.backends import Problem, get
from w4a16.backends.gluon.support import MAX_DECODE_M, call_reason, problem_reason
from w4a16.capi.loader import gluon_applies

NS = (1, 14, 16, 90, 4096)
KS = (8, 16, 24, 80, 96, 128, 200, 256, 1376, 4096)
MS = (1, 64, 65, 4096)


def test_the_backend_answers_with_the_rule():
    b = get("gluon")
    for M, N, K, g, dt in itertools.product(MS, NS, KS, spec.SUPPORTED_GROUP_SIZES, (torch.float16, torch.bfloat16)):
        ge = K if g == -1 else g
        p = Problem(M, N, K, ge, dt, False, torch.device("cpu"))
        assert b.supports(p) == problem_reason(M, N, K, ge, dt)


def test_the_c_librarys_rule_is_a_subset():
    for M, N, K, g in itertools.product(MS, NS, KS, spec.SUPPORTED_GROUP_SIZES):
        ge = K if g == -1 else g
        if K % ge == 0 and gluon_applies(M, N, K, g):
            assert problem_reason(M, N, K, ge, torch.float16) is None, (M, N, K, g)


def test_refusals_name_the_reason():
    assert "16 bytes" in problem_reason(4, 64, 100, 100, torch.float16)
    assert "group size 96" in problem_reason(4, 64, 4096, 96, torch.float16)
    assert "fp16/bf16" in problem_reason(4, 64, 4096, 128, torch.float32)
    assert "32-bit output offsets" in problem_reason(65536, 57344, 4096, 128, torch.float16)
    assert "decode kernel" in call_reason(MAX_DECODE_M + 1, 64, 4096, 128, torch.float16, kernel="decode")
    assert "decode kernel's range" in call_reason(MAX_DECODE_M, 64, 4096, 128, torch.float16, kernel="prefill")
    # per-channel weights of any K that TMA takes, small and odd ones included (the fuzz's cases)
    assert problem_reason(2, 14, 80, 80, torch.bfloat16) is None
    assert problem_reason(64, 90, 16, 16, torch.bfloat16) is None


def test_the_norm_epilogue_runs_in_the_kernel_only_where_it_compiles(monkeypatch):
    """"residual_rmsnorm" is the kernel's own with warp-specialized, non-stream-K decode configs
    on outputs of at most NORM_MAX_ELEMENTS while KERNEL_NORM is on; the other configs and sizes
    (and everything while it is off) run the residual epilogue, and w4a16.gemm the norm after it."""
    from w4a16.backends.gluon.decode import config
    from w4a16.backends.gluon.decode.config import GluonDecodeConfig
    from w4a16.backends.gluon.prefill.config import NAMED as PREFILL

    b = get("gluon")
    ws, sk, single = (GluonDecodeConfig(8, 4, 2, 4), GluonDecodeConfig(8, 4, 2, 4, sk=True),
                      GluonDecodeConfig(8, 4, 2, 4, ws=False))
    prefill = next(iter(PREFILL.values()))
    small = config.NORM_MAX_ELEMENTS // 4096
    for on in (False, True):
        monkeypatch.setattr(config, "KERNEL_NORM", on)
        assert ("residual_rmsnorm" in b.config_epilogues(ws, small, 4096)) is on
        for M, N in ((small + 1, 4096), (0, 0), (1, config.NORM_MAX_ELEMENTS + 1)):
            assert b.config_epilogues(ws, M, N) == (None, "silu_mul", "residual")
        for cfg in (sk, single, prefill):
            assert b.config_epilogues(cfg, 1, 4096) == (None, "silu_mul", "residual")
    assert ws.norm_epilogue and not sk.norm_epilogue and not single.norm_epilogue


def test_the_norm_epilogue_is_refused_where_the_kernel_does_not_run_it():
    """A backend call or an offline compile asking the kernel for the norm where it does not run
    it gets an error naming the argument, before anything is launched or compiled."""
    from types import SimpleNamespace

    import pytest

    from w4a16.backends.gluon.decode.config import GluonDecodeConfig
    from w4a16.backends.gluon.offline import compile_decode
    from w4a16.errors import W4A16Error

    sk = GluonDecodeConfig(8, 4, 2, 4, sk=True)
    with pytest.raises(W4A16Error, match="^epi: expected not 3"):
        compile_decode(sk, epi=3)
    x2 = torch.zeros(1, 64, dtype=torch.float16)
    with pytest.raises(W4A16Error, match="^epilogue: expected one of .* with config g8x64c2s4wssk and M = 1"):
        get("gluon").run(x2, SimpleNamespace(N=4096), None, 1.0, sk, epilogue="residual_rmsnorm")
