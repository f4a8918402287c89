"""The command line: ``w4a16 info | check | demo | bench | sass | fuzz | tune | build-lib`` (also
``python -m w4a16``).

* ``info``  — versions, the device, and which path ``w4a16.gemm`` takes there and why.
* ``check`` — the test program: ``w4a16.gemm`` against ``w4a16.reference.gemm`` over shapes,
  dtypes, group sizes, zeros / bias / alpha, and named configs; prints a pass/fail table.
* ``demo``  — quantizes a Llama-3-8B-shaped layer set, reports SQNR and memory, checks the GEMM
  at several M and, on a CUDA GPU, times it against fp16 ``torch.nn.functional.linear``.
* ``bench`` — the benchmark harness of :mod:`w4a16.bench.cli`, where that module is present.
* ``sass``  — every shipped kernel config compiled for sm_90a, no GPU needed: registers, spills,
  shared memory, SASS instructions per weight (:mod:`w4a16.sass`).
* ``fuzz``  — random problems against the reference, per backend (:mod:`w4a16.fuzz_cli`).
* ``tune``  — time configs on this GPU and keep the winners; merge tuning files; turn a decode
  sweep log into entries (:mod:`w4a16.tune_cli`).
* ``build-lib`` — the C library (:mod:`w4a16.capi`).

Without a CUDA GPU the commands run the Triton kernels in Triton's CPU interpreter: ``main`` sets
TRITON_INTERPRET=1 unless it is already set (TRITON_INTERPRET=0 keeps the pure-torch reference).
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import statistics
import sys
from dataclasses import dataclass
from typing import Optional

import torch

from . import __version__, config, ops, reference, spec
from .backends.triton.env import triton_version
from .measure import rel_error
from .backends import registry
from ._table import fmt_bytes, format_table
from .pack import pack_nibbles
from .weight import QuantizedWeight

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
TOLERANCE = {torch.float16: 2e-3, torch.bfloat16: 1e-2}  # relative Frobenius error vs the reference
BF16_ON_CPU = "bf16 left out: Triton's CPU interpreter computes bf16 dots wrongly (run on a GPU)"


# ---------------------------------------------------------------------------- environment
def _device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _interpret_state() -> str:
    v = os.environ.get("TRITON_INTERPRET")
    return "unset" if v is None else v


def _headline(device: torch.device) -> str:
    """Three lines that say what a command runs on: device, versions, and the GEMM path."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "no CUDA GPU"
    path, reason = ops.describe_path(device)
    return (f"device: {device.type} ({name})\n"
            f"versions: w4a16 {__version__}, torch {torch.__version__}, triton {triton_version()}, "
            f"TRITON_INTERPRET={_interpret_state()}\n"
            f"gemm path: {path} ({reason})")


def _interpreted(device: torch.device) -> bool:
    """True when ``gemm`` runs in Triton's interpreter on ``device`` (where bf16 dots are wrong)."""
    return ops.describe_path(device)[0] == "triton-interpreter"


# ---------------------------------------------------------------------------- info
def cmd_info(args) -> int:
    dev = _device()
    path, reason = ops.describe_path(dev)
    rows = [["w4a16", __version__], ["python", sys.version.split()[0]], ["torch", torch.__version__],
            ["triton", triton_version()], ["TRITON_INTERPRET", _interpret_state()],
            ["CUDA available", "yes" if dev.type == "cuda" else "no"],
            ["torch CUDA build", torch.version.cuda or "none (CPU build)"]]
    if dev.type == "cuda":
        p = torch.cuda.get_device_properties(dev)
        rows += [["device", p.name], ["compute capability", f"{p.major}.{p.minor}"],
                 ["SMs", str(p.multi_processor_count)], ["memory", fmt_bytes(p.total_memory)]]
    else:
        rows += [["device", "cpu"], ["compute capability", "-"], ["SMs", "-"], ["memory", "-"]]
    rows += [["gemm path", path], ["why", reason]]
    rows += [[f"backend {name}", b.available(dev) or "available"] for name, b in registry().items()]
    rows.append(["Gluon kernels on this triton", _gluon_on_triton()])
    if importlib.util.find_spec("triton") is not None:
        from .backends.triton_compat import SM90_PTXAS_ENV, legacy_sm90_ptxas, sm90_ptxas
        note = f"; {SM90_PTXAS_ENV}=legacy compiles it with the older one" if legacy_sm90_ptxas() else ""
        rows.append(["ptxas for sm_90", sm90_ptxas() + note])
    print(format_table(["item", "value"], rows))
    return 0


