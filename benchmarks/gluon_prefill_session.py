"""One GPU session for the Gluon prefill kernel (M >= 65): smoke test in a child process (a hang is
reported, not waited for), correctness, timing against the Triton backend and cuBLAS fp16, and a
sweep over the candidate configs.

    PYTHONUNBUFFERED=1 PYTHONPATH=src python3 benchmarks/gluon_prefill_session.py [--quick] [--sweep] [--out DIR]

Timing: ``w4a16.measure.GraphTimer`` (CUDA-graph replay of back-to-back calls) over rotating copies
of the weight totalling >= 2 x the L2 size, for the Gluon kernel (same prepared layout as decode),
the package's Triton backend (``w4a16.gemm(x, w, backend="triton")``) and cuBLAS fp16 (``F.linear``
on the dequantized weight). Layers: the 8 Llama-3 8B / 70B projections, M = 256, 1024, 4096.
TFLOP/s = 2 M N K / time. The whole run is bounded by --budget seconds (default 240).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

SRC = Path(__file__).resolve().parents[1] / "src"
sys.path.insert(0, str(SRC))

from w4a16 import reference  # noqa: E402
from w4a16.bench.shapes import preset_layers  # noqa: E402
from w4a16.backends.gluon.layout import GluonPrepared, prepare_weight  # noqa: E402
from session_cases import option_matrix  # noqa: E402
from session_log import SessionLog  # noqa: E402
from w4a16.backends.gluon.prefill.config import (NAMED, SPLIT_CONFIGS, GluonPrefillConfig,  # noqa: E402,F401
                                                 prefill_candidates, prefill_heuristic)
from w4a16.backends.gluon.prefill.launch import run_prefill  # noqa: E402
from w4a16.backends.gluon.support import call_reason  # noqa: E402
from w4a16.measure import GraphTimer, copies_for, graph_replay_matches_eager, random_weight  # noqa: E402
from w4a16.weight import QuantizedWeight  # noqa: E402

SHAPES = preset_layers()   # "8B qkv": (N, K), ... (w4a16.bench.shapes.PRESETS)
L2_BYTES = 60 * 1024 * 1024
T0 = time.time()
log = SessionLog()   # printed and written to the session's log file


def check(M, N, K, g, zeros, dtype, bias, alpha, cfg, seed=0):
    """(relative Frobenius error, reason) of one call against reference.gemm (fp32 on the GPU);
    the output is poisoned with NaN first, so an unwritten element fails."""
    gen = torch.Generator().manual_seed(seed)
    w = random_weight(N, K, g, zeros, dtype, "cpu", gen).to("cuda")
    x = torch.randn(M, K, generator=gen).to(dtype).cuda()
    b = (torch.randn(N, generator=gen) * 0.1).to(dtype).cuda() if bias else None
    why = call_reason(M, N, K, w.group_size_effective, dtype, x, "prefill")
    if why:
        return None, why
    ref = reference.gemm(x, w, b, alpha).float()
    y = torch.full((M, N), float("nan"), dtype=dtype, device="cuda")
    run_prefill(x, prepare_weight(w), b, alpha, cfg, out=y)
    torch.cuda.synchronize()
    if not torch.isfinite(y).all():
        return float("inf"), f"NaN/Inf in {int((~torch.isfinite(y)).sum())} output elements"
    return float((y.float() - ref).norm() / ref.norm().clamp_min(1e-6)), None


def _cfg_of(arg):
    return NAMED[arg] if arg in NAMED else eval(arg)  # noqa: S307 (a config repr from the parent process)


def determinism(cfg) -> tuple:
    """(bitwise equal twice, relative error) of a long-K call (K = 14336, M = 1000) against the
    reference."""
    gen = torch.Generator().manual_seed(5)
    w = random_weight(4096, 14336, 128, "int", torch.float16, "cpu", gen).to("cuda")
    x = torch.randn(1000, 14336, generator=gen).half().cuda()
    pw = prepare_weight(w)
    y1, y2 = run_prefill(x, pw, None, 1.0, cfg), run_prefill(x, pw, None, 1.0, cfg)
    ref = reference.gemm(x, w).float()
    return bool(torch.equal(y1, y2)), float((y1.float() - ref).norm() / ref.norm())


def smoke(args, with_determinism=False):
    """Child process: one small ragged call per config, in order; "START" before each so that the
    parent knows which one hung if it has to kill this process. ``with_determinism``: then a
    DETERMINISM line per config (see :func:`determinism`)."""
    bad = 0
    for arg in args:
        cfg = _cfg_of(arg)
        print(f"START {arg}", flush=True)
        try:
            err, why = check(300, 200, 1376, 32, "float", torch.float16, True, 0.5, cfg, seed=1)
        except Exception as e:  # noqa: BLE001
            err, why = float("inf"), f"{type(e).__name__}: {str(e)[:300]}"
        res = ""
        try:
            from w4a16.backends.gluon.host import STATE
            k = list(STATE.kernels.values())[-1]
            res = (f"regs {getattr(k, 'n_regs', '?')} spills {getattr(k, 'n_spills', '?')} "
                   f"warps {k.metadata.num_warps} shared {k.metadata.shared}")
        except Exception as e:  # noqa: BLE001
            res = f"(no kernel metadata: {type(e).__name__})"
        good = err is not None and err <= 2e-3
        bad += not good
        print(f"{'SMOKE' if good else 'SMOKEFAIL'} {arg} {cfg.short()} err={err} {why or ''} {res}", flush=True)
        if with_determinism and good:
            same, derr = determinism(cfg)
            ok = same and derr <= 2e-3
            bad += not ok
            print(f"{'DETERMINISM' if ok else 'DETERMINISMFAIL'} {arg} bitwise={same} err={derr:.2e}", flush=True)
    sys.exit(1 if bad else 0)


def smoke_all(cfgs, per_cfg_timeout=60):
    """All configs in one child process (one import and CUDA context), each started with a "START"
    line: a deadlock in the kernel (mbarrier phases, the turn handshake, setmaxnreg) shows as a
    timeout here instead of hanging the session; the hung config is dropped and the child restarted
    for the rest."""
    log("== smoke (child process; a hang is reported and the config dropped)")
    args = [next((k for k, v in NAMED.items() if v == c), repr(c).replace(" ", "")) for c in cfgs]
    ok, todo = [], list(args)
    while todo:
        t = time.time()
        try:
            r = subprocess.run([sys.executable, __file__, "--smoke", *todo], capture_output=True, text=True,
                               timeout=60 + per_cfg_timeout * len(todo), env=dict(os.environ, PYTHONPATH=str(SRC)))
            out, hung = r.stdout, None
        except subprocess.TimeoutExpired as e:
            out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
            hung = True
        done = []
        for ln in out.splitlines():
            if ln.startswith(("SMOKE ", "SMOKEFAIL ")):
                arg = ln.split()[1]
                done.append(arg)
                log(("ok   " if ln.startswith("SMOKE ") else "FAIL ") + ln.split(" ", 1)[1])
                if ln.startswith("SMOKE "):
                    ok.append(_cfg_of(arg))
        started = [ln.split()[1] for ln in out.splitlines() if ln.startswith("START ")]
        rest = [a for a in todo if a not in done]
        if hung:
            victim = started[-1] if started else rest[0]
            log(f"HANG {victim} (child killed after {time.time() - t:.0f} s)")
            rest = [a for a in rest if a != victim]
        elif rest:
            tail = (r.stdout + r.stderr).strip().splitlines()[-15:]
            log(f"child exited ({r.returncode}) before {rest[0]}:\n" + "\n".join(tail))
            rest = rest[1:]
        todo = rest
    return ok


def sanitize_cases():
    """A few small ragged calls over the named configs and the stream-K ones (ragged M, N and K
    tails, zeros, bias, bf16), for compute-sanitizer's memcheck / racecheck / synccheck; exits 1 if
    any result is wrong."""
    bad = 0
    cases = ((65, 72, 576, 64, "float", torch.float16, True, 0.5), (300, 200, 1376, 32, "int", torch.bfloat16, False, 1.0),
             (129, 136, 4096, -1, None, torch.float16, True, 1.0))
    for i, cfg in enumerate(list(NAMED.values()) + [c for c in SPLIT_CONFIGS if c.stream]):
        M, N, K, g, zeros, dtype, bias, alpha = cases[i % len(cases)]
        err, why = check(M, N, K, g, zeros, dtype, bias, alpha, cfg, seed=i)
        print(f"sanitize {cfg.short()} M={M} N={N} K={K} g={g} err={err} {why or ''}", flush=True)
        bad += not (err is not None and err < 1e-2)
    print(f"sanitize cases failed: {bad}", flush=True)
    sys.exit(1 if bad else 0)


def correctness(cfg, quick):
    log(f"== correctness ({cfg.short()})")
    shapes = [(65, 72, 576), (300, 200, 1376), (1000, 4100, 4096), (2049, 72, 4096), (129, 4100, 1376),
              (513, 200, 4096)]
    cases = [case for i, case in option_matrix(shapes) if not (quick and i % 3)]
    fails = 0
    for n, (M, N, K, g, zeros, dtype, bias, alpha) in enumerate(cases):
        tol = 2e-3 if dtype == torch.float16 else 1e-2
        try:
            err, why = check(M, N, K, g, zeros, dtype, bias, alpha, cfg, seed=n)
        except Exception as e:  # noqa: BLE001
            err, why = float("inf"), f"{type(e).__name__}: {e}"
            traceback.print_exc()
        good = err is None or err <= tol
        fails += not good
        log(f"{'ok  ' if good else 'FAIL'} M={M} N={N} K={K} g={g} zeros={zeros} {str(dtype)[6:]} bias={bias} "
            f"alpha={alpha} err={err} {why or ''}")
    # determinism (no K split: bitwise equal by construction) and CUDA graph = eager
    gen = torch.Generator().manual_seed(5)
    w = random_weight(4096, 14336, 128, None, torch.float16, "cpu", gen).to("cuda")
    x = torch.randn(1000, 14336, generator=gen).half().cuda()
    pw = prepare_weight(w)
    y1, y2 = run_prefill(x, pw, None, 1.0, cfg), run_prefill(x, pw, None, 1.0, cfg)
    same = torch.equal(y1, y2)
    graph_ok = graph_replay_matches_eager(lambda out: run_prefill(x, pw, None, 1.0, cfg, out=out))
    log(f"deterministic (bitwise twice): {same}; cuda graph replay equals eager: {graph_ok}")
    fails += (not same) + (not graph_ok)
    log(f"correctness {cfg.short()}: {len(cases) + 2 - fails}/{len(cases) + 2} passed")
    return fails


def timed(calls):
    return GraphTimer(target_ms=2.0, max_calls=50, budget_ms=60.0, max_repeats=5).measure(calls).median_us


class Layer:
    """A layer's weights in every form the timing needs, with rotating copies beyond L2."""

    def __init__(self, N, K, dtype=torch.float16):
        gen = torch.Generator().manual_seed(1)
        self.N, self.K = N, K
        self.w = random_weight(N, K, 128, None, dtype, "cpu", gen).to("cuda")
        pw = prepare_weight(self.w)
        wbytes = pw.codes.numel() + pw.scales_t.numel() * 2
        n = copies_for(wbytes, L2_BYTES)
        self.pws = [pw] + [GluonPrepared(pw.codes.clone(), pw.scales_t.clone(), None, pw.N, pw.K, pw.K_pad,
                                         pw.group, pw.kh) for _ in range(n - 1)]
        self.ws = [self.w] + [QuantizedWeight.from_plain(self.w.qweight.clone(), self.w.scales.clone(), None, 128)
                              for _ in range(n - 1)]
        wd = self.w.dequantize(torch.float16)
        self.wds = [wd] + [wd.clone() for _ in range(copies_for(wd.numel() * 2, L2_BYTES) - 1)]

    def gluon(self, x, cfg):
        outs = [torch.empty(x.shape[0], self.N, dtype=x.dtype, device="cuda") for _ in self.pws]
        return timed([lambda p=p, o=o: run_prefill(x, p, None, 1.0, cfg, out=o) for p, o in zip(self.pws, outs)])

    def triton(self, x):
        import w4a16
        return timed([lambda q=q: w4a16.gemm(x, q, backend="triton") for q in self.ws])

    def cublas(self, x):
        xh = x.half()
        return timed([lambda d=d: F.linear(xh, d) for d in self.wds])


