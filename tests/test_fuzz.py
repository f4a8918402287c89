"""Seeded random problems: ``w4a16.gemm`` (the Triton kernels, in the interpreter on a CPU) against
``reference.gemm``, relative Frobenius error <= 2e-3 in fp16; NaN never passes."""
import math

import pytest
import torch

import w4a16
from w4a16 import fuzz

N_CASES = 400
MAX_MNK = (48, 160, 512)  # small enough for ~30 s in all in the interpreter


def test_cases_are_seeded_and_within_the_rules():
    a = list(fuzz.cases(200, seed=7, max_mnk=(64, 256, 1024)))
    assert a == list(fuzz.cases(200, seed=7, max_mnk=(64, 256, 1024)))
    assert a != list(fuzz.cases(200, seed=8, max_mnk=(64, 256, 1024)))
    for c in a:
        assert 0 <= c.M <= 64 and 1 <= c.N <= 256 and 2 <= c.K <= 1024 and c.K % 2 == 0
        assert c.group_size == -1 or c.K % c.group_size == 0
    seen = lambda f: {f(c) for c in a}  # noqa: E731
    assert seen(lambda c: c.group_size) == {32, 64, 128, 256, -1}
    assert seen(lambda c: c.zeros) == set(fuzz.ZEROS) and seen(lambda c: c.x_layout) == set(fuzz.X_LAYOUTS)
    assert seen(lambda c: c.bias) == {True, False} and seen(lambda c: c.act_order) == {True, False}
    assert len(seen(lambda c: c.alpha)) > 2


def test_problem_layouts():
    base = dict(M=6, N=8, K=64, group_size=32, zeros="float", bias=True, alpha=0.5, act_order=True,
                dtype=torch.float16, seed=1)
    for layout, contiguous, dims in [("contiguous", True, 2), ("transposed", False, 2), ("strided", False, 2),
                                     ("batched", True, 3)]:
        x, w, bias = fuzz.make_problem(fuzz.Case(x_layout=layout, **base), "cpu")
        assert x.is_contiguous() == contiguous and x.dim() == dims and x.shape[-1] == 64
        assert w.perm is not None and w.zeros is not None and bias.shape == (8,)


def test_nan_never_passes(monkeypatch):
    case = next(fuzz.cases(1, seed=0, max_mnk=(4, 16, 64)))
    real = w4a16.gemm
    monkeypatch.setattr(w4a16, "gemm", lambda x, w, *a, **k: torch.full_like(real(x, w, *a, **k), float("nan")))
    err = fuzz.run_case(case, "cpu")
    assert (math.isnan(err) or case.M == 0) and (not fuzz.passes(case, err) or case.M == 0)


def test_backend_is_passed_only_when_given(monkeypatch):
    seen = []
    real = w4a16.gemm

    def spy(x, w, *a, **k):
        seen.append(k.get("backend", "absent"))
        k.pop("backend", None)
        return real(x, w, *a, **k)

    monkeypatch.setattr(w4a16, "gemm", spy)
    case = next(fuzz.cases(1, seed=3, max_mnk=(4, 16, 64)))
    fuzz.run_case(case, "cpu")
    fuzz.run_case(case, "cpu", backend="reference")
    assert seen == ["absent", "reference"]


@pytest.mark.parametrize("chunk", range(4))
def test_fuzz_against_the_reference(chunk):
    """N_CASES seeded cases in 4 chunks (each chunk its own seed), through the kernels."""
    from w4a16.ops import describe_path

    device = "cuda" if torch.cuda.is_available() else "cpu"
    assert describe_path(torch.device(device))[0] != "reference"  # the kernels run, not the reference
    failed = []
    for case in fuzz.cases(N_CASES // 4, seed=100 + chunk, max_mnk=MAX_MNK):
        err = fuzz.run_case(case, device)
        if not fuzz.passes(case, err):
            failed.append(f"{case.short()}: rel err {err:.3g}")
    assert not failed, "\n".join(failed[:10])


def test_fuzz_command_counts_refusals_apart(capsys):
    """``w4a16 fuzz``: a named backend's refusals (BackendRefused) are counted, not failed, and
    more cases are drawn; a backend that runs none of them fails the run. On a CPU the Gluon
    backend refuses every call and the reference backend runs them all."""
    from w4a16.cli import main

    assert main(["fuzz", "--cases", "5", "--device", "cpu", "--backend", "reference", "--max-mnk", "8,40,128"]) == 0
    assert "[reference] 5 passed, 0 failed, 0 refused" in capsys.readouterr().out
    if torch.cuda.is_available():
        pytest.skip("the Gluon backend may run here")
    assert main(["fuzz", "--cases", "5", "--device", "cpu", "--backend", "gluon", "--max-mnk", "8,40,128"]) == 1
    out = capsys.readouterr().out
    assert "[gluon] 0 passed, 0 failed, 100 refused" in out and "FAIL" not in out


def test_fuzz_command_rejects_bad_bounds():
    from w4a16.cli import main
    from w4a16.errors import W4A16Error

    with pytest.raises(W4A16Error, match="--max-mnk: expected three integers"):
        main(["fuzz", "--cases", "1", "--device", "cpu", "--max-mnk", "8,40"])


def test_cases_draw_epilogues_and_they_pass():
    """About 30% of the cases carry an epilogue, every kind; SiLU(gate)*up cases have N a multiple
    of 16; drawing them left the rest of each seed's case list alone."""
    cs = list(fuzz.cases(400, seed=5, max_mnk=(9, 64, 256)))
    kinds = [c.epilogue for c in cs]
    assert 60 <= sum(k is not None for k in kinds) <= 180
    assert {"silu_mul", "residual", "residual_rmsnorm"} <= set(kinds)
    assert all(c.N % 16 == 0 for c in cs if c.epilogue == "silu_mul")
    assert 15 <= sum(c.input_norm for c in cs) <= 70
    picked = ([c for c in cs if c.epilogue][:12] + [c for c in cs if c.epilogue == "residual_rmsnorm"][:4]
              + [c for c in cs if c.input_norm][:6])
    for c in picked:
        assert fuzz.passes(c, fuzz.run_case(c, "cpu")), c.short()
