"""Structure of the end-to-end speed run (w4a16.e2e.speed) on a tiny Llama, on the CPU.

Timings on a CPU mean nothing; these check that the run goes through, returns its fields,
checks the W4A16 logits, writes its JSON, and stops loudly when the quantized model is wrong.
"""
import json

import pytest
import torch

pytest.importorskip("transformers", reason="the e2e extra (pip install 'w4a16[e2e]') is not installed")

from w4a16.e2e import speed  # noqa: E402
from w4a16.nn import W4A16Linear  # noqa: E402

TINY = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2, vocab_size=512)
RUN = dict(layers=2, batches=(1, 2), prefill_tokens=16, group_size=32, device="cpu", context=32, iters=2,
           prompt_len=4, verify_tokens=8, config_overrides=TINY, print_fn=None)


# Whole-model runs take the pure-torch GEMM on the CPU (conftest.reference_gemm_module).
pytestmark = pytest.mark.usefixtures("reference_gemm_module")


@pytest.fixture(scope="module")
def result():
    return speed.run_speed(**RUN)


def test_config_has_llama3_8b_dimensions():
    dims = speed.llama_dims()
    assert (dims["hidden_size"], dims["intermediate_size"], dims["num_hidden_layers"]) == (4096, 14336, 32)
    assert (dims["num_attention_heads"], dims["num_key_value_heads"], dims["vocab_size"]) == (32, 8, 128256)
    assert speed.llama_dims(layers=3)["num_hidden_layers"] == 3


def test_run_returns_both_models(result):
    assert [m.name for m in result.models] == ["fp16", "w4a16 g32 sym"]
    fp16, w4 = result.models
    assert w4.weight_bytes < fp16.weight_bytes
    for m in result.models:
        assert m.prefill_ms > 0
        assert [d.batch for d in m.decode] == [1, 2]
        for d in m.decode:
            assert d.mode == "eager" and "no CUDA" in d.note
            assert d.tokens_per_s == pytest.approx(d.batch * 1e3 / d.step_ms)
            assert d.graph_check < speed.GRAPH_TOL[torch.float16]


def test_logit_checks(result):
    c = result.check
    assert c["layers_quantized"] == 2 * 7
    assert c["rel_err_vs_dequantized"] < speed.KERNEL_TOL[torch.float16]
    assert 0 < c["rel_err_vs_fp16"] < speed.FP16_TOL
    assert 0 <= c["top1_vs_fp16"] <= 1


def test_bf16_run_names_its_baseline_and_quantizes_to_bf16():
    """dtype="bf16": the 16-bit model and the W4A16 model's activations are bf16, the baseline row
    and the ratio rows are named by it, and the checks use bf16's tolerances."""
    r = speed.run_speed(**dict(RUN, batches=(1,)), dtype="bf16")
    assert [m.name for m in r.models] == ["bf16", "w4a16 g32 sym"] and r.config["dtype"] == "bf16"
    assert r.check["rel_err_vs_dequantized"] < speed.KERNEL_TOL[torch.bfloat16]
    assert "| W4A16 / bf16 |" in speed.format_speed(r)


def test_unknown_dtype_is_refused_by_name():
    with pytest.raises(ValueError, match=r"dtype: expected one of \('fp16', 'bf16'\), got 'fp32'"):
        speed.run_speed(**RUN, dtype="fp32")


def test_table_and_json(result, tmp_path):
    table = speed.format_speed(result)
    assert "| fp16 |" in table and "| W4A16 / fp16 |" in table and "decode b=2 tok/s" in table
    data = json.loads(open(speed.write_json(result, str(tmp_path / "out"))).read())
    assert data["config"]["num_hidden_layers"] == 2 and data["config"]["group_size"] == 32
    assert data["models"][1]["decode"][0]["batch"] == 1
    assert set(data["versions"]) >= {"torch", "transformers", "w4a16"}


def test_static_decoder_matches_full_forward():
    model = speed.build_model(speed.llama_config(speed.llama_dims(layers=1, **TINY)), "cpu", torch.float32)
    dec = speed.StaticDecoder(model, batch=2, context=16, prompt_len=5, device="cpu")
    prompt = torch.randint(0, TINY["vocab_size"], (2, 5))
    dec.prefill(prompt)
    dec.ids.copy_(torch.tensor([[3], [7]]))
    dec.prefill(prompt)  # a second prefill resets the cache first
    got = dec.run()
    want = speed.logits_of(model, torch.cat([prompt, dec.ids], 1))[:, -1]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_wrong_kernel_fails_loudly(monkeypatch):
    monkeypatch.setattr(W4A16Linear, "forward", lambda self, x: torch.zeros(
        *x.shape[:-1], self.out_features, dtype=x.dtype, device=x.device))
    with pytest.raises(RuntimeError, match="dequantized weights"):
        speed.run_speed(**dict(RUN, batches=(1,)))


