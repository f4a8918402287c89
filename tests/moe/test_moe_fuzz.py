"""w4a16 fuzz --moe: random MoE layers through fused_moe against the reference pass on the CPU
(Triton's interpreter), a wrong kernel is caught, and a backend that does not exist is refused."""
import pytest

from w4a16.cli import main
from w4a16.moe import fuzz as moe_fuzz


def test_moe_fuzz_passes(capsys):
    assert main(["fuzz", "--moe", "--cases", "12", "--backend", "triton", "--max-mnk", "9,128,128"]) == 0
    assert "[triton] 12 passed, 0 failed" in capsys.readouterr().out


def test_cases_cover_the_edges():
    cs = list(moe_fuzz.cases(300, seed=1))
    assert {c.routing for c in cs} == set(moe_fuzz.ROUTINGS) and {c.group for c in cs} == {32, 64, 128, 256, -1}
    assert any(c.T == 0 for c in cs) and any(c.k == 1 for c in cs) and any(c.zeros == "float" for c in cs)
    assert all(c.H % (c.group if c.group > 0 else 8) == 0 and c.k <= c.E for c in cs)
    assert any(c.I % 16 for c in cs) and any(c.I % 16 == 0 and c.H % 16 == 0 for c in cs)   # both kernels


def test_a_wrong_layer_fails(monkeypatch, capsys):
    from w4a16.moe import ops

    monkeypatch.setattr(ops, "fused_moe", lambda x, *a, **k: x * 0 + 1)
    assert main(["fuzz", "--moe", "--cases", "4", "--backend", "reference", "--max-mnk", "5,64,64"]) == 1
    out = capsys.readouterr().out
    assert out.count("FAIL [reference]") >= 3        # every case with tokens (one of the 4 has none)


def test_unknown_backend_is_refused():
    from w4a16.errors import W4A16Error

    with pytest.raises(W4A16Error, match="--backend: expected one of"):
        main(["fuzz", "--moe", "--cases", "1", "--backend", "cutlass"])