def timing(ms, budget, cfg_for):
    log("== timing: us per call (CUDA-graph replay, rotating weights), TFLOP/s, x cuBLAS fp16")
    log(f"{'layer':12s} {'M':>5s} {'cfg':22s} {'gluon':>9s} {'TF/s':>6s} {'triton':>9s} {'cublas':>9s} "
        f"{'gl/cb':>6s} {'tr/cb':>6s}")
    ratios = []
    for name, (N, K) in SHAPES.items():
        if time.time() - T0 > budget:
            log(f"(budget of {budget} s reached: stopping before {name})")
            break
        try:
            L = Layer(N, K)
        except Exception as e:  # noqa: BLE001
            log(f"{name}: setup failed: {type(e).__name__}: {e}")
            continue
        for M in ms:
            x = torch.randn(M, K, dtype=torch.float16, device="cuda")
            cfg = cfg_for(M, N, K)
            res = {}
            for what, fn in (("gluon", lambda L=L, x=x, c=cfg: L.gluon(x, c)), ("triton", lambda L=L, x=x: L.triton(x)),
                             ("cublas", lambda L=L, x=x: L.cublas(x))):
                try:
                    res[what] = fn()
                except Exception as e:  # noqa: BLE001
                    log(f"{name} M={M} {what} failed: {type(e).__name__}: {str(e)[:300]}")
                    res[what] = float("nan")
            tg, tt, tc = res["gluon"], res["triton"], res["cublas"]
            tf = 2 * M * N * K / (tg * 1e-6) / 1e12 if tg == tg else float("nan")
            log(f"{name:12s} {M:5d} {cfg.short():22s} {tg:9.1f} {tf:6.0f} {tt:9.1f} {tc:9.1f} {tc / tg:6.2f} "
                f"{tc / tt:6.2f}")
            if tg == tg and M >= 1024:
                ratios.append(tc / tg)
        del L
        torch.cuda.empty_cache()
    if ratios:
        import math
        log(f"geomean gluon / cuBLAS fp16 at M >= 1024: {math.exp(sum(map(math.log, ratios)) / len(ratios)):.3f}x "
            f"(min {min(ratios):.2f}x) over {len(ratios)} calls")