def _gluon_on_triton() -> str:
    """Whether the installed Triton runs the Gluon kernels (whatever the device), and if not why."""
    if importlib.util.find_spec("triton") is None:
        return "no: Triton is not installed"
    from .backends.triton_compat import SUPPORTED, gluon_unsupported
    reason = gluon_unsupported()
    (lo, hi) = SUPPORTED
    return f"no: {reason}" if reason else f"yes (triton {lo[0]}.{lo[1]} to {hi[0]}.{hi[1]} supported)"


# ---------------------------------------------------------------------------- check
@dataclass(frozen=True)
class Case:
    """One GEMM problem: x [M, K] of ``dtype`` times a [N, K] int4 weight of group size ``g``.

    zeros: "-" (symmetric), "int" (integer zero points) or "float" (non-integer zero points).
    """

    M: int
    N: int
    K: int
    dtype: torch.dtype
    g: int
    zeros: str
    bias: bool
    alpha: float


# (M, N, K, g, zeros, bias, alpha): small, with M and N off every tile size on purpose.
QUICK_CASES = [
    (1, 64, 256, 128, "-", False, 1.0),
    (5, 48, 512, 32, "int", True, 0.5),
    (16, 96, 256, 64, "float", True, 1.0),
    (33, 40, 512, 256, "int", False, 2.0),
    (3, 64, 256, -1, "-", True, 0.75),
    (0, 32, 256, 128, "-", False, 1.0),
]
# The full table on a GPU: every shape x dtype x group size x variant.
FULL_SHAPES = [(1, 4096, 4096), (16, 4096, 4096), (128, 4096, 4096), (2048, 4096, 4096),
               (0, 256, 512), (3, 72, 768), (33, 1000, 1536), (257, 520, 2048), (600, 4096, 4096),
               (5, 28672, 4096), (16, 4096, 14336), (1, 6144, 4096)]
VARIANTS = [("-", False, 1.0), ("int", True, 0.5), ("float", True, 1.25)]


def check_cases(quick: bool, dtypes) -> list:
    """The cases ``w4a16 check`` runs: the quick set, or the full table (GPU default)."""
    if quick:
        return [Case(M, N, K, dt, g, z, b, a) for dt in dtypes for (M, N, K, g, z, b, a) in QUICK_CASES]
    return [Case(M, N, K, dt, g, z, b, a) for (M, N, K) in FULL_SHAPES for dt in dtypes
            for g in spec.SUPPORTED_GROUP_SIZES for (z, b, a) in VARIANTS]


def make_problem(case: Case, device: torch.device, gen: torch.Generator):
    """Random inputs of ``case``: (x [M, K], QuantizedWeight (N, K), bias [N] or None).

    Codes are uniform in 0..15, scales in [0.005, 0.015), zeros uniform in 0..15.
    """
    M, N, K, dt = case.M, case.N, case.K, case.dtype
    G = 1 if case.g == -1 else K // case.g
    codes = torch.randint(0, 16, (N, K), generator=gen, device=device, dtype=torch.uint8)
    scales = (torch.rand(N, G, generator=gen, device=device) * 0.01 + 0.005).to(dt)
    zeros = None
    if case.zeros == "int":
        zeros = torch.randint(0, 16, (N, G), generator=gen, device=device).to(dt)
    elif case.zeros == "float":
        zeros = (torch.rand(N, G, generator=gen, device=device) * 15).to(dt)
    w = QuantizedWeight.from_plain(pack_nibbles(codes), scales, zeros, case.g)
    x = torch.randn(M, K, generator=gen, device=device).to(dt)
    bias = torch.randn(N, generator=gen, device=device).to(dt) if case.bias else None
    return x, w, bias


