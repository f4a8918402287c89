"""One GPU session for the Gluon decode kernel: environment, correctness sweep, timing.

    PYTHONPATH=src python3 benchmarks/gluon_decode_session.py [--quick] [--out DIR]

Timing: CUDA-graph replay of back-to-back calls over several weight copies totalling > 120 MB
(L2 is 60 MB on an H200), against cuBLAS fp16 (F.linear on the dequantized weight, same rotation)
and the package's Triton backend (w4a16.gemm(..., backend="triton")); copy bandwidth measured
eagerly (b.copy_(a), 1 GB).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

SRC = Path(__file__).resolve().parents[1] / "src"
sys.path.insert(0, str(SRC))


import w4a16  # noqa: E402
from w4a16 import reference  # noqa: E402
from w4a16.bench.shapes import preset_layers  # noqa: E402
from w4a16.bench.ceilings import measure_copy_bandwidth  # noqa: E402
from w4a16.backends.gluon.decode.config import GluonDecodeConfig, heuristic  # noqa: E402
from w4a16.backends.gluon.decode.launch import run_decode  # noqa: E402
from w4a16.backends.gluon.support import call_reason  # noqa: E402
from w4a16.backends.gluon.layout import GluonPrepared, prepare_weight  # noqa: E402
from session_cases import option_matrix  # noqa: E402
from session_log import SessionLog  # noqa: E402
from w4a16.measure import GraphTimer, graph_replay_matches_eager, random_weight  # noqa: E402
from w4a16.weight import QuantizedWeight  # noqa: E402

log = SessionLog()   # printed and written to the session's log file


def check(M, N, K, g, zeros, dtype, bias, alpha, cfg=None, deterministic=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = random_weight(N, K, g, zeros, dtype, "cpu", gen)
    x = (torch.randn(M, K, generator=gen)).to(dtype).cuda()
    b = (torch.randn(N, generator=gen) * 0.1).to(dtype).cuda() if bias else None
    ref = reference.gemm(x.cpu(), w, None if b is None else b.cpu(), alpha).float()
    pw = prepare_weight(w)
    cfg = cfg or heuristic(M, N, K, w.group_size_effective, 132)
    why = call_reason(M, N, K, w.group_size_effective, dtype, x, "decode")
    if why:
        return None, why
    y = torch.full((M, N), float("nan"), dtype=dtype, device="cuda")
    run_decode(x, pw, b, alpha, cfg, deterministic, out=y)
    torch.cuda.synchronize()
    yc = y.float().cpu()
    if not torch.isfinite(yc).all():
        return float("inf"), "NaN/Inf in output"
    err = float((yc - ref).norm() / ref.norm().clamp_min(1e-6))
    return err, None


def correctness(quick):
    log("== correctness")
    fails = 0
    n = 0
    shapes = [(1, 72, 576), (7, 200, 1376), (16, 4100, 4096), (33, 72, 4096), (64, 200, 576), (2, 4100, 1376),
              (8, 200, 4096), (15, 72, 1376)]
    cases = [case for _, case in option_matrix(shapes)]
    if not quick:
        for M in (1, 2, 7, 8, 15, 16, 33, 64):
            cases.append((M, 4100, 4096, 128, None, torch.float16, True, 1.0))
    for (M, N, K, g, zeros, dtype, bias, alpha) in cases:
        n += 1
        tol = 2e-3 if dtype == torch.float16 else 1e-2
        try:
            err, why = check(M, N, K, g, zeros, dtype, bias, alpha, seed=n)
        except Exception as e:  # noqa: BLE001
            err, why = float("inf"), f"{type(e).__name__}: {e}"
            traceback.print_exc()
        ok = err is not None and err <= tol
        if err is None:
            ok = True
        fails += not ok
        log(f"{'ok  ' if ok else 'FAIL'} M={M} N={N} K={K} g={g} zeros={zeros} {str(dtype)[6:]} bias={bias} "
            f"alpha={alpha} err={err} {why or ''}")
    # determinism and split modes
    for det in (True, False):
        gen = torch.Generator().manual_seed(5)
        w = random_weight(4096, 14336, 128, None, torch.float16, "cpu", gen)
        x = torch.randn(16, 14336, generator=gen).half().cuda()
        pw = prepare_weight(w)
        cfg = GluonDecodeConfig(mt=16, warps=4, nch=2, stages=4, splits=7)
        y1 = run_decode(x, pw, None, 1.0, cfg, det)
        y2 = run_decode(x, pw, None, 1.0, cfg, det)
        ref = reference.gemm(x.cpu(), w).float()
        err = float((y1.float().cpu() - ref).norm() / ref.norm())
        same = torch.equal(y1, y2)
        log(f"split-K deterministic={det}: err={err:.2e} bitwise-equal-twice={same}")
        fails += (err > 2e-3) or (det and not same)
    # CUDA graph
    gen = torch.Generator().manual_seed(6)
    w = random_weight(200, 1376, 32, "float", torch.float16, "cpu", gen)
    pw = prepare_weight(w)
    x = torch.randn(7, 1376, generator=gen).half().cuda()
    cfg = GluonDecodeConfig(mt=8, warps=4, nch=2, stages=3, splits=2)
    graph_ok = graph_replay_matches_eager(lambda out: run_decode(x, pw, None, 0.5, cfg, out=out))
    log(f"cuda graph replay equals eager: {graph_ok}")
    fails += not graph_ok
    log(f"correctness: {n + 3 - fails}/{n + 3} passed")
    return fails


def graph_time(fns) -> float:
    """us per call (median): CUDA-graph replay of back-to-back calls cycling through fns."""
    return GraphTimer(max_calls=40, budget_ms=40.0, max_repeats=5).measure(fns).median_us


def copy_bw():
    """Bytes/s of the best of 10 device-to-device copies of 1 GiB (bytes read + written)."""
    return measure_copy_bandwidth("cuda", 1 << 30, 10)[1]


SHAPES = preset_layers()   # "8B qkv": (N, K), ... (w4a16.bench.shapes.PRESETS)


def timing(bw, ms, dtypes_for, cfg_override=None):
    log(f"== timing (copy bandwidth {bw / 1e12:.3f} TB/s); time us, fraction of copy bw on weight bytes "
        f"(codes + scales), x cuBLAS fp16")
    have_triton = True
    log(f"{'layer':12s} {'dt':4s} {'M':>3s} {'cfg':16s} {'gluon':>8s} {'frac':>5s} {'cublas':>8s} {'x':>5s} "
        f"{'triton':>8s} {'x':>5s}")
    for name, (N, K) in SHAPES.items():
        for dtype in dtypes_for(name):
            gen = torch.Generator().manual_seed(1)
            w = random_weight(N, K, 128, None, dtype, "cpu", gen)
            pw = prepare_weight(w)
            wbytes = pw.codes.numel() + pw.scales_t.numel() * 2
            copies = max(2, -(-120_000_000 // wbytes))
            pws = [pw] + [GluonPrepared(pw.codes.clone(), pw.scales_t.clone(), None, pw.N, pw.K, pw.K_pad,
                                        pw.group, pw.kh) for _ in range(copies - 1)]
            wd = w.dequantize(torch.float16).cuda()
            fcopies = max(2, -(-120_000_000 // (wd.numel() * 2)))
            wds = [wd] + [wd.clone() for _ in range(fcopies - 1)]
            tw = None
            if have_triton and dtype == torch.float16:
                try:
                    wc = QuantizedWeight.from_plain(w.qweight.cuda(), w.scales.cuda(), None, 128)
                    tws = [wc] + [QuantizedWeight.from_plain(wc.qweight.clone(), wc.scales.clone(), None, 128)
                                  for _ in range(copies - 1)]
                except Exception:  # noqa: BLE001
                    tws = None
            for M in ms:
                x = torch.randn(M, K, dtype=dtype, device="cuda")
                xh = x.half()
                cfg = cfg_override(M, N, K) if cfg_override else heuristic(M, N, K, 128, 132)
                outs = [torch.empty(M, N, dtype=dtype, device="cuda") for _ in pws]
                try:
                    tg = graph_time([lambda p=p, o=o: run_decode(x, p, None, 1.0, cfg, out=o) for p, o in zip(pws, outs)])
                except Exception as e:  # noqa: BLE001
                    log(f"{name}: gluon failed: {e}")
                    traceback.print_exc()
                    continue
                tc = graph_time([lambda d=d: F.linear(xh, d) for d in wds])
                tt = float("nan")
                if tw is None and have_triton and dtype == torch.float16 and tws:
                    try:
                        tt = graph_time([lambda q=q: w4a16.gemm(x, q, backend="triton") for q in tws])
                    except Exception as e:  # noqa: BLE001
                        log(f"triton backend failed: {type(e).__name__}: {e}")
                        have_triton = False
                frac = (N * K / 2 + N * K / 128 * 2) / (tg * 1e-6) / bw
                log(f"{name:12s} {str(dtype)[6:10]:4s} {M:3d} {cfg.short():16s} {tg:8.1f} {frac:5.2f} {tc:8.1f} "
                    f"{tc / tg:5.2f} {tt:8.1f} {tt / tg if tt == tt else float('nan'):5.2f}")
            del pws, wds, outs
            torch.cuda.empty_cache()


def sweep(bw, shapes, ms):
    """Time every candidate config on a few shapes (for the heuristic)."""
    from w4a16.backends.gluon.decode.config import candidates
    log("== sweep: us per call (fraction of copy bandwidth)")
    for name in shapes:
        N, K = SHAPES[name]
        gen = torch.Generator().manual_seed(1)
        w = random_weight(N, K, 128, None, torch.float16, "cpu", gen)
        pw = prepare_weight(w)
        wbytes = pw.codes.numel() + pw.scales_t.numel() * 2
        copies = max(2, -(-120_000_000 // wbytes))
        pws = [pw] + [GluonPrepared(pw.codes.clone(), pw.scales_t.clone(), None, pw.N, pw.K, pw.K_pad,
                                    pw.group, pw.kh) for _ in range(copies - 1)]
        for M in ms:
            x = torch.randn(M, K, dtype=torch.float16, device="cuda")
            outs = [torch.empty(M, N, dtype=torch.float16, device="cuda") for _ in pws]
            res = []
            for cfg in candidates(M, N, K, 128, 132):
                try:
                    t = graph_time([lambda p=p, o=o: run_decode(x, p, None, 1.0, cfg, out=o) for p, o in zip(pws, outs)])
                except Exception as e:  # noqa: BLE001
                    log(f"  {cfg.short()} failed: {type(e).__name__}: {str(e)[:200]}")
                    continue
                res.append((t, cfg.short()))
            res.sort()
            log(f"{name:12s} M={M:3d} " + "  ".join(f"{c} {t:.1f} ({wbytes / (t * 1e-6) / bw:.2f})" for t, c in res))
        del pws
        torch.cuda.empty_cache()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--skip-correctness", action="store_true")
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--sanitize", action="store_true", help="only a few small ragged cases (for compute-sanitizer)")
    ap.add_argument("--no-table", action="store_true")
    a = ap.parse_args()
    log.open(Path(a.out) / "gluon_decode_session.log")
    import triton
    log(f"env: {torch.cuda.get_device_name()} torch {torch.__version__} triton {triton.__version__} "
        f"python {sys.version.split()[0]} {time.strftime('%Y-%m-%d %H:%M:%S')}")
    if a.sanitize:
        bad = 0
        for case in ((3, 72, 576, 64, "float", torch.float16, True, 0.5, GluonDecodeConfig(8, 4, 2, 4, splits=3)),
                     (17, 200, 1376, 32, "int", torch.bfloat16, False, 1.0, GluonDecodeConfig(32, 4, 2, 4, splits=2)),
                     (1, 4100, 576, -1, None, torch.float16, True, 1.0, GluonDecodeConfig(8, 4, 2, 4, ws=False)),
                     (5, 1040, 4096, 128, None, torch.float16, True, 1.0, GluonDecodeConfig(16, 4, 2, 4, sk=True)),
                     (40, 264, 2048, 128, None, torch.bfloat16, False, 0.5, GluonDecodeConfig(64, 4, 2, 3))):
            err, why = check(*case[:8], cfg=case[8])
            log(f"sanitize case {case[:5]} err={err} {why or ''}")
            bad += not (err is not None and err < 1e-2)
        log(f"sanitize cases failed: {bad}")
        return
    fails = 0 if a.skip_correctness else correctness(a.quick)
    bw = copy_bw()
    ms = (1, 16, 64)
    if a.sweep:
        sweep(bw, tuple(SHAPES), ms)
    if not a.no_table:
            timing(bw, ms, lambda name: (torch.float16, torch.bfloat16) if name in ("70B gate_up", "8B qkv") else (torch.float16,))
    log(f"done; correctness failures: {fails}")


if __name__ == "__main__":
    main()
