"""The ``bench`` sub-command: ``add_parser(subparsers)`` registers it, ``run(args)`` runs it.

    w4a16 bench                                   # both Llama-3 presets, all peers, graph timing
    w4a16 bench --quick                           # smoke test: 8B layers, M = 1, 16, 1024
    w4a16 bench --shape 4096,4096 --m 1,16 --dtype bf16 --timing both --out out/
    w4a16 bench --preset llama3-70b --configs     # every named config, to check the heuristic
"""
from __future__ import annotations

import argparse
import sys

import torch

from ..errors import W4A16Error
from . import shapes as sh
from .peers import PEER_NAMES
from .settings import TIMINGS, Settings

EXIT_OK, EXIT_WRONG, EXIT_USAGE = 0, 1, 2


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``bench`` on an ``argparse`` sub-parsers object; its default ``func`` is :func:`run`."""
    p = subparsers.add_parser(
        "bench", help="measure w4a16 against cuBLAS and torch's int4 kernel (needs a CUDA GPU)",
        description="Time W4A16 GEMMs on Llama-3 layer shapes against cuBLAS fp16/bf16 on the "
                    "dequantized weight and torch's int4 kernel, with the card's copy bandwidth and "
                    "GEMM rate measured in the same run. Every result is checked against "
                    "w4a16.reference.gemm before it is timed. Writes a markdown table to stdout and "
                    "bench.md, bench.csv, bench.json and PNG plots to --out.")
    p.add_argument("--preset", action="append", choices=tuple(sh.PRESETS) + tuple(sh.FAMILIES),
                   help=f"layer preset, repeatable (default: {' and '.join(sh.PRESETS)}; none when --shape "
                        f"is given; the other families are measured when named)")
    p.add_argument("--shape", action="append", metavar="N,K",
                   help="a custom layer: N output features, K input features (repeatable)")
    p.add_argument("--m", metavar="M,M,...", default=None,
                   help=f"rows of x (default {','.join(map(str, sh.DEFAULT_M))})")
    p.add_argument("--dtype", default="fp16", metavar="fp16|bf16",
                   help="activation dtype, or a comma list (default fp16)")
    p.add_argument("--group-size", default="128", metavar="G",
                   help="quantization group size (32, 64, 128, 256 or -1), or a comma list (default 128)")
    p.add_argument("--zeros", action="store_true", help="asymmetric weights with zero points")
    p.add_argument("--peers", default=",".join(PEER_NAMES), metavar="NAMES",
                   help=f"comma list from {','.join(PEER_NAMES)}, or w4a16-<backend> for a forced backend "
                        "(default all but the forced ones; absent ones report n/a)")
    p.add_argument("--timing", default="graph", choices=TIMINGS,
                   help="graph: CUDA-graph replay; eager: Python loop with host overhead (default graph)")
    p.add_argument("--out", default="bench-out", metavar="DIR", help="output folder (default bench-out)")
    p.add_argument("--configs", action="store_true",
                   help="time w4a16 with every named config (and 'auto', and cuBLAS fp16) instead of the peers")
    p.add_argument("--quick", action="store_true",
                   help=f"smoke test: preset {sh.QUICK_PRESET} and M = {','.join(map(str, sh.QUICK_M))} "
                        "unless given")
    p.add_argument("--seed", type=int, default=0, help="random data seed (default 0)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--fake-timer", action="store_true",
                   help="made-up times from a formula, on the CPU: tests the harness, measures nothing "
                        "(operands shrunk to at most M, N, K = 16, 256, 1024; every output is labelled "
                        "'FAKE TIMER')")
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    """Run the benchmark; exit code 0, 1 if any result was wrong, 2 on bad arguments or no GPU."""
    from . import plots, report, runner

    try:
        settings = Settings.from_args(args)
    except W4A16Error as e:
        print(f"w4a16 bench: {e}", file=sys.stderr)
        return EXIT_USAGE
    if settings.fake_timer:
        device = torch.device("cpu")
    elif torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        print("w4a16 bench: no CUDA device (torch.cuda.is_available() is False); the benchmark needs an "
              "NVIDIA GPU. (--fake-timer runs the harness on the CPU with made-up times, for tests.)",
              file=sys.stderr)
        return EXIT_USAGE
    result = runner.run_bench(settings, device, progress=not args.no_progress)
    text = report.markdown(result)
    print(text, end="")
    paths = report.write_all(result, settings.out, text)
    pngs, message = plots.plot_all(result, settings.out)
    if message:
        print(message, file=sys.stderr)
    print("wrote " + ", ".join(paths + pngs), file=sys.stderr)
    wrong = result.wrong()
    if wrong:
        print(f"w4a16 bench: {len(wrong)} result rows were WRONG (see the notes)", file=sys.stderr)
        return EXIT_WRONG
    return EXIT_OK


def main(argv=None) -> int:
    """``python -m w4a16.bench.cli ...``: the sub-command on its own."""
    parser = argparse.ArgumentParser(prog="w4a16")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
