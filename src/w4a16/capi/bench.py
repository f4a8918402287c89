"""Time the C library's entry points against the Python ``w4a16.gemm`` on the same problems.

    PYTHONPATH=src python -m w4a16.capi.bench --lib out/capi [--m 1 16 4096] [--n 4096] [--k 4096]

For each M: the C call (ctypes, the automatic kernel choice of ``w4a16_sm90_gemm_128`` and of
``_64``) and ``w4a16.gemm(config="auto")``, fp16, group 128, no zero points, no bias, a 4 MB
workspace. Two timings each: back-to-back eager calls between CUDA events (host overhead
included: ctypes for the C calls, the Python wrapper for ``w4a16.gemm``), and replays of a CUDA
graph holding 20 calls (device time only). Prints a markdown table.
"""
from __future__ import annotations

import argparse

import torch


def _events(fn, iters: int) -> float:
    for _ in range(3):
        fn()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    a.record()
    for _ in range(iters):
        fn()
    b.record()
    b.synchronize()
    return a.elapsed_time(b) * 1000.0 / iters


def _graph(fn, calls: int = 20, replays: int = 10) -> float:
    fn()
    torch.cuda.synchronize()
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):  # capture-side warm-up
        fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(calls):
            fn()
    g.replay()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(replays):
        g.replay()
    b.record()
    b.synchronize()
    return a.elapsed_time(b) * 1000.0 / (replays * calls)


def _python_kernel(x, qw) -> str:
    try:
        from w4a16.ops import chosen_config
        cfg = chosen_config(x, qw, "auto")
        return cfg.short() if hasattr(cfg, "short") else str(cfg)
    except Exception:  # the package's internals may differ: the label is informational
        return "auto"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lib", required=True, help="directory holding libw4a16_sm90_kernel.so")
    p.add_argument("--m", type=int, nargs="+", default=[1, 16, 4096])
    p.add_argument("--n", type=int, default=4096)
    p.add_argument("--k", type=int, default=4096)
    p.add_argument("--iters", type=int, default=50)
    a = p.parse_args(argv)

    import w4a16
    from w4a16.capi import loader

    lib = loader.load(f"{a.lib}/libw4a16_sm90_kernel.so")
    N, K = a.n, a.k
    qw = w4a16.quantize(torch.randn(N, K) * 0.05, 128, symmetric=True, dtype=torch.float16).to("cuda")
    ws = torch.empty(4 << 20, dtype=torch.uint8, device="cuda")
    print(f"{torch.cuda.get_device_name()}; {lib.w4a16_version_string().decode()}; N={N} K={K} fp16 g=128\n")
    print("| M | call | kernel | eager us/call | graph us/call | TFLOP/s (graph) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for M in a.m:
        x = torch.randn(M, K, device="cuda").half()
        y = torch.empty(M, N, dtype=torch.float16, device="cuda")

        def c_call(fn):
            return lambda: fn(x.data_ptr(), qw.qweight.data_ptr(), qw.scales.data_ptr(), None, None, 1.0,
                              y.data_ptr(), M, N, K, 128, None, ws.data_ptr(), ws.numel(),
                              torch.cuda.current_stream().cuda_stream, None)

        runs = [("C w4a16_sm90_gemm_128", c_call(lib.w4a16_sm90_gemm_128_ex)),
                ("C w4a16_sm90_gemm_64", c_call(lib.w4a16_sm90_gemm_64_ex)),
                ("Python w4a16.gemm", lambda: w4a16.gemm(x, qw))]
        for name, fn in runs:
            fn()
            kernel = lib.w4a16_sm90_last_kernel().decode() if name.startswith("C") else _python_kernel(x, qw)
            eager = _events(fn, a.iters)
            graph = _graph(fn)
            tflops = 2.0 * M * N * K / (graph * 1e6)
            print(f"| {M} | {name} | {kernel} | {eager:.1f} | {graph:.1f} | {tflops:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
