"""Random GEMM problems against the reference on a device: ``w4a16.gemm`` vs ``reference.gemm``.

    python scripts/fuzz_gpu.py --cases 2000 --device cuda
    python scripts/fuzz_gpu.py --cases 2000 --backend triton --backend reference

Draws the cases of ``w4a16.fuzz.cases`` (fp16 and bf16 on a GPU, fp16 elsewhere), runs each
once per backend and prints the failures (up to --show), then one line per backend:
"N passed, F failed, R refused". A case a named backend refuses with the seam's clear error ("expected
a backend that runs this call": a shape outside its kernels' rules, e.g. K % 8 != 0 for TMA) is
counted as refused, not run; more cases are drawn until --cases of them ran on that backend. Exit
status 1 when any case failed or raised.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parents[1] / "src"))  # a checkout, unless PYTHONPATH has one

import torch  # noqa: E402


REFUSAL = "expected a backend that runs this call"   # the seam's error for a backend that cannot run a call


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", type=int, default=2000, help="number of random cases (default 2000)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="device of the operands (default cuda if available, else cpu)")
    p.add_argument("--backend", action="append", default=None,
                   help="w4a16.gemm(backend=...) to test, repeatable (default: gemm's own choice)")
    p.add_argument("--seed", type=int, default=0, help="seed of the case draw (default 0)")
    p.add_argument("--max-mnk", default="300,1100,4200", metavar="M,N,K",
                   help="upper bounds of M, N and K (default 300,1100,4200)")
    p.add_argument("--dtype", choices=["fp16", "bf16", "both"], default=None,
                   help="activation dtypes (default both on a GPU, fp16 elsewhere)")
    p.add_argument("--show", type=int, default=20, help="failures printed per backend (default 20)")
    p.add_argument("--progress", type=int, default=0, metavar="EVERY",
                   help="print a progress line every EVERY cases (default 0: none)")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before Triton is imported
    from w4a16 import fuzz
    from w4a16.errors import W4A16Error

    max_mnk = tuple(int(v) for v in args.max_mnk.split(","))
    dt = args.dtype or ("both" if device.type == "cuda" else "fp16")
    dtypes = {"fp16": (torch.float16,), "bf16": (torch.bfloat16,), "both": (torch.float16, torch.bfloat16)}[dt]
    status = 0
    for backend in args.backend or [None]:
        name = backend or "default"
        passed, failed, refused, worst, shown = 0, 0, 0, 0.0, 0
        reported = 0   # the count of cases run at the last progress line
        t0 = time.perf_counter()
        # the same draw for every backend; at most 20x --cases drawn to find --cases that run
        for case in fuzz.cases(20 * args.cases, seed=args.seed, max_mnk=max_mnk, dtypes=dtypes):
            ran = passed + failed
            if ran >= args.cases:
                break
            if args.progress and ran and ran % args.progress == 0 and ran != reported:
                reported = ran
                print(f"[{name}] {ran}/{args.cases}: {passed} passed, {failed} failed, {refused} refused, "
                      f"{time.perf_counter() - t0:.0f} s", flush=True)
            try:
                err = fuzz.run_case(case, device, backend=backend)
                ok, msg = fuzz.passes(case, err), f"rel err {err:.3g}"
            except W4A16Error as e:
                if backend is not None and REFUSAL in str(e):
                    refused += 1
                    continue
                ok, msg, err = False, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", 0.0
            except Exception as e:  # a crash is a failure of that case, reported with the case
                ok, msg, err = False, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", 0.0
            if ok:
                passed += 1
                worst = max(worst, err)
                continue
            failed += 1
            if shown < args.show:
                shown += 1
                print(f"FAIL [{name}] {case.short()}: {msg}")
        secs = time.perf_counter() - t0
        print(f"[{name}] {passed} passed, {failed} failed, {refused} refused (worst passing rel err {worst:.3g}, "
              f"{secs:.0f} s, device {device}, seed {args.seed})")
        status |= failed > 0 or passed + failed < args.cases
    return int(status)


if __name__ == "__main__":
    raise SystemExit(main())