def test_context_too_small_is_rejected():
    model = speed.build_model(speed.llama_config(speed.llama_dims(layers=1, **TINY)), "cpu", torch.float32)
    with pytest.raises(ValueError, match="context"):
        speed.decode_speed(model, 1, "cpu", context=8, prompt_len=4, iters=10)


def test_kernel_kinds():
    assert speed.kernel_kind("w4a16_gemm_kernel") == "w4a16 gemm"
    assert speed.kernel_kind("nvjet_hsh_256x128_64x4_2x1_v_bz_coopA_NTN") == "other gemm"
    assert speed.kernel_kind("sm90_xmma_gemm_f16f16_f16f32") == "other gemm"
    assert speed.kernel_kind("triton_red_fused_rms_norm_0") == "other"


def test_eager_too_times_both_modes_and_records_fusion():
    res = speed.run_speed(**dict(RUN, batches=(1,), eager_too=True, fuse=False))
    assert res.config["fused"] is False
    for m in res.models:
        assert [d.batch for d in m.decode] == [1, 1]   # the graph-replayed row, then the eager one
    assert "decode b=1 tok/s (eager)" in speed.format_speed(res)


def test_fused_layers_run_and_pass_the_dequantized_check():
    """fuse="layers": the epilogue GEMMs (and the deferred o projection) check against the same
    model on dequantized weights, as the plain W4A16 model does."""
    res = speed.run_speed(**dict(RUN, batches=(1,), fuse="layers"))
    assert res.config["fused"] == "layers"
    assert res.check["rel_err_vs_dequantized"] <= speed.KERNEL_TOL[torch.float16]
    res = speed.run_speed(**dict(RUN, batches=(1,), fused_layers_too=True, lm_head_int4=True))
    assert [m.name for m in res.models] == ["fp16", "w4a16 g32 sym", "w4a16 g32 sym, fused layers",
                                            "w4a16 g32 sym, fused layers, 4-bit lm_head"]
    assert res.check["fused_layers_rel_err_vs_dequantized"] <= speed.KERNEL_TOL[torch.float16]


def test_interleaved_eager_times_both_models_in_alternating_blocks(tmp_path):
    res = speed.run_speed(**dict(RUN, batches=(1, 2), interleave_eager=True))
    assert [it.batch for it in res.interleaved] == [1, 2]
    for it in res.interleaved:
        names = list(it.step_ms)
        assert names[0] == "fp16" and names[1].startswith("w4a16") and all(v > 0 for v in it.step_ms.values())
        assert all(len(v) == it.blocks for v in it.rounds_ms.values()) and set(it.speedup) == {names[1]}
    assert "alternating blocks" in speed.format_speed(res)
    data = json.load(open(speed.write_json(res, str(tmp_path))))
    assert data["interleaved"][0]["batch"] == 1 and "speedup" in data["interleaved"][0]


def test_interleaved_eager_needs_a_model():
    from w4a16.e2e.interleaved import interleaved_eager
    with pytest.raises(ValueError, match="models"):
        interleaved_eager({}, 1, "cpu")


def test_peers_are_timed_in_the_same_harness(monkeypatch):
    """A peer quantizes a fresh fp16 copy its own way; it gets a row and a ratio row against fp16."""
    from w4a16.e2e import peers

    seen = []

    def fake_peer(model, group_size):
        seen.append(group_size)
        return model   # stands in for another implementation: the fp16 model as it is
    monkeypatch.setitem(peers.PEERS, "fake-int4", fake_peer)
    res = speed.run_speed(**dict(RUN, batches=(1,), peers=("fake-int4",)))
    assert [m.name for m in res.models][::2] == ["fp16", "fake-int4"] and len(res.models) == 3
    assert seen == [RUN["group_size"]]
    table = speed.format_speed(res)
    assert "| W4A16 / fp16 |" in table and "| fake-int4 / fp16 |" in table


def test_unknown_or_missing_peer_is_a_clear_error():
    import importlib.util

    from w4a16 import W4A16Error
    from w4a16.e2e import peers

    with pytest.raises(W4A16Error, match="peers: expected names from"):
        speed.run_speed(**dict(RUN, peers=("nope",)))
    if importlib.util.find_spec("torchao") is None:
        with pytest.raises(W4A16Error, match="torchao"):
            peers.torchao_int4(torch.nn.Linear(8, 8))


