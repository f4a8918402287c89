"""Host time of one eager W4A16 call, taken apart (GPU): per-call time of w4a16.gemm and
W4A16Linear per backend against F.linear, whether the Gluon direct launch is in use, and a
cProfile of many calls (the Python functions the time goes to).

    PYTHONPATH=src python3 benchmarks/host_profile.py --out $OUT
    PYTHONPATH=src python3 benchmarks/host_profile.py --out $OUT --only-models --moe-prefill 2048   # MoE model prefill
"""
from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

import w4a16  # noqa: E402
from w4a16.measure import EagerTimer  # noqa: E402


def _step_ms(m, ids) -> float:
    """ms per eager step of ``m`` (use_cache=False, one token per sequence): the median of
    EagerTimer's repeats."""
    def step():
        with torch.no_grad():
            m(input_ids=ids, use_cache=False)
    return EagerTimer(max_calls=30, target_ms=100.0, budget_ms=3000.0).measure([step]).median_us / 1e3


def _profile_steps(m, ids, tag: str, out: str, steps: int = 20) -> float:
    """ms per eager step (see _step_ms), and a cProfile of ``steps`` more."""
    ms = _step_ms(m, ids)
    pr = cProfile.Profile()
    with torch.no_grad():
        pr.enable()
        for _ in range(steps):
            m(input_ids=ids, use_cache=False)
        torch.cuda.synchronize()
        pr.disable()
    s = io.StringIO()
    pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(40)
    with open(os.path.join(out, f"cprofile_model_{tag}.txt"), "w") as f:
        f.write(s.getvalue())
    print(f"--- model step {tag}: {ms:.2f} ms (batch {ids.shape[0]}); cProfile of {steps} steps:\n" +
          "\n".join(s.getvalue().splitlines()[:48]), flush=True)
    return ms


def stub_compare(layers: int) -> None:
    """How much of an eager step the linear layers cost: each model timed as it is and with its
    linear layers' forward replaced by an empty output of the right shape (no kernel, no checks).
    The difference is what the layers' own path costs (host and device)."""
    from torch import nn

    from w4a16.e2e.speed import build_model, llama_config, llama_dims

    def stub(self, x):
        return x.new_empty(*x.shape[:-1], self.out_features)
    for batch in (1, 16):
        ids = torch.randint(0, 1000, (batch, 1), device="cuda")
        res = {}
        for tag in ("fp16", "w4a16"):
            m = build_model(llama_config(llama_dims(layers)), "cuda")
            if tag == "w4a16":
                w4a16.quantize_model(m, group_size=128, skip=("lm_head",), dtype=torch.float16, progress=False)
            res[tag] = _step_ms(m, ids)
            saved = (nn.Linear.forward, w4a16.W4A16Linear.forward)
            nn.Linear.forward = w4a16.W4A16Linear.forward = stub
            try:
                res[tag + " stubbed"] = _step_ms(m, ids)
            finally:
                nn.Linear.forward, w4a16.W4A16Linear.forward = saved
            del m
            torch.cuda.empty_cache()
        print(f"stub compare, {layers} layers, batch {batch}: " + " ".join(f"{k} {v:.2f} ms" for k, v in res.items()) +
              f"  -> linears cost: fp16 {res['fp16'] - res['fp16 stubbed']:.2f} ms, "
              f"w4a16 {res['w4a16'] - res['w4a16 stubbed']:.2f} ms per step", flush=True)


def model_profile(layers: int, out: str) -> None:
    """fp16, W4A16 fused and W4A16 unfused eager steps of the same model: time and cProfile."""
    from w4a16.e2e.speed import build_model, llama_config, llama_dims
    for batch in (1, 16):
        ids = torch.randint(0, 1000, (batch, 1), device="cuda")
        res = {}
        for tag in ("fp16", "w4a16", "w4a16-nofuse"):
            m = build_model(llama_config(llama_dims(layers)), "cuda")
            if tag != "fp16":
                w4a16.quantize_model(m, group_size=128, skip=("lm_head",), dtype=torch.float16, progress=False,
                                     fuse=tag == "w4a16")
            res[tag] = _profile_steps(m, ids, f"{tag}_b{batch}", out)
            del m
            torch.cuda.empty_cache()
        print(f"model {layers} layers batch {batch}: " + " ".join(f"{k} {v:.2f} ms" for k, v in res.items()) +
              f"  w4a16/fp16 {res['w4a16'] / res['fp16']:.3f}", flush=True)


def _issue_and_syncs(m, ids) -> tuple:
    """(last-position logits, median host ms to issue a forward of ``m`` over ``ids``, the messages
    of the synchronizing calls one forward makes), eager, no grad."""
    import time
    import warnings

    with torch.no_grad():
        logits = m(input_ids=ids, use_cache=False).logits[0, -1].float()
        torch.cuda.synchronize()
        issue = []
        for _ in range(5):
            t = time.perf_counter()
            m(input_ids=ids, use_cache=False)
            issue.append((time.perf_counter() - t) * 1e3)
            torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                m(input_ids=ids, use_cache=False)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()
    return logits, sorted(issue)[2], [str(w.message).splitlines()[0][:160] for w in caught]


