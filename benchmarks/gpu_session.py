"""One GPU session: environment, ceilings, GPU tests, SASS counts and a tuning sweep.

    python benchmarks/gpu_session.py [env] [ceilings] [test] [sass] [decode] [prefill] [bf16]

Writes tuned.json, results.json and log.txt under $OUT (default ./out) and prints short tables.
"""
from __future__ import annotations

import collections
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
import w4a16  # noqa: E402
from w4a16.measure import GraphTimer, copies_for  # noqa: E402
from w4a16.bench.shapes import preset_layers  # noqa: E402
from w4a16.config import GemmConfig  # noqa: E402

OUT = Path(os.environ.get("OUT", "out"))
OUT.mkdir(parents=True, exist_ok=True)
os.environ.setdefault("W4A16_CACHE", str(OUT / "tuned.json"))
RESULTS: dict = {}
LAYERS = preset_layers(cli=True)   # "8b.qkv": (N, K), ... (w4a16.bench.shapes.PRESETS)


def log(*a):
    msg = " ".join(str(x) for x in a)
    print(msg, flush=True)
    with open(OUT / "log.txt", "a") as f:
        f.write(msg + "\n")


def section_env():
    p = torch.cuda.get_device_properties(0)
    log(f"device {p.name} sms={p.multi_processor_count} L2={p.L2_cache_size >> 20}MiB "
        f"mem={p.total_memory >> 30}GiB torch={torch.__version__} triton={__import__('triton').__version__} "
        f"cuda={torch.version.cuda} python={sys.version.split()[0]}")
    smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,clocks.sm,clocks.max.sm,power.limit",
                          "--format=csv,noheader"], capture_output=True, text=True)
    log("nvidia-smi:", smi.stdout.strip())
    RESULTS["env"] = {"name": p.name, "sms": p.multi_processor_count, "torch": torch.__version__,
                      "triton": __import__("triton").__version__, "driver": smi.stdout.strip()}


def section_ceilings():
    a = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(True), torch.cuda.Event(True)
    s.record()
    for _ in range(10):
        b.copy_(a)
    e.record()
    e.synchronize()
    bw = 2 * a.numel() * 10 / (s.elapsed_time(e) * 1e-3)
    del a, b
    x = torch.randn(8192, 8192, device="cuda", dtype=torch.float16)
    y = torch.randn(8192, 8192, device="cuda", dtype=torch.float16)
    for _ in range(3):
        x @ y
    torch.cuda.synchronize()
    s.record()
    for _ in range(20):
        x @ y
    e.record()
    e.synchronize()
    rate = 2 * 8192 ** 3 * 20 / (s.elapsed_time(e) * 1e-3)
    log(f"ceilings: copy {bw / 1e12:.3f} TB/s, cuBLAS fp16 8192^3 {rate / 1e12:.0f} TFLOP/s")
    RESULTS["ceilings"] = {"copy_Bps": bw, "fp16_flops": rate}


def section_test():
    t = time.time()
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-m", "gpu", "tests", "-p", "no:cacheprovider", "-n", "8"],
                       capture_output=True, text=True, env={**os.environ, "PYTHONPATH": "src"})
    tail = [ln for ln in (r.stdout + r.stderr).strip().splitlines() if "Warning" not in ln and "warner(" not in ln]
    log(f"gpu tests rc={r.returncode} in {time.time() - t:.0f}s:\n" + "\n".join(tail[-40:]))


def sass_text(compiled) -> str:
    """Disassemble a compiled Triton kernel's cubin with the cuobjdump that Triton ships."""
    import tempfile

    import triton
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(compiled.asm["cubin"])
    r = subprocess.run([str(tool) if tool.exists() else "cuobjdump", "-sass", f.name], capture_output=True, text=True)
    return r.stdout + r.stderr


def sass_histogram(sass: str) -> collections.Counter:
    hist = collections.Counter()
    for line in (sass or "").splitlines():
        m = re.match(r"\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)(\.[A-Z0-9_.]+)?", line)
        if m:
            hist[m.group(1)] += 1
    return hist


def section_sass():
    from w4a16.backends.triton.launch import launch_gemm_compiled
    from w4a16.measure import generator, random_weight
    N, K = LAYERS["70b.gate_up"]
    for dtype in (torch.float16, torch.bfloat16):
        qw = random_weight(N, K, 128, False, dtype, "cuda", generator("cuda", 0))
        pw = w4a16.prepare(qw, "triton")
        x = torch.randn(16, K, device="cuda", dtype=dtype)
        for dq, swap in (("magic", True), ("magic", False), ("portable", True)):
            for bn, warps in ((64, 4), (128, 4)):
                cfg = GemmConfig("splitk", 16, bn, split_k=1, num_warps=warps, num_stages=4, dequant=dq,
                                 swap_ab=swap)
                _, c = launch_gemm_compiled(x, pw, None, 1.0, cfg)
                sass = sass_text(c)
                h = sass_histogram(sass)
                weights_per_iter = bn * pw.kc
                top = ", ".join(f"{k}:{v}" for k, v in h.most_common(14))
                log(f"SASS {w4a16.spec.dtype_name(dtype)} {cfg.short()} regs={c.n_regs} spills={c.n_spills} "
                    f"smem={c.metadata.shared} total={sum(h.values())} weights/iter/thread="
                    f"{weights_per_iter // (32 * warps)} | {top}")
                if dq == "magic" and bn == 64 and dtype == torch.float16:
                    tag = "swap" if swap else "noswap"
                    (OUT / f"decode_fp16_{tag}.sass").write_text(sass)
                    (OUT / f"decode_fp16_{tag}.ttgir").write_text(c.asm.get("ttgir", ""))


