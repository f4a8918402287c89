"""``w4a16 fuzz``: random GEMM problems against the reference, per backend (:mod:`w4a16.fuzz`).

    w4a16 fuzz --cases 2000                                # gemm's own choice, on the GPU if there is one
    w4a16 fuzz --cases 2000 --backend triton --backend gluon --progress 200
    w4a16 fuzz --moe --cases 500 --backend triton         # mixture-of-experts layers (w4a16.moe.fuzz)

Each case runs once per backend; failures are printed (up to ``--show``), then one line per backend:
"N passed, F failed, R refused". A case a named backend refuses (:class:`w4a16.BackendRefused`:
a shape outside its kernels' rules, e.g. K % 8 != 0 for TMA) is counted as refused, not run, and
more cases are drawn until ``--cases`` of them ran on that backend. Exit status 1 when a case
failed or raised, or fewer than ``--cases`` ran.
"""
from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field
from typing import List, Optional


@dataclass
class Tally:
    """The outcome of one backend's run: counts, the worst passing relative error, failure lines."""

    backend: str
    passed: int = 0
    failed: int = 0
    refused: int = 0
    worst: float = 0.0
    failures: List[str] = field(default_factory=list)

    def line(self, more: str = "") -> str:
        """The summary line; ``more`` is appended inside its parentheses."""
        return (f"[{self.backend}] {self.passed} passed, {self.failed} failed, {self.refused} refused "
                f"(worst passing rel err {self.worst:.3g}{more})")


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("fuzz", help="random GEMM problems against the reference, per backend",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", type=int, default=300, help="cases to run per backend (default 300)")
    p.add_argument("--device", default=None, help="device of the operands (default cuda if available, else cpu)")
    p.add_argument("--backend", action="append", default=None,
                   help="w4a16.gemm(backend=...) to test, repeatable (default: gemm's own choice)")
    p.add_argument("--seed", type=int, default=0, help="seed of the case draw (default 0)")
    p.add_argument("--max-mnk", default=None, metavar="M,N,K",
                   help="upper bounds of M, N and K (default 300,1100,4200 on a GPU, 64,256,1024 on the CPU)")
    p.add_argument("--dtype", choices=["fp16", "bf16", "both"], default=None,
                   help="activation dtypes (default both on a GPU, fp16 on the CPU)")
    p.add_argument("--show", type=int, default=20, help="failures printed per backend (default 20)")
    p.add_argument("--progress", type=int, default=0, metavar="EVERY",
                   help="print a progress line every EVERY cases (default 0: none)")
    p.add_argument("--moe", action="store_true",
                   help="whole mixture-of-experts layers (w4a16.moe.fused_moe; backends auto, triton, gluon, reference; "
                        "--max-mnk bounds T,H,I, default 64,256,512 on the CPU, 300,2048,2048 on a GPU)")
    return p


def fuzz_backend(backend: Optional[str], n: int, device, seed: int, max_mnk, dtypes, show: int = 20,
                 progress: int = 0, print_fn=print, suite=None) -> Tally:
    """Run ``n`` cases of :func:`w4a16.fuzz.cases` on ``backend`` (None: gemm's own choice);
    ``suite`` another module of the same interface (``cases``, ``run_case``, ``passes``), e.g.
    :mod:`w4a16.moe.fuzz`.

    At most 20 x ``n`` cases are drawn to find ``n`` the backend runs; the draw is the same for
    every backend. Exceptions other than :class:`~w4a16.errors.BackendRefused` count as failures.
    """
    import torch

    from . import fuzz
    from .errors import BackendRefused

    fuzz = suite or fuzz
    t = Tally(backend or "default")
    t0 = time.perf_counter()
    reported = 0
    for case in fuzz.cases(20 * n, seed=seed, max_mnk=max_mnk, dtypes=dtypes):
        ran = t.passed + t.failed
        if ran >= n:
            break
        if progress and ran and ran % progress == 0 and ran != reported:
            reported = ran
            print_fn(f"[{t.backend}] {ran}/{n}: {t.passed} passed, {t.failed} failed, {t.refused} refused, "
                     f"{time.perf_counter() - t0:.0f} s")
        try:
            err = fuzz.run_case(case, torch.device(device), backend=backend)
            ok, msg = fuzz.passes(case, err), f"rel err {err:.3g}"
        except BackendRefused as e:
            if backend is not None:
                t.refused += 1
                continue
            ok, msg, err = False, f"{type(e).__name__}: {e}", 0.0   # "auto" must never refuse
        except Exception as e:  # a crash is a failure of that case, reported with the case
            ok, msg, err = False, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", 0.0
        if ok:
            t.passed += 1
            t.worst = max(t.worst, err)
            continue
        t.failed += 1
        if len(t.failures) < show:
            t.failures.append(f"FAIL [{t.backend}] {case.short()}: {msg}")
            print_fn(t.failures[-1])
    return t


def run(args) -> int:
    import torch

    from .errors import expect

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    gpu = device.type == "cuda"
    expect(args.cases >= 1, "--cases", "a count >= 1", args.cases)
    spec = args.max_mnk or {(False, False): "64,256,1024", (True, False): "300,1100,4200",
                             (False, True): "64,256,512", (True, True): "300,2048,2048"}[(gpu, bool(args.moe))]
    try:
        max_mnk = tuple(int(v) for v in spec.split(","))
    except ValueError:
        max_mnk = ()
    expect(len(max_mnk) == 3, "--max-mnk", "three integers M,N,K", spec)
    dt = args.dtype or ("both" if gpu else "fp16")
    dtypes = {"fp16": (torch.float16,), "bf16": (torch.bfloat16,), "both": (torch.float16, torch.bfloat16)}[dt]
    moe_fuzz = None
    if args.moe:
        from .moe import fuzz as moe_fuzz
        from .moe.ops import BACKENDS
        for b in args.backend or []:
            expect(b in BACKENDS, "--backend", f"one of {BACKENDS} with --moe", repr(b))
    status = 0
    for backend in args.backend or [None]:
        t0 = time.perf_counter()
        t = fuzz_backend(backend, args.cases, device, args.seed, max_mnk, dtypes, args.show, args.progress,
                         print_fn=lambda s: print(s, flush=True), suite=moe_fuzz)
        print(t.line(f", {time.perf_counter() - t0:.0f} s, device {device}, seed {args.seed}"), flush=True)
        status |= t.failed > 0 or t.passed + t.failed < args.cases
    return int(status)