def moe_prefill_profile(layers: int, tokens: int, out: str) -> None:
    """The prefill forward over [1, tokens] of the Qwen3-30B-A3B-shaped model (bf16, W4A16 as the
    whole-model run quantizes it, and the same with ``w4a16.moe.ops.WIDE_ALIGN``; the last two's
    outputs compared): wall time per forward, the host's time to issue one (the call
    returning before the GPU is done: near the wall time means the host, or a sync, bounds it), the
    synchronizing operations torch reports (``torch.cuda.set_sync_debug_mode``), and a cProfile."""
    from w4a16.e2e.speed import build_model, model_config, model_dims
    from w4a16.moe import ops

    cfg = model_config("qwen3-30b-a3b", model_dims("qwen3-30b-a3b", layers))
    ids = torch.randint(0, cfg.vocab_size, (1, tokens), device="cuda")
    m = build_model(cfg, "cuda", torch.bfloat16)
    logits = {}
    default = ops.WIDE_ALIGN
    try:
        for tag in ("bf16", "w4a16", "w4a16-wide-align"):
            if tag == "w4a16":   # the same model quantized; the wide-align row reuses it
                w4a16.quantize_model(m, group_size=128, skip=("lm_head",), dtype=torch.bfloat16, progress=False,
                                     fuse=True)
            ops.WIDE_ALIGN = tag == "w4a16-wide-align"
            logits[tag], issue_ms, syncs = _issue_and_syncs(m, ids)
            print(f"moe prefill {tag}, {layers} layers, {tokens} tokens: host issue {issue_ms:.2f} ms per forward; "
                  f"{len(syncs)} synchronizing calls" + "".join(f"\n  sync: {x}" for x in sorted(set(syncs))), flush=True)
            if tag == "w4a16-wide-align":
                print(f"  last logits equal to the torch grouping's: {torch.equal(logits['w4a16'], logits[tag])}", flush=True)
            _profile_steps(m, ids, f"moe_prefill_{tag}", out, steps=5)
    finally:
        ops.WIDE_ALIGN = default


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=os.environ.get("OUT", "out"))
    p.add_argument("--calls", type=int, default=2000)
    p.add_argument("--model-layers", type=int, default=0,
                   help="also profile eager steps of a Llama-3-8B-shaped model with this many layers")
    p.add_argument("--stub-layers", type=int, default=0,
                   help="also time eager steps with the linear layers stubbed out (this many layers)")
    p.add_argument("--moe-prefill", type=int, default=0, metavar="TOKENS",
                   help="also profile the prefill forward of an 8-layer Qwen3-30B-A3B-shaped model over TOKENS tokens")
    p.add_argument("--only-models", action="store_true", help="skip the per-call timings")
    a = p.parse_args()
    os.makedirs(a.out, exist_ok=True)
    if a.stub_layers:
        stub_compare(a.stub_layers)
    if a.model_layers:
        model_profile(a.model_layers, a.out)
    if a.moe_prefill:
        moe_prefill_profile(8, a.moe_prefill, a.out)
    if a.only_models:
        return
    report = []
    timer = EagerTimer(max_calls=200, target_ms=5.0, budget_ms=200.0)
    for N, K in ((256, 256), (4096, 4096)):
        lin = torch.nn.Linear(K, N, dtype=torch.float16, device="cuda")
        W, b = lin.weight.detach(), lin.bias.detach()
        x = torch.randn(1, K, dtype=torch.float16, device="cuda")
        with torch.no_grad():
            row = [f"N=K={K}", f"F.linear {timer.measure([lambda: torch.nn.functional.linear(x, W, b)]).median_us:.1f}"]
            for be in ("gluon", "triton"):
                w = w4a16.W4A16Linear.from_linear(lin, group_size=128).weight_q
                g = timer.measure([lambda: w4a16.gemm(x, w, b, backend=be)]).median_us
                row.append(f"gemm[{be}] {g:.1f}")
                if be == "gluon":
                    from w4a16.backends.gluon.host import STATE
                    row.append(f"direct={STATE.direct, STATE.error}")
                pr = cProfile.Profile()
                pr.enable()
                for _ in range(a.calls):
                    w4a16.gemm(x, w, b, backend=be)
                pr.disable()
                torch.cuda.synchronize()
                s = io.StringIO()
                pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(22)
                with open(os.path.join(a.out, f"cprofile_{be}_{K}.txt"), "w") as f:
                    f.write(s.getvalue())
                print(f"--- cProfile gemm[{be}] N=K={K}, {a.calls} calls\n" + s.getvalue()[:3500])
            lm = w4a16.W4A16Linear.from_linear(lin, group_size=128)
            x3 = x.view(1, 1, K)
            row.append(f"W4A16Linear[auto] {timer.measure([lambda: lm(x3)]).median_us:.1f}")
            row.append(f"nn.Linear {timer.measure([lambda: lin(x3)]).median_us:.1f}")
        print(" | ".join(row), flush=True)
        report.append(" | ".join(row))
    with open(os.path.join(a.out, "host_profile.txt"), "w") as f:
        f.write("\n".join(report) + "\n")


if __name__ == "__main__":
    main()