def _run_case(x, w, bias, alpha, ref, cfg: str, tol: float) -> tuple:
    """(rel err or None, status, error message or None) of one ``w4a16.gemm`` call."""
    try:
        y = ops.gemm(x, w, bias, alpha, config=cfg)
    except Exception as e:  # a check reports every failure as a row, then goes on
        return None, "ERROR", f"{type(e).__name__}: {e}"
    if tuple(y.shape) != tuple(ref.shape) or y.dtype != ref.dtype:
        return None, "FAIL", f"expected {tuple(ref.shape)} {ref.dtype}, got {tuple(y.shape)} {y.dtype}"
    if not bool(torch.isfinite(y).all()):
        return None, "NaN", "non-finite values in the output"
    err = rel_error(y, ref)
    return err, ("ok" if err <= tol else "FAIL"), None


def _ran(x, w, cfg: str) -> str:
    """What ``gemm(x, w, config=cfg)`` runs: the backend and its config (e.g. 'reference' for bf16
    on a CPU, where Triton's interpreter is not used)."""
    try:
        return ops.choose(x, w, cfg).label
    except Exception as e:  # reported by the run itself
        return type(e).__name__


def cmd_check(args) -> int:
    dev = _device()
    print(_headline(dev))
    if args.dtype == "all":
        interpreted = _interpreted(dev)
        dtypes = [torch.float16] if interpreted else [torch.float16, torch.bfloat16]
        if interpreted:
            print(BF16_ON_CPU)
    else:
        dtypes = [DTYPES[args.dtype]]
    quick = args.quick or dev.type != "cuda"
    configs = list(config.config_names()) if args.all_configs else [args.config]
    cases = check_cases(quick, dtypes)
    print(f"{len(cases)} problems x {len(configs)} config(s) "
          f"({'quick set' if quick else 'full table'}; tolerance: rel. Frobenius error <= "
          f"{', '.join(f'{TOLERANCE[d]:g} {spec.dtype_name(d)}' for d in dtypes)})")
    gen = torch.Generator(device=dev).manual_seed(args.seed)
    rows, errors, passed, failed = [], [], 0, 0
    for case in cases:
        x, w, bias = make_problem(case, dev, gen)
        ref = reference.gemm(x, w, bias, case.alpha)
        for cfg in configs:
            err, status, msg = _run_case(x, w, bias, case.alpha, ref, cfg, TOLERANCE[case.dtype])
            passed += status == "ok"
            failed += status != "ok"
            if msg:
                errors.append(f"row {len(rows) + 1}: {msg}")
            rows.append([case.M, case.N, case.K, spec.dtype_name(case.dtype), case.g, case.zeros,
                         "yes" if case.bias else "-", f"{case.alpha:g}", cfg, _ran(x, w, cfg),
                         None if err is None else f"{err:.2e}", status])
    print(format_table(["M", "N", "K", "dtype", "g", "zeros", "bias", "alpha", "config", "ran", "rel err",
                        "status"], rows, align="rrrlrllrllrl"))
    for e in errors:
        print(e)
    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0


# ---------------------------------------------------------------------------- demo
LLAMA3_8B_LAYERS = [("qkv", 6144, 4096), ("o", 4096, 4096), ("gate_up", 28672, 4096), ("down", 4096, 14336)]
DEMO_M = (1, 16, 256, 2048)
SMALL_DIV = 16
SMALL_K_MULTIPLE = max(spec.SUPPORTED_GROUP_SIZES)  # small K valid for every group size
SMALL_M = (1, 16, 64)