def sweep(shapes, ms, budget, extra=()):
    log("== sweep: us per call (x cuBLAS fp16) of every candidate, fastest first")
    for name in shapes:
        if time.time() - T0 > budget:
            log(f"(budget of {budget} s reached: stopping before {name})")
            break
        N, K = SHAPES[name]
        L = Layer(N, K)
        for M in ms:
            x = torch.randn(M, K, dtype=torch.float16, device="cuda")
            tc = L.cublas(x)
            res = []
            for cfg in list(prefill_candidates(M, N, K, 128, 132, False)) + list(extra):
                try:
                    res.append((L.gluon(x, cfg), cfg.short()))
                except Exception as e:  # noqa: BLE001
                    log(f"  {cfg.short()} failed: {type(e).__name__}: {str(e)[:200]}")
            res.sort()
            log(f"{name:12s} M={M:5d} cublas {tc:.1f}  " + "  ".join(f"{c} {t:.1f} ({tc / t:.2f})" for t, c in res))
        del L
        torch.cuda.empty_cache()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer correctness cases, M = 1024 and 4096 only")
    ap.add_argument("--sweep", action="store_true", help="time every candidate on 70B gate_up, 8B qkv, 70B down")
    ap.add_argument("--split-sweep", action="store_true",
                    help="time the candidates and the K-split and stream-K configs on the small layers at M = 128, 256")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--budget", type=float, default=240.0, help="seconds for the whole run (timing stops early)")
    ap.add_argument("--config", default=None, help="a named prefill config for the timing table (default: heuristic)")
    ap.add_argument("--skip-correctness", action="store_true")
    ap.add_argument("--split-correctness", action="store_true",
                    help="the option matrix (quick) on each K-split and stream-K config that passed the smoke test")
    ap.add_argument("--smoke", nargs="+", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--smoke-determinism", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--sanitize", action="store_true", help="only a few small ragged cases (for compute-sanitizer)")
    a = ap.parse_args()
    if a.smoke:
        smoke(a.smoke, a.smoke_determinism)
        return
    if a.sanitize:
        sanitize_cases()
        return
    log.open(Path(a.out) / "gluon_prefill_session.log")
    import triton
    log(f"env: {torch.cuda.get_device_name()} torch {torch.__version__} triton {triton.__version__} "
        f"python {sys.version.split()[0]} {time.strftime('%Y-%m-%d %H:%M:%S')}")
    ok = smoke_all(list(NAMED.values()) + SPLIT_CONFIGS + ([] if a.quick else
                                                           [GluonPrefillConfig(64, 128, 1, 6), GluonPrefillConfig(64, 64, 2, 4)]))
    if not ok:
        log("no prefill config passed the smoke test: stopping")
        return
    fails = 0
    if not a.skip_correctness:
        fails += correctness(ok[0], a.quick)
        for cfg in ok[1:]:
            if time.time() - T0 < a.budget * 0.4:
                fails += correctness(cfg, True)
    if a.split_correctness:
        for cfg in (c for c in SPLIT_CONFIGS if c in ok):
            fails += correctness(cfg, True)
    ms = (1024, 4096) if a.quick else (256, 1024, 4096)
    fixed = NAMED[a.config] if a.config else None
    cfg_for = (lambda M, N, K: fixed) if fixed else (lambda M, N, K: prefill_heuristic(M, N, K, 128, 132))
    if a.sweep:
        sweep(("70B gate_up", "8B qkv", "70B down"), (1024, 4096), a.budget * 0.6)
    if a.split_sweep:   # the small grids, where a K split should fill the SMs (only configs that passed the smoke test)
        sweep(("8B qkv", "8B o", "70B qkv", "70B o", "8B down"), (128, 256), a.budget * 0.8,
              [c for c in SPLIT_CONFIGS if c in ok])
    timing(ms, a.budget, cfg_for)
    log(f"done in {time.time() - T0:.0f} s; correctness failures: {fails}")


if __name__ == "__main__":
    main()
