"""quantize_model: what is replaced, what is left alone and why, and the report's numbers (CPU)."""
import re

import pytest
import torch
from torch import nn

import w4a16
from w4a16 import W4A16Error, W4A16Linear, quantize_model, reference
from w4a16.model import QuantizationReport, format_bytes


from tiny_models import Block, TinyLM  # noqa: E402,F401

pytestmark = pytest.mark.usefixtures("reference_gemm")


def test_tiny_lm_replaced_skipped_and_bytes():
    torch.manual_seed(0)
    model = TinyLM().half()
    ids = torch.randint(0, 40, (2, 5))
    ref = model(ids)
    report = quantize_model(model, group_size=32, progress=False)
    names = [f"layers.{i}.{p}" for i in range(2) for p in ("q_proj", "up", "down")]
    assert report.replaced == names
    assert report.skipped == {"lm_head": "skipped by name"}
    assert isinstance(model.lm_head, nn.Linear) and not isinstance(model.layers[0].up, nn.Linear)
    assert all(isinstance(model.get_submodule(n), W4A16Linear) for n in names)
    # weights: fp16 before; codes (1/2 byte) + fp16 scales per 32 after
    d = 64
    elems = 2 * (d * d + 2 * d * d + 2 * d * d)
    assert report.bytes_before == elems * 2
    assert report.bytes_after == elems // 2 + (elems // 32) * 2
    assert report.ratio == pytest.approx(report.bytes_before / report.bytes_after)
    out = model(ids)
    assert out.dtype == torch.float16
    rel = (out.float() - ref.float()).norm() / ref.float().norm()
    assert 0 < rel < 0.1


def test_each_layer_matches_reference():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 16))
    weights = [model[0].weight.detach().clone(), model[2].weight.detach().clone()]
    biases = [model[0].bias.detach().bfloat16(), model[2].bias.detach().bfloat16()]
    report = quantize_model(model, group_size=32, symmetric=False, dtype=torch.bfloat16, progress=False)
    assert report.replaced == ["0", "2"] and report.skipped == {}
    x = torch.randn(2, 3, 64, dtype=torch.bfloat16)
    w0 = reference.quantize(weights[0], 32, symmetric=False, dtype=torch.bfloat16)
    w2 = reference.quantize(weights[1], 32, symmetric=False, dtype=torch.bfloat16)
    h = reference.gemm(x, w0, biases[0])
    torch.testing.assert_close(model[0](x), h, rtol=0, atol=0)
    torch.testing.assert_close(model(x), reference.gemm(nn.functional.gelu(h), w2, biases[1]), rtol=1e-2, atol=1e-2)


def test_ineligible_layers_are_reported():
    torch.manual_seed(2)
    model = nn.ModuleDict({
        "odd": nn.Linear(33, 8),
        "ragged": nn.Linear(48, 8),
        "attn": nn.MultiheadAttention(64, 4),
        "ok": nn.Linear(64, 8),
        "nan": nn.Linear(64, 8),
    })
    with torch.no_grad():
        model["nan"].weight[0, 0] = float("nan")
    report = quantize_model(model, group_size=32, skip=(), progress=False)
    assert report.replaced == ["ok"]
    assert set(report.skipped) == {"odd", "ragged", "attn.out_proj", "nan"}
    assert "odd" in report.skipped["odd"] and "33" in report.skipped["odd"]
    assert "group_size 32" in report.skipped["ragged"]
    assert "NonDynamicallyQuantizableLinear" in report.skipped["attn.out_proj"]
    assert report.skipped["nan"].startswith("weight:")
    assert isinstance(model["nan"], nn.Linear) and isinstance(model["ok"], W4A16Linear)


def test_per_channel_only_needs_even_k():
    model = nn.Sequential(nn.Linear(48, 8), nn.Linear(8, 6))
    report = quantize_model(model, group_size=-1, progress=False)
    assert report.replaced == ["0", "1"]
    assert model[0].scales.shape == (8, 1)


def test_skip_patterns_and_shared_modules():
    torch.manual_seed(3)
    model = TinyLM(layers=3)
    model.layers[2].up = model.layers[1].up  # one module in two places
    report = quantize_model(model, group_size=64, skip=("layers.0", "down", "layers.1.q_proj"), progress=False)
    assert report.replaced == ["layers.1.up", "layers.2.q_proj", "lm_head"]
    assert report.skipped == {
        "layers.0.q_proj": "skipped by name 'layers.0'",
        "layers.0.up": "skipped by name 'layers.0'",
        "layers.0.down": "skipped by name 'layers.0'",
        "layers.1.q_proj": "skipped by name",
        "layers.1.down": "skipped by name 'down'",
        "layers.2.down": "skipped by name 'down'",
    }
    assert model.layers[2].up is model.layers[1].up
    assert isinstance(model.layers[2].up, W4A16Linear)
    assert model.layers[0].up.weight.dtype == torch.float32  # left alone
    assert "layers.10" not in str(report)


def test_report_str_and_progress(capsys):
    model = TinyLM().half()
    report = quantize_model(model, group_size=32, progress=False)
    assert capsys.readouterr().err == ""
    s = str(report)
    assert re.fullmatch(r"quantized 6 Linear layers, \d+\.\d KiB -> \d+\.\d KiB \(3\.\dx smaller\); "
                        r"left alone: lm_head \(skipped by name\)", s), s
    quantize_model(TinyLM(), group_size=32, progress=True)
    assert "quantizing" in capsys.readouterr().err


def test_report_helpers():
    assert format_bytes(512) == "512 B"
    assert format_bytes(1536) == "1.5 KiB"
    assert format_bytes(12.3 * 2**20) == "12.3 MiB"
    assert str(QuantizationReport()) == "quantized 0 Linear layers, 0 B -> 0 B (0.0x smaller)"


@pytest.mark.parametrize("kwargs,arg", [
    (dict(group_size=100), "group_size"),
    (dict(dtype=torch.float32), "dtype"),
])
def test_argument_errors(kwargs, arg):
    with pytest.raises(W4A16Error, match=rf"^{arg}: expected"):
        quantize_model(nn.Sequential(nn.Linear(64, 8)), progress=False, **kwargs)
    with pytest.raises(W4A16Error, match=r"^model: expected"):
        quantize_model("not a model")


def test_exported_at_top_level():
    assert w4a16.quantize_model is quantize_model