def small_layers() -> list:
    """The CPU-sized layers: N / 16 and K / 16 rounded up to a multiple of 256, so that every
    group size divides K (down: 14336 / 16 = 896 -> 1024)."""
    up = lambda v: -(-v // SMALL_K_MULTIPLE) * SMALL_K_MULTIPLE  # noqa: E731
    return [(n, N // SMALL_DIV, up(K // SMALL_DIV)) for n, N, K in LLAMA3_8B_LAYERS]


def time_cuda_ms(fn, warmup: int = 10, reps: int = 50) -> float:
    """Median milliseconds of ``fn()`` on the current CUDA stream, L2 flushed before each run.

    The flush (256 MiB of writes) runs on the GPU just before the start event, so the host has
    enqueued ``fn``'s kernels by the time the GPU reaches them: launch overhead is not counted.
    """
    flush = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def cmd_demo(args) -> int:
    dev = _device()
    small = args.small or dev.type != "cuda"
    dt = DTYPES[args.dtype]
    path = ops.describe_path(dev)[0]
    print(_headline(dev))
    if _interpreted(dev) and dt == torch.bfloat16:
        print(f"{BF16_ON_CPU}; using fp16")
        dt = torch.float16
    note = None
    if dev.type != "cuda":
        note = f"no CUDA GPU: ran a small version on the CPU, using {path}"
    elif small:
        note = f"small version (--small) on {torch.cuda.get_device_name(dev)}, using {path}"
    layers = small_layers() if small else LLAMA3_8B_LAYERS
    m_values = SMALL_M if small else DEMO_M
    if note:
        print(note)
    shrunk = f" (shapes / {SMALL_DIV}, K rounded up to a multiple of {SMALL_K_MULTIPLE})"
    print(f"layers of a Llama-3-8B block{shrunk if small else ''}, weights "
          f"randn * 0.02, {spec.dtype_name(dt)}, group size {args.group_size}, "
          f"{'asymmetric' if args.asym else 'symmetric'} RTN\n")
    gen = torch.Generator(device=dev).manual_seed(args.seed)
    qrows, weights, full_bytes, q_bytes = [], [], 0, 0
    for name, N, K in layers:
        W = torch.randn(N, K, generator=gen, device=dev) * 0.02
        w = reference.quantize(W, args.group_size, symmetric=not args.asym, dtype=dt)
        sq = reference.sqnr_db(W, w.dequantize(torch.float32))
        fb, qb = N * K * dt.itemsize, w.nbytes()
        full_bytes, q_bytes = full_bytes + fb, q_bytes + qb
        qrows.append([name, N, K, f"{sq:.2f}", fmt_bytes(fb), fmt_bytes(qb), f"{100 * (1 - qb / fb):.1f}%"])
        weights.append((name, w))
    qrows.append(["total", "", "", "", fmt_bytes(full_bytes), fmt_bytes(q_bytes),
                  f"{100 * (1 - q_bytes / full_bytes):.1f}%"])
    print(format_table(["layer", "N", "K", "SQNR dB", spec.dtype_name(dt), "int4", "saved"], qrows,
                       align="lrrrrrr"))
    print()
    timed = dev.type == "cuda"
    grows, failed = [], 0
    for name, w in weights:
        W16 = w.dequantize(dt) if timed else None
        for M in m_values:
            x = torch.randn(M, w.shape[1], generator=gen, device=dev).to(dt)
            y = ops.gemm(x, w)
            err = rel_error(y, reference.gemm(x, w))
            ok = bool(torch.isfinite(y).all()) and err <= TOLERANCE[dt]
            failed += not ok
            row = [name, M, f"{err:.2e}", "ok" if ok else "FAIL"]
            if timed:
                t_q = time_cuda_ms(lambda: ops.gemm(x, w))
                t_f = time_cuda_ms(lambda: torch.nn.functional.linear(x, W16))
                row += [f"{t_q * 1e3:.1f}", f"{t_f * 1e3:.1f}", f"{t_f / t_q:.2f}x"]
            grows.append(row)
    headers = ["layer", "M", "rel err", "status"]
    if timed:
        headers += ["w4a16 us", f"{spec.dtype_name(dt)} linear us", "speedup"]
    print(format_table(headers, grows, align="lrrl" + "rrr" * timed))
    if not timed:
        print("timing skipped: it needs a CUDA GPU")
    print(f"{len(grows) - failed} passed, {failed} failed")
    if note:
        print(note)
    return 1 if failed else 0


# ---------------------------------------------------------------------------- parser
def _bench_module():
    """(``w4a16.bench.cli`` or None, why it failed to import or None)."""
    try:
        if importlib.util.find_spec("w4a16.bench.cli") is None:
            return None, None
        return importlib.import_module("w4a16.bench.cli"), None
    except ImportError as e:
        return None, f"{type(e).__name__}: {e}"


def _bench_unavailable(error: str):
    def run(args) -> int:
        print(f"w4a16 bench is unavailable here: {error}", file=sys.stderr)
        return 1
    return run


def build_parser(bench=None, bench_error: Optional[str] = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="w4a16", description="W4A16 GEMM: fp16/bf16 activations x int4 weights.")
    p.add_argument("--version", action="version", version=f"w4a16 {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("info", help="versions, device, and the path w4a16.gemm takes").set_defaults(func=cmd_info)

    c = sub.add_parser("check", help="verify w4a16.gemm against the reference and print a table")
    c.add_argument("--quick", action="store_true", help="the small representative set (the CPU default)")
    c.add_argument("--dtype", choices=["all", *DTYPES], default="all",
                   help="activation dtype(s); 'all' is fp16 and bf16 on a GPU, fp16 on the CPU")
    g = c.add_mutually_exclusive_group()
    g.add_argument("--config", choices=config.config_names(), default="auto", help="config name (default auto)")
    g.add_argument("--all-configs", action="store_true", help="run every named config")
    c.add_argument("--seed", type=int, default=0)
    c.set_defaults(func=cmd_check)

    d = sub.add_parser("demo", help="quantize a Llama-3-8B-shaped layer set and run the GEMM on it")
    d.add_argument("--dtype", choices=list(DTYPES), default="fp16")
    d.add_argument("--group-size", type=int, choices=spec.SUPPORTED_GROUP_SIZES, default=128)
    d.add_argument("--asym", action="store_true", help="asymmetric quantization (integer zero points)")
    d.add_argument("--small", action="store_true", help="shapes / 16 and small M even on a GPU")
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(func=cmd_demo)

    from .capi import cli as capi_cli  # no Triton or compiler needed until the command runs
    capi_cli.add_parser(sub).set_defaults(func=capi_cli.run)
    from .sass import cli as sass_cli  # likewise
    sass_cli.add_parser(sub).set_defaults(func=sass_cli.run)
    from . import fuzz_cli, tune_cli
    fuzz_cli.add_parser(sub).set_defaults(func=fuzz_cli.run)
    tune_cli.add_parser(sub).set_defaults(func=tune_cli.run)

    if bench is not None:
        bench.add_parser(sub)
    elif bench_error:
        sub.add_parser("bench", help="(unavailable: an import failed)").set_defaults(
            func=_bench_unavailable(bench_error))
    return p


def main(argv: Optional[list] = None) -> int:
    """Run one sub-command; returns the exit status (0 ok, 1 a check failed, 2 bad usage)."""
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    bench, bench_error = _bench_module()
    parser = build_parser(bench, bench_error)
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version and usage errors
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    if args.command == "bench" and bench is not None:
        return int(bench.run(args) or 0)
    return args.func(args)
