"""One GPU session for the backend seam, the Gluon decode kernel and the eager host path.

Runs, in order of importance, each section guarded so a failure does not stop the others (skip
any with --skip): env and copy ceiling; decode timings of the Gluon and Triton backends against
cuBLAS fp16 (CUDA-graph replay over rotating weights); host time per eager call; memory of a
Llama-3-8B-shaped model after quantization and a decode step, with the largest live tensors; an
eager decode step fp16 vs W4A16; the GPU tests of the seam and the Gluon kernel; backward time at
M = 4096; random problems per backend; compute-sanitizer on the Gluon kernel; whole-model decode
eager and graph-replayed. Everything is logged to $OUT/session.log and $OUT/session.json.

    PYTHONPATH=src python3 benchmarks/session_backends.py --out $OUT [--skip tests,bench,...]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

import w4a16  # noqa: E402
from w4a16.measure import EagerTimer, GraphTimer, copies_for, generator, random_activation, random_weight  # noqa: E402
from w4a16.bench.shapes import preset_layers  # noqa: E402
from w4a16.bench.ceilings import measure_copy_bandwidth  # noqa: E402

LAYERS = {k: preset_layers(cli=True)[k] for k in ("70b.gate_up", "70b.down", "70b.qkv", "70b.o", "8b.qkv", "8b.o",
                                                  "8b.gate_up", "8b.down")}   # (N, K), largest first
RESULTS: dict = {}
T0 = time.time()


def log(msg: str) -> None:
    line = f"[{time.time() - T0:6.1f}s] {msg}"
    print(line, flush=True)
    with open(os.path.join(OUT, "session.log"), "a") as f:
        f.write(line + "\n")


def save() -> None:
    with open(os.path.join(OUT, "session.json"), "w") as f:
        json.dump(RESULTS, f, indent=1, default=str)


def section(name):
    def wrap(fn):
        def run():
            if name in SKIP:
                return
            log(f"== {name}")
            try:
                fn()
            except Exception:
                log(f"{name} FAILED:\n{traceback.format_exc()}")
            save()
        return run
    return wrap


@section("env")
def env():
    import triton
    RESULTS["env"] = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                          python=sys.version.split()[0], date=time.strftime("%Y-%m-%d"))
    RESULTS["copy_tbps"] = measure_copy_bandwidth("cuda", 2**29, 20)[0] / 1e12   # median, bytes read + written
    log(f"{RESULTS['env']} copy {RESULTS['copy_tbps']:.3f} TB/s")


@section("tests")
def tests():
    files = ["tests/backends/test_backend_contract.py", "tests/test_weight_storage.py", "tests/test_autograd.py",
             "tests/backends/test_selection.py", "tests/test_torch_integration_gpu.py",
             "tests/backends/gluon/test_decode_gpu.py", "tests/backends/gluon/test_stream_k_gpu.py",
             "tests/backends/gluon/test_dependent_launch_gpu.py",
             "tests/backends/gluon/test_prefill_gpu.py", "tests/test_nn.py",
             "tests/test_nonfinite_gpu.py", "tests/test_concurrency_gpu.py", "tests/test_compile_model.py"]
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *files,
           "tests/backends/triton/test_kernels_gpu.py", "-k", "not test_matrix or auto"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=ARGS.test_timeout,
                       env=dict(os.environ, PYTHONPATH="src"))
    tail = (r.stdout + r.stderr)[-3000:]
    RESULTS["tests"] = tail.strip().splitlines()[-1] if tail.strip() else "no output"
    log(tail)


def _graph_us(calls) -> float:
    return GraphTimer(max_calls=40, budget_ms=30.0, max_repeats=5).measure(calls).median_us


@section("bench")
def bench():
    gen = generator("cuda", 0)
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    copy = RESULTS.get("copy_tbps", 4.2) * 1e12
    rows = []
    for name in ARGS.bench_layers:
        N, K = LAYERS[name]
        w0 = random_weight(N, K, 128, False, torch.float16, "cuda", gen)
        n = copies_for(w0.nbytes(), l2, factor=2.0, hi=24)
        ws = [w0] + [random_weight(N, K, 128, False, torch.float16, "cuda", gen) for _ in range(n - 1)]
        dense = [w.dequantize(torch.float16) for w in ws[:max(2, copies_for(N * K * 2, l2, hi=8))]]
        for M in ARGS.ms:
            x = random_activation(M, K, torch.float16, "cuda", gen)
            ref = w4a16.reference.gemm(x, ws[0])
            row = dict(layer=name, M=M, N=N, K=K)
            row["cublas_us"] = _graph_us([lambda d=d: torch.nn.functional.linear(x, d) for d in dense])
            for be in ("gluon", "triton", "auto"):
                try:
                    y = w4a16.gemm(x, ws[0], backend=be)
                    err = w4a16.measure.rel_error(y, ref)
                    if not err <= 2e-3:
                        row[f"{be}_us"] = f"wrong {err:.2e}"
                        continue
                    row[f"{be}_us"] = _graph_us([lambda w=w: w4a16.gemm(x, w, backend=be) for w in ws])
                except w4a16.W4A16Error as e:
                    row[f"{be}_us"] = f"n/a ({e})"
            row["auto_label"] = w4a16.choose(x, ws[0]).label
            nbytes = w0.nbytes() + 2 * M * K + 2 * M * N
            best = min(v for k, v in row.items() if k.endswith("_us") and isinstance(v, float) and k != "cublas_us")
            row["frac_copy"] = nbytes / (best * 1e-6) / copy
            row["x_cublas"] = row["cublas_us"] / best
            rows.append(row)
            log(" ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
        del ws, dense
        torch.cuda.empty_cache()
    RESULTS["bench"] = rows


@section("host")
def host():
    """Eager back-to-back calls: host time per call shows when the GPU work is tiny."""
    rows = []
    for N, K in ((256, 256), (4096, 4096)):
        lin = torch.nn.Linear(K, N, dtype=torch.float16, device="cuda")
        mod = w4a16.W4A16Linear.from_linear(lin, group_size=128)
        w = mod.weight_q
        x = torch.randn(1, K, dtype=torch.float16, device="cuda")
        x3 = x.view(1, 1, K)
        W = lin.weight.detach()
        b = lin.bias.detach()
        timer = EagerTimer(max_calls=200, target_ms=5.0, budget_ms=200.0)
        with torch.no_grad():
            r = dict(N=N, K=K,
                     F_linear=timer.measure([lambda: torch.nn.functional.linear(x, W, b)]).median_us,
                     gemm=timer.measure([lambda: w4a16.gemm(x, w, b)]).median_us,
                     nn_Linear=timer.measure([lambda: lin(x3)]).median_us,
                     W4A16Linear=timer.measure([lambda: mod(x3)]).median_us)
        rows.append(r)
        log(f"host N=K={K}: " + " ".join(f"{k}={v:.2f}" for k, v in r.items() if k not in ("N", "K")) +
            f"  gemm/F.linear={r['gemm'] / r['F_linear']:.2f} W4A16Linear/nn.Linear={r['W4A16Linear'] / r['nn_Linear']:.2f}")
    RESULTS["host"] = rows


@section("model")
def model():
    """Llama-3-8B shape: memory after quantization and a decode step; eager decode step times."""
    from w4a16.e2e.speed import build_model, llama_config, llama_dims
    m = build_model(llama_config(llama_dims(ARGS.layers)), "cuda")
    ids = torch.randint(0, 1000, (1, 1), device="cuda")

    def step_ms():
        def step():
            with torch.no_grad():
                m(input_ids=ids, use_cache=False)
        return EagerTimer(max_calls=20, target_ms=100.0, budget_ms=3000.0).measure([step]).median_us / 1e3

    def host_profile(tag):
        """CPU-side profile of a few eager steps: where the host time of a step goes, per op."""
        from torch.profiler import ProfilerActivity, profile
        with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(3):
                m(input_ids=ids, use_cache=False)
            torch.cuda.synchronize()
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30)
        with open(os.path.join(OUT, f"host_profile_{tag}.txt"), "w") as f:
            f.write(table)
        log(f"host profile {tag} (3 steps):\n" + "\n".join(table.splitlines()[:22]))

    fp16_ms = step_ms()
    host_profile("fp16")
    report = w4a16.quantize_model(m, group_size=128, skip=("lm_head",), dtype=torch.float16, progress=False)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    q_ms = step_ms()
    host_profile("w4a16")
    torch.cuda.synchronize()
    alloc_before_gc = torch.cuda.memory_allocated()
    import gc
    gc.collect()  # replaced fp16 modules caught in reference cycles are garbage, not the model's
    alloc = torch.cuda.memory_allocated()
    # The int4 codes (N * K / 2 bytes each) + every parameter and buffer (scales, zeros, biases and
    # the parts left in fp16): what one copy of the quantized model takes.
    quant, other = 0, 0
    for mod in m.modules():
        if isinstance(mod, w4a16.W4A16Linear):
            quant += mod.out_features * mod.in_features // 2
    seen = set()
    for name, t in list(m.named_parameters()) + list(m.named_buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            other += t.numel() * t.element_size()
    ideal = quant + other
    RESULTS["model"] = dict(layers=ARGS.layers, replaced=len(report.replaced), memory_allocated=alloc,
                            memory_allocated_before_gc=alloc_before_gc,
                            ideal_bytes=ideal, ratio=alloc / ideal, eager_step_ms_fp16=fp16_ms,
                            eager_step_ms_w4a16=q_ms, eager_speedup=fp16_ms / q_ms)
    log(f"model: {RESULTS['model']}")
    # Where the bytes are: live CUDA tensors grouped by dtype and shape, largest totals first.
    import collections
    groups = collections.Counter()
    seen = set()
    for o in gc.get_objects():
        if isinstance(o, torch.Tensor) and o.is_cuda and o.untyped_storage().data_ptr() not in seen:
            seen.add(o.untyped_storage().data_ptr())
            groups[(str(o.dtype), tuple(o.shape))] += o.untyped_storage().nbytes()
    top = groups.most_common(25)
    RESULTS["model"]["live_tensors_bytes"] = sum(groups.values())
    RESULTS["model"]["live_tensor_groups"] = [(k[0], k[1], v) for k, v in top]
    log(f"live CUDA tensors {sum(groups.values()) / 1e9:.3f} GB; largest groups: " +
        "; ".join(f"{k[0]} {k[1]}: {v / 1e6:.1f} MB" for k, v in top[:12]))


@section("backward")
def backward():
    rows = []
    gen = generator("cuda", 1)
    for name in ("8b.qkv", "8b.o", "8b.gate_up", "8b.down"):
        N, K = LAYERS[name]
        w = random_weight(N, K, 128, False, torch.float16, "cuda", gen)
        W = w.dequantize(torch.float16)
        x = random_activation(4096, K, torch.float16, "cuda", gen).requires_grad_()
        g = torch.randn(4096, N, dtype=torch.float16, device="cuda")

        def q_step():
            x.grad = None
            w4a16.gemm(x, w).backward(g)

        def f_step():
            x.grad = None
            torch.nn.functional.linear(x, W).backward(g)
        t = EagerTimer(max_calls=10, target_ms=20.0, budget_ms=200.0)
        r = dict(layer=name, w4a16_fwd_bwd_us=t.measure([q_step]).median_us,
                 fp16_fwd_bwd_us=t.measure([f_step]).median_us)
        rows.append(r)
        log(f"backward {r}")
    RESULTS["backward"] = rows


def _subprocess(name: str, cmd: list, timeout: int) -> None:
    t = time.time()
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=dict(os.environ, PYTHONPATH="src"))
        out = (r.stdout + r.stderr)[-2500:]
        RESULTS[name] = dict(rc=r.returncode, tail=out.strip().splitlines()[-3:], seconds=time.time() - t)
    except subprocess.TimeoutExpired as e:
        out = ((e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or ""))[-2500:]
        RESULTS[name] = dict(rc="timeout", tail=out.strip().splitlines()[-3:], seconds=timeout)
    log(f"{name}: {RESULTS[name]}")


@section("fuzz")
def fuzz():
    """Random problems against the reference on each kernel backend (w4a16 fuzz)."""
    for be in ("gluon", "triton"):
        _subprocess(f"fuzz_{be}", [sys.executable, "-m", "w4a16", "fuzz", "--cases", str(ARGS.fuzz_cases),
                                   "--backend", be, "--max-mnk", "64,1100,4200" if be == "gluon" else "300,1100,4200"],
                    ARGS.fuzz_timeout)


@section("sanitize")
def sanitize():
    """compute-sanitizer (--sanitize-tools: memcheck, racecheck, synccheck, initcheck) on a few small
    ragged cases of each kernel (--sanitize-kernels: the Gluon decode and prefill kernels, the
    Triton kernel)."""
    workloads = {"decode": ["benchmarks/gluon_decode_session.py", "--sanitize", "--out", OUT],
                 "prefill": ["benchmarks/gluon_prefill_session.py", "--sanitize", "--out", OUT],
                 # the Triton kernel: random ragged problems over its configs (tile and split-K)
                 "triton": ["-m", "w4a16", "fuzz", "--cases", "12", "--backend", "triton", "--max-mnk", "300,600,1100"]}
    for kernel in ARGS.sanitize_kernels:
        for tool in ARGS.sanitize_tools:
            _subprocess(f"sanitize_{kernel}_{tool}", ["compute-sanitizer", "--tool", tool, "--error-exitcode", "9",
                                                      sys.executable, *workloads[kernel]], 150)


@section("e2e")
def e2e():
    """Whole-model decode, eager and graph-replayed (w4a16.e2e.speed), fp16 in the same harness."""
    _subprocess("e2e", [sys.executable, "-m", "w4a16.e2e.speed", "--batches", "1", "16", "--iters", "20",
                        "--eager-too", "--interleave-eager", "--out", os.path.join(OUT, "e2e")], ARGS.e2e_timeout)


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=os.environ.get("OUT", "out"))
    p.add_argument("--skip", default="")
    p.add_argument("--ms", type=int, nargs="+", default=[1, 16, 64])
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--bench-layers", nargs="+", default=list(LAYERS), choices=list(LAYERS))
    p.add_argument("--test-timeout", type=int, default=200)
    p.add_argument("--fuzz-cases", type=int, default=300)
    p.add_argument("--fuzz-timeout", type=int, default=240)
    p.add_argument("--e2e-timeout", type=int, default=420)
    p.add_argument("--sanitize-kernels", nargs="+", default=["decode", "prefill", "triton"],
                   choices=["decode", "prefill", "triton"])
    p.add_argument("--sanitize-tools", nargs="+", default=["memcheck", "racecheck", "synccheck", "initcheck"],
                   choices=["memcheck", "racecheck", "synccheck", "initcheck"])
    ARGS = p.parse_args()
    OUT = ARGS.out
    os.makedirs(OUT, exist_ok=True)
    SKIP = set(ARGS.skip.split(","))
    for fn in (env, bench, host, model, tests, backward, fuzz, sanitize, e2e):
        fn()
    log("done")
