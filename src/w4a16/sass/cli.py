"""``w4a16 sass``: every shipped kernel config compiled for sm_90a with the installed Triton, no GPU
needed; a table of registers, spills, shared memory, HGMMAs and SASS instructions per weight in the
main loop; exit status 1 if a config fails to compile, spills, rewrites a register an issued wgmma
reads before waiting for it, or (with ``--baseline``) spends more instructions per weight than the
baseline build."""
from __future__ import annotations

import argparse
import sys
import time

from .shipped import KERNELS

DEFAULT_TOLERANCE = 0.05


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("sass", help="compile every shipped kernel config for sm_90a and report its SASS",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("--kernels", default=",".join(KERNELS), help=f"comma-separated subset of {', '.join(KERNELS)}")
    p.add_argument("--dtype", choices=["all", "fp16", "bf16"], default="all")
    p.add_argument("--jobs", type=int, default=0, help="compile processes (default: one per CPU)")
    p.add_argument("--json", metavar="PATH", help="write every case's numbers here (a baseline for --baseline)")
    p.add_argument("--baseline", metavar="PATH", help="a --json file of another build to compare with")
    p.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                   help=f"allowed growth of instructions per weight over the baseline (default {DEFAULT_TOLERANCE})")
    return p


def _rows(results, baseline):
    rows = []
    for r in results:
        b = (baseline or {}).get("cases", {}).get(r.key)
        delta = "-"
        if b and b.get("weights_per_thread") and b.get("instructions") and r.per_weight is not None:
            delta = f"{100 * (r.per_weight / (b['instructions'] / b['weights_per_thread']) - 1):+.1f}%"
        status = "FAIL" if r.failures else ("allowed" if r.allowed else "ok")
        rows.append([r.kernel, r.label, r.dtype, r.weights, r.registers if r.registers is not None else "-", r.spills,
                     f"{r.shared_bytes / 1024:.0f}" if r.shared_bytes else "-", r.hgmma,
                     f"{r.per_weight:.3f}" if r.per_weight is not None else "-",
                     f"{r.vector_per_weight:.3f}" if r.vector_per_weight is not None else "-", delta, status])
    return rows


def run(args) -> int:
    import json

    import triton

    from .._table import format_table
    from ..backends.triton_compat import release
    from ..errors import expect
    from .allowances import allowance_for
    from .report import judge, run_cases, to_json, write_json
    from .shipped import shipped_cases

    kernels = [k.strip() for k in args.kernels.split(",") if k.strip()]
    for k in kernels:
        expect(k in KERNELS, "--kernels", f"a subset of {', '.join(KERNELS)}", k)
    dtypes = ("fp16", "bf16") if args.dtype == "all" else (args.dtype,)
    baseline = None
    if args.baseline:
        with open(args.baseline) as f:
            baseline = json.load(f)
    cases = shipped_cases(dtypes, kernels)
    t0 = time.time()
    from ..backends.triton_compat import sm90_ptxas

    print(f"triton {triton.__version__} (ptxas {sm90_ptxas()}): compiling {len(cases)} kernel configs for sm_90a"
          + (f", against the triton {baseline['triton']} build in {args.baseline}" if baseline else ""), flush=True)
    done = [0]

    def progress(r):
        done[0] += 1
        if r.error or done[0] % 10 == 0 or done[0] == len(cases):
            print(f"  [{done[0]}/{len(cases)}] {r.key}" + (f": {r.error}" if r.error else ""), file=sys.stderr,
                  flush=True)

    results = run_cases(cases, args.jobs, progress)
    rel = release(triton.__version__)
    missing = judge(results, rel, baseline, args.tolerance)
    print(format_table(["kernel", "config", "dtype", "weights", "regs", "spills", "smem KB", "HGMMA",
                        "instr/weight", "non-uniform", "vs base", "status"], _rows(results, baseline)))
    failed = [r for r in results if r.failures]
    for r in failed:
        print(f"FAIL {r.key}: {'; '.join(r.failures)}" + (f" ({r.error})" if r.error else ""))
    allowed = [r for r in results if r.allowed and not r.failures]
    for r in allowed:
        print(f"allowed {r.key}: {'; '.join(r.allowed)}")
    whys = {allowance_for(rel, r.kernel, r.label).why for r in allowed}
    for why in sorted(whys):
        print(f"  why: {why}")
    if missing:
        print(f"not in the baseline (not compared): {len(missing)}")
    if args.json:
        write_json(args.json, to_json(results, triton.__version__))
    print(f"{len(results) - len(failed)} of {len(results)} configs ok ({len(allowed)} of them by a documented "
          f"allowance; {time.time() - t0:.0f} s, triton {triton.__version__})")
    return 1 if failed else 0
