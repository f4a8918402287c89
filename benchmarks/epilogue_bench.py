"""The GEMM epilogues against the separate kernels they replace, on a GPU: a Llama-3-8B layer's
gate_up GEMM writing SiLU(gate) * up against the GEMM plus torch's SiLU and multiply, its o and
down GEMMs adding the residual against the GEMM plus torch's add, and adding the residual and
writing the RMSNorm of the sum against the residual GEMM plus the norm compiled by torch.compile
(one Inductor kernel, as in a compiled model; the Gluon decode kernel writes the norm itself at
every M here: where it stops paying sets ``decode.config.NORM_MAX_ELEMENTS``) (CUDA-graph replay,
weights rotated through enough copies to leave L2; ``backend="auto"``).

    python benchmarks/epilogue_bench.py [--m 1,2,4,8,16,64,2048] [--dtype fp16] [--layers 8B] [--out DIR]

Prints a table and writes epilogue_bench.csv under --out.
"""
from __future__ import annotations

import argparse

import torch

import w4a16
from w4a16 import epilogue as E
from w4a16.measure import GraphTimer, copies_for, random_weight
from session_log import write_rows

LAYERS = {"8B gate_up (silu_mul)": (14336, 4096, "silu_mul"), "8B down (residual)": (4096, 14336, "residual"),
          "8B o (residual)": (4096, 4096, "residual"), "8B o (residual_rmsnorm)": (4096, 4096, "residual_rmsnorm"),
          "8B down (residual_rmsnorm)": (4096, 14336, "residual_rmsnorm"),
          "70B gate_up (silu_mul)": (28672, 8192, "silu_mul"),
          "70B down (residual)": (8192, 28672, "residual")}


def _weights(I_or_N: int, K: int, epilogue: str, dtype, copies: int, gen):
    """``copies`` weights: paired gate/up [2I, K] for silu_mul, else [N, K]."""
    out = []
    for _ in range(copies):
        if epilogue == "silu_mul":
            g = random_weight(I_or_N, K, 128, None, dtype, "cpu", gen)
            u = random_weight(I_or_N, K, 128, None, dtype, "cpu", gen)
            out.append(E.pair_gate_up(g, u).to("cuda"))
        else:
            out.append(random_weight(I_or_N, K, 128, None, dtype, "cpu", gen).to("cuda"))
    return out


def main(argv=None) -> list:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--m", default="1,2,4,8,16,64,2048", help="rows of x (comma separated)")
    p.add_argument("--dtype", choices=("fp16", "bf16"), default="fp16")
    p.add_argument("--layers", default="", help="only the layers whose name starts with this (e.g. 8B)")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    dtype = torch.float16 if a.dtype == "fp16" else torch.bfloat16
    gen = torch.Generator().manual_seed(0)
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    timer = GraphTimer()
    from w4a16.backends.gluon.decode import config as gluon_decode
    gluon_decode.KERNEL_NORM, gluon_decode.NORM_MAX_ELEMENTS = True, 1 << 30
    compiled_norm = torch.compile(E.rms_norm, dynamic=False)
    rows = []
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton "
          f"{__import__('triton').__version__}, {a.dtype}")
    print(f"{'layer':<24} {'M':>5} {'fused us':>9} {'separate us':>12} {'ratio':>6}")
    for name, (n, K, epilogue) in LAYERS.items():
        if not name.startswith(a.layers):
            continue
        N = 2 * n if epilogue == "silu_mul" else n
        ws = _weights(n, K, epilogue, dtype, copies_for(N * K // 2, l2), gen)
        for M in (int(m) for m in a.m.split(",")):
            x = torch.randn(M, K, generator=gen).to(dtype).cuda()
            r = torch.randn(M, N, generator=gen).to(dtype).cuda()
            nw = (torch.rand(N, generator=gen) + 0.5).to(dtype).cuda()
            if epilogue == "silu_mul":
                fused = [lambda w=w: w4a16.gemm(x, w, epilogue="silu_mul") for w in ws]
                separate = [lambda w=w: E.silu_mul(w4a16.gemm(x, w)) for w in ws]
            elif epilogue == "residual_rmsnorm":
                fused = [lambda w=w: w4a16.gemm(x, w, residual=r, epilogue=epilogue, norm_weight=nw, norm_eps=1e-5)[1]
                         for w in ws]
                separate = [lambda w=w: compiled_norm(w4a16.gemm(x, w, residual=r), nw, 1e-5) for w in ws]
            else:
                fused = [lambda w=w: w4a16.gemm(x, w, residual=r) for w in ws]
                separate = [lambda w=w: w4a16.gemm(x, w) + r for w in ws]
            want = w4a16.reference.gemm(x[:1].cpu(), ws[0].to("cpu"), epilogue=E.chosen_as(epilogue),
                                        residual=None if epilogue == "silu_mul" else r[:1].cpu())
            if epilogue == "residual_rmsnorm":
                want = E.rms_norm(want, nw.cpu(), 1e-5)
            got = fused[0]()[:1].cpu()
            err = float((got.double() - want.double()).norm() / want.double().norm())
            if err > 1e-2:
                raise RuntimeError(f"{name} M={M}: the fused epilogue is off the reference (relative error {err:.3g})")
            tf, ts = timer.measure(fused).median_us, timer.measure(separate).median_us
            rows.append(dict(layer=name, M=M, fused_us=round(tf, 2), separate_us=round(ts, 2),
                             ratio=round(ts / tf, 3), choice=w4a16.ops.choose(x, ws[0], epilogue=epilogue).label))
            print(f"{name:<24} {M:>5} {tf:>9.2f} {ts:>12.2f} {ts / tf:>6.2f}x", flush=True)
    if a.out:
        write_rows(rows, a.out, "epilogue_bench.csv")
    return rows


if __name__ == "__main__":
    main()