@pytest.mark.parametrize("fused_routers", [False, True])
def test_moe_model_runs_with_w4a16_experts(monkeypatch, fused_routers):
    """The Qwen3-30B-A3B-shaped run (tiny here): its experts become W4A16Experts, checked against the
    dequantized experts like every other layer; the experts run the Triton kernel (interpreter),
    so the check compares it with the reference. fused_routers: every model's routers run
    w4a16.moe.router's kernel, and the table's head says so."""
    from w4a16.moe import module as moe_module
    from w4a16.moe import router

    real = moe_module.W4A16Experts.forward
    backends = []

    def forward(self, *a):   # the W4A16 model's experts on the Triton kernel, in the interpreter
        if self.backend == "auto":
            backends.append("triton")
            self.backend = "triton"
            try:
                return real(self, *a)
            finally:
                self.backend = "auto"
        return real(self, *a)

    monkeypatch.setattr(moe_module.W4A16Experts, "forward", forward)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    tiny = dict(hidden_size=128, intermediate_size=256, moe_intermediate_size=64, num_attention_heads=4,
                num_key_value_heads=2, head_dim=32, num_experts=8, num_experts_per_tok=2, vocab_size=512)
    dims = speed.model_dims("qwen3-30b-a3b")
    assert (dims["num_experts"], dims["num_experts_per_tok"], dims["moe_intermediate_size"]) == (128, 8, 768)
    calls = []
    real_op = router.router_topk_op
    monkeypatch.setattr(router, "router_topk_op", lambda *a: (calls.append(1), real_op(*a))[1])
    r = speed.run_speed(**dict(RUN, config_overrides=tiny, batches=(1,)), model="qwen3-30b-a3b",
                        fused_routers=fused_routers)
    assert r.config["model"] == "qwen3-30b-a3b" and r.config["fused_routers"] == fused_routers
    assert r.check["layers_quantized"] == 2 * (4 + 1)        # q, k, v, o and the experts module per layer
    assert r.check["rel_err_vs_dequantized"] < speed.KERNEL_TOL[torch.float16] and backends
    assert bool(calls) == fused_routers and ("fused routers" in speed.format_speed(r)) == fused_routers