def time_cublas(N, K, M, dtype, timer, l2):
    w = torch.randn(N, K, device="cuda", dtype=dtype) * 0.02
    copies = [w] + [torch.randn_like(w) * 0.02 for _ in range(copies_for(w.numel() * 2, l2, hi=8) - 1)]
    x = torch.randn(M, K, device="cuda", dtype=dtype)
    t = timer.measure([lambda w=w: torch.nn.functional.linear(x, w) for w in copies]).median_us
    del copies, w
    return t


def sweep(ms, dtype, name):
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    timer = GraphTimer(max_calls=30, budget_ms=40.0, max_repeats=5)
    rows = []
    for layer, (N, K) in LAYERS.items():
        res = w4a16.tune([(N, K)], ms, dtype=dtype, progress=False)
        for M in ms:
            mine = [r for r in res if r.M == M]
            best = next(r for r in mine if r.best)
            cub = time_cublas(N, K, M, dtype, timer, l2)
            wbytes = N * K // 2 + N * (K // 128) * 2
            bw = RESULTS.get("ceilings", {}).get("copy_Bps", 3.0e12)
            floor = max((wbytes + 2 * M * K + 2 * M * N) / bw, 2 * M * N * K / RESULTS.get("ceilings", {}).get("fp16_flops", 6e14)) * 1e6
            row = {"layer": layer, "N": N, "K": K, "M": M, "dtype": str(dtype), "best": best.config.short(),
                   "us": best.time_us, "cublas_us": cub, "speedup": cub / best.time_us, "floor_us": floor,
                   "frac_floor": floor / best.time_us, "all": [(r.config.short(), round(r.time_us, 2)) for r in mine]}
            rows.append(row)
            log(f"{name} {layer:12s} M={M:5d} best {best.time_us:9.1f} us [{best.config.short():28s}] "
                f"cuBLAS {cub:9.1f} us  x{cub / best.time_us:5.2f}  floor {floor:8.1f} ({floor / best.time_us:.2f})")
    RESULTS[name] = rows


def section_overhead():
    """Eager host overhead per call on a tiny problem: w4a16.gemm vs torch.nn.functional.linear."""
    x = torch.randn(1, 256, device="cuda", dtype=torch.float16)
    qw = w4a16.quantize(torch.randn(256, 256, device="cuda"), 128)
    w = qw.dequantize()
    rows = {}
    for name, fn in (("F.linear", lambda: torch.nn.functional.linear(x, w)), ("w4a16.gemm", lambda: w4a16.gemm(x, qw))):
        for _ in range(200):
            fn()
        torch.cuda.synchronize()
        best = float("inf")
        for _ in range(5):
            t = time.perf_counter()
            for _ in range(2000):
                fn()
            best = min(best, (time.perf_counter() - t) / 2000 * 1e6)
            torch.cuda.synchronize()
        rows[name] = best
    log(f"host overhead per eager call (CPU timer, 1x256x256): F.linear {rows['F.linear']:.1f} us, "
        f"w4a16.gemm {rows['w4a16.gemm']:.1f} us, ratio {rows['w4a16.gemm'] / rows['F.linear']:.2f}")
    import cProfile
    import io
    import pstats
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(2000):
        w4a16.gemm(x, qw)
    prof.disable()
    torch.cuda.synchronize()
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(14)
    log("profile of 2000 eager calls:\n" + "\n".join(text.getvalue().splitlines()[-24:]))
    RESULTS["overhead_us"] = rows


def section_bench(args):
    t = time.time()
    r = subprocess.run([sys.executable, "-m", "w4a16", "bench", "--no-progress", "--out", str(OUT / "bench")] + args,
                       capture_output=True, text=True, env={**os.environ, "PYTHONPATH": "src"})
    log(f"bench {' '.join(args)} rc={r.returncode} in {time.time() - t:.0f}s\n" + (r.stdout + r.stderr)[-1500:])


def section_e2e(*extra):
    t = time.time()
    code = ("import sys; from w4a16.e2e.speed import main; main(sys.argv[1:])")
    out = OUT / ("e2e_compile" if "--compile" in extra else "e2e")
    r = subprocess.run([sys.executable, "-c", code, "--out", str(out), *extra], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": "src"})
    log(f"e2e rc={r.returncode} in {time.time() - t:.0f}s\n" + "\n".join((r.stdout + r.stderr).strip().splitlines()[-30:]))


def main(argv):
    sections = argv or ["env", "ceilings", "sass", "decode", "prefill", "test"]
    for s in sections:
        t = time.time()
        try:
            {"env": section_env, "ceilings": section_ceilings, "test": section_test, "sass": section_sass,
             "decode": lambda: sweep([1, 16], torch.float16, "decode"),
             "mid": lambda: sweep([64, 256], torch.float16, "mid"),
             "prefill": lambda: sweep([1024, 4096], torch.float16, "prefill"),
             "bf16": lambda: sweep([1, 16, 1024], torch.bfloat16, "bf16"),
             "overhead": section_overhead,
             "e2e": section_e2e,
             "e2ecompile": lambda: section_e2e("--compile"),
             "bench": lambda: section_bench(["--timing", "both"]),
             "benchbf16": lambda: section_bench(["--dtype", "bf16", "--m", "1,16,1024", "--out",
                                                 str(OUT / "bench_bf16")])}[s]()
        except Exception as e:  # keep going: one broken section must not hide the others
            import traceback
            log(f"section {s} FAILED: {e!r}\n{traceback.format_exc()[-3000:]}")
        log(f"[section {s}: {time.time() - t:.0f}s]")
        (OUT / "results.json").write_text(json.dumps(RESULTS, indent=1, default=str))


if __name__ == "__main__":
    main(sys.argv[1:])
