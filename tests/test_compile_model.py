"""torch.compile over a quantized model's decode step: one graph, no graph break, no recompile.

The first traced call of a shape used to reach the backend selection (tuning files, device
properties, a comprehension Dynamo cannot trace) and break the graph at every W4A16 layer; with
transformers' decoder layers sharing one code object, the resumed frames then recompiled per
layer until Dynamo's recompile limit. The choice is now made at trace time, outside the graph.
Runs the Triton kernels in the interpreter (fp16, a 2-layer Llama of width 128).
"""
import importlib.util

import pytest
import torch

pytest.importorskip("transformers", reason="the e2e extra (pip install 'w4a16[e2e]') is not installed")
if importlib.util.find_spec("triton") is None:
    pytest.skip("needs triton (kernels in the interpreter)", allow_module_level=True)

import w4a16  # noqa: E402
from w4a16.e2e import speed  # noqa: E402

TINY = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2, vocab_size=256)


@pytest.mark.parametrize("fuse", [True, False, "layers"], ids=["fused", "separate", "fused-layers"])
def test_decode_step_traces_as_one_graph(monkeypatch, fuse):
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model = speed.build_model(speed.llama_config(speed.llama_dims(layers=2, **TINY)), dev, torch.float16)
    w4a16.quantize_model(model, group_size=32, progress=False, fuse=fuse)
    dec = speed.StaticDecoder(model, batch=1, context=16, prompt_len=4, device=dev)
    dec.prefill(torch.randint(0, TINY["vocab_size"], (1, 4), device=dev))   # M = 4 eagerly: M = 1 is new
    import torch._dynamo as dynamo

    dynamo.reset()
    with torch.no_grad():
        explained = dynamo.explain(model.forward)(input_ids=dec.ids, **dec.kwargs)
    reasons = [str(b.reason)[:200] for b in explained.break_reasons]
    assert explained.graph_break_count == 0 and explained.graph_count == 1, reasons
    gemms = [n for g in explained.graphs for n in g.graph.nodes if "w4a16.gemm" in str(n.target)]
    assert gemms, "the W4A16 GEMMs are not custom ops in the graph"
    if fuse == "layers":
        # o and down of both layers write the norm that reads their output (the down projections'
        # hand-off to the next layer's and the final norm traces with them)
        assert sum("residual_rmsnorm" in n.args for n in gemms) == 4, [n.args[8:9] for n in gemms]


@pytest.mark.parametrize("fuse", [True, "layers"], ids=["fused", "fused-layers"])
def test_compiled_decode_steps_do_not_recompile(monkeypatch, fuse):
    """Several compiled decode steps (the cache position moving on): one compiled frame, no
    recompile, and the step's logits those of the eager step."""
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model = speed.build_model(speed.llama_config(speed.llama_dims(layers=2, **TINY)), dev, torch.float16)
    w4a16.quantize_model(model, group_size=32, progress=False, fuse=fuse)
    import torch._dynamo as dynamo
    from torch._dynamo.utils import counters

    dynamo.reset()
    counters.clear()
    prompt = torch.randint(0, TINY["vocab_size"], (1, 4), device=dev)
    eager = speed.StaticDecoder(model, batch=1, context=16, prompt_len=4, device=dev)
    compiled = speed.StaticDecoder(model, batch=1, context=16, prompt_len=4, device=dev, compile=True)
    compiled.forward = torch.compile(model.forward, backend="aot_eager", dynamic=False)
    compiled.prefill(prompt)
    compiled.step()   # its eager first step, then the traced one
    for dec in (eager, compiled):
        dec.prefill(prompt)   # both caches from the same start
    for _ in range(3):
        want, got = eager.step(), compiled.step()
        torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)
    assert counters["frames"]["ok"] == 1 and not counters.get("recompiles"), (dict(counters["frames"]),
                                                                            dict(counters.get("recompiles", {})))


def test_traced_choice_is_marked_like_torchs_decorator():
    """ops marks the traced choice the way torch._dynamo.assume_constant_result does, without
    importing Dynamo when w4a16 is imported: this fails if torch changes how it marks."""
    import torch._dynamo as dynamo

    from w4a16 import ops

    def probe():
        return 0
    marked = dynamo.assume_constant_result(probe)
    assert getattr(marked, "_dynamo_marked_constant", False) is True
    assert ops._traced_choice._dynamo_marked_constant is True