def test_a_failing_peer_is_reported_and_the_run_keeps_what_it_measured(monkeypatch, tmp_path):
    """A peer whose quantizer raises gets a "failed" row with the reason; a peer whose decode check
    fails at one batch keeps its prefill and other batches; the fp16 and W4A16 rows are intact and
    the JSON says the same."""
    import json

    from w4a16.e2e import peers

    def broken(model, group_size):
        raise RuntimeError("no kernel for this card")

    calls = {"n": 0}
    real = speed.decode_speed

    def flaky(model, batch, *a, **kw):
        if getattr(model, "_flaky", False) and batch == 2:
            raise RuntimeError("decode batch 2 (cuda-graph): logits differ from a full forward")
        return real(model, batch, *a, **kw)

    def flaky_peer(model, group_size):
        calls["n"] += 1
        model._flaky = True
        return model
    monkeypatch.setitem(peers.PEERS, "broken-int4", broken)
    monkeypatch.setitem(peers.PEERS, "flaky-int4", flaky_peer)
    monkeypatch.setattr(speed, "decode_speed", flaky)
    res = speed.run_speed(**dict(RUN, peers=("broken-int4", "flaky-int4")))
    names = [m.name for m in res.models]
    assert names[0] == "fp16" and names[2:] == ["broken-int4", "flaky-int4"] and calls["n"] == 1
    broken_row, flaky_row = res.models[2], res.models[3]
    assert "RuntimeError: no kernel for this card" in broken_row.error and not broken_row.decode
    assert [d.mode for d in flaky_row.decode] == ["eager", "failed"] and flaky_row.prefill_ms > 0
    assert "logits differ" in flaky_row.decode[1].note
    table = speed.format_speed(res)
    assert "| broken-int4 | failed | failed | failed | failed |" in table
    assert "note: broken-int4: failed: RuntimeError: no kernel for this card" in table
    flaky_line = next(line for line in table.splitlines() if line.startswith("| flaky-int4 |"))
    assert flaky_line.endswith("| failed |") and "failed" not in flaky_line.split("|")[4]
    assert "| W4A16 / fp16 |" in table and "failed" not in next(
        line for line in table.splitlines() if line.startswith("| W4A16 / fp16 |"))
    with open(speed.write_json(res, str(tmp_path))) as f:
        doc = json.loads(f.read(), parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    assert doc["models"][2]["error"].startswith("failed: RuntimeError") and doc["models"][2]["prefill_ms"] is None
    assert doc["models"][3]["decode"][1]["tokens_per_s"] is None


def test_both_lm_head_choices_in_one_run():
    """lm_head_int4 adds a row for the same W4A16 model with its lm_head quantized, checked against
    its dequantized weights like the rest."""
    res = speed.run_speed(**dict(RUN, batches=(1,), lm_head_int4=True))
    assert [m.name for m in res.models] == ["fp16", "w4a16 g32 sym", "w4a16 g32 sym, 4-bit lm_head"]
    assert res.check["lm_head_rel_err_vs_dequantized"] <= speed.KERNEL_TOL[torch.float16]
    assert res.models[2].weight_bytes < res.models[1].weight_bytes
    assert res.config["lm_head_int4"] is True
    assert "| w4a16 g32 sym, 4-bit lm_head / fp16 |" in speed.format_speed(res)


def test_a_ratio_of_steps_in_different_modes_is_marked():
    """When one model's step was captured and the other's ran eagerly (its capture failed), the
    ratio says so in its cell and in a note: it is not a like-for-like number."""
    d = speed.DecodeSpeed
    res = speed.SpeedResult(dict(model="llama3-8b", num_hidden_layers=2, context=32, prefill_tokens=16), "cpu",
                            dict(torch="x", transformers="y", triton="z"), {})
    res.models = [speed.ModelSpeed("fp16", 200, 0, 2.0, [d(1, 20.0, 50.0, "eager", 0.0), d(16, 20.0, 800.0, "cuda-graph", 0.0)]),
                  speed.ModelSpeed("w4a16", 100, 0, 1.0, [d(1, 2.0, 500.0, "cuda-graph", 0.0), d(16, 10.0, 1600.0, "cuda-graph", 0.0)])]
    table = speed.format_speed(res)
    assert "| W4A16 / fp16 | 2.00x smaller | 2.00x | 10.00x (cuda-graph vs eager) | 2.00x |" in table
    assert "not a like-for-like ratio" in table and table.count("not a like-for-like") == 1


def test_kernel_launches_per_step_and_per_layer_are_reported():
    """The profiled step's launches by name become a per-step total and a per-layer figure (the
    step's kernels over the decoder layers) in the table; a step without a profile shows none."""
    d = speed.DecodeSpeed
    kinds = {"w4a16 gemm": 0.5, "other gemm": 0.1, "other": 0.2}
    counts = {"w4a16_decode_kernel": 8.0, "triton_red_fused_rms_norm_0": 4.0, "Memset (Device)": 1.0}
    res = speed.SpeedResult(dict(model="llama3-8b", num_hidden_layers=2, context=32, prefill_tokens=16), "cuda",
                            dict(torch="x", transformers="y", triton="z"), {})
    res.models = [speed.ModelSpeed("fp16", 200, 0, 2.0, [d(1, 20.0, 50.0, "cuda-graph", 0.0)]),
                  speed.ModelSpeed("w4a16", 100, 0, 1.0, [d(1, 2.0, 500.0, "cuda-graph", 0.0, "", kinds, counts)])]
    table = speed.format_speed(res)
    assert "w4a16 b=1: w4a16 gemm 0.50, other gemm 0.10, other 0.20; 13 kernels per step, 6.5 per layer" in table
    assert "fp16 b=1:" not in table
    assert speed.kernels_per_layer(res.models[1].decode[0], 2) == 6.5


@pytest.mark.parametrize("attention", ["packed-gqa", "fused-decode"])
def test_attention_choice_runs_for_every_model_and_is_recorded(attention, monkeypatch):
    """attention="packed-gqa" / "fused-decode": the run goes through with w4a16.attention's function
    or w4a16.fused_attention's kernel in every model (the logits checks pass), and the table's head
    says so."""
    from w4a16 import fused_attention

    calls = []
    real = fused_attention.decode_attention_op
    monkeypatch.setattr(fused_attention, "decode_attention_op", lambda *a: (calls.append(1), real(*a))[1])
    res = speed.run_speed(**dict(RUN, batches=(1,)), attention=attention)
    assert res.config["attention"] == attention
    assert res.check["rel_err_vs_dequantized"] <= speed.KERNEL_TOL[torch.float16]
    assert f"attention {attention}" in speed.format_speed(res)
    assert bool(calls) == (attention == "fused-decode")
    with pytest.raises(ValueError, match=r"attention: expected one of \('sdpa', 'packed-gqa', 'fused-decode'\), "
                                         r"got 'flash'"):
        speed.run_speed(**dict(RUN, batches=(1,)), attention="flash")
