"""examples/moe_qwen3.py runs on the CPU: the quantized model generates the same tokens as the model
whose experts hold the dequantized int4 weights."""
import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("transformers", reason="the e2e extra (pip install 'w4a16[e2e]') is not installed")
pytestmark = pytest.mark.usefixtures("reference_gemm")


def test_moe_example_runs(capsys):
    path = Path(__file__).resolve().parents[2] / "examples" / "moe_qwen3.py"
    spec = importlib.util.spec_from_file_location("moe_qwen3", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    toks = mod.main(["--steps", "4", "--hidden", "128"])
    out = capsys.readouterr().out
    assert "and 2 experts modules" in out and "router" in out
    assert toks["w4a16"] == toks["dequantized experts"] and len(toks["w4a16"]) == 4
