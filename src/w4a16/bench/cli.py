"""The ``bench`` sub-command: ``add_parser(subparsers)`` registers it, ``run(args)`` runs it.

    w4a16 bench                                   # both Llama-3 presets, all peers, graph timing
    w4a16 bench --quick                           # smoke test: 8B layers, M = 1, 16, 1024
    w4a16 bench --shape 4096,4096 --m 1,16 --dtype bf16 --timing both --out out/
    w4a16 bench --preset llama3-70b --configs     # every named config, to check the heuristic
    w4a16 bench --moe qwen3-30b-a3b,mixtral-8x7b --m 1,16,256   # whole MoE layers (w4a16.bench.moe)
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
    p.add_argument("--moe", metavar="PRESETS", default=None,
                   help="time whole mixture-of-experts layers instead: 'all' or a comma list of "
                        "qwen3-30b-a3b, qwen3-235b-a22b, mixtral-8x7b, deepseek-v3 (--m gives the token "
                        "counts; peers w4a16, torch, w4a16-loop, and w4a16-triton and w4a16-gluon when named; writes moe.md, "
                        "moe.csv, moe.json)")
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

    moe_run = bool(getattr(args, "moe", None))
    try:
        settings = _moe_settings(args) if moe_run else Settings.from_args(args)
    except W4A16Error as e:
        print(f"w4a16 bench: {e}", file=sys.stderr)
        return EXIT_USAGE
    device = _device_or_none(args.fake_timer)
    if device is None:
        return EXIT_USAGE
    if moe_run:
        return _run_moe(settings, device, args)
    result = runner.run_bench(settings, device, progress=not args.no_progress)
    text = report.markdown(result)
    print(text, end="")
    paths = report.write_all(result, settings.out, text)
    pngs, message = plots.plot_all(result, settings.out)
    if message:
        print(message, file=sys.stderr)
    return _finish(paths + pngs, len(result.wrong()))


def _finish(paths, wrong: int) -> int:
    """Name the files written; exit code EXIT_WRONG if ``wrong`` rows were wrong, else EXIT_OK."""
    print("wrote " + ", ".join(paths), file=sys.stderr)
    if wrong:
        print(f"w4a16 bench: {wrong} result rows were WRONG (see the notes)", file=sys.stderr)
        return EXIT_WRONG
    return EXIT_OK


def _device_or_none(fake: bool):
    if fake:
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    print("w4a16 bench: no CUDA device (torch.cuda.is_available() is False); the benchmark needs an "
          "NVIDIA GPU. (--fake-timer runs the harness on the CPU with made-up times, for tests.)", file=sys.stderr)
    return None


def _moe_settings(args) -> dict:
    """``--moe``'s settings: presets, token counts, one dtype and group size, peers (W4A16Error on a bad one)."""
    from . import moe

    given = args.peers != ",".join(PEER_NAMES)
    peers = tuple(p.strip() for p in args.peers.split(",") if p.strip()) if given else moe.DEFAULT_PEERS
    if not peers or any(p not in moe.PEERS for p in peers):
        raise W4A16Error(f"--peers: expected names from {moe.PEERS} with --moe, got {args.peers!r}")
    return dict(presets=moe.parse_presets(args.moe), tokens=sh.parse_m(args.m) if args.m else moe.DEFAULT_T,
                dtype=sh.parse_dtypes(args.dtype)[0], group_size=sh.parse_group_sizes(args.group_size)[0],
                peers=peers)


def _run_moe(settings: dict, device, args) -> int:
    """``--moe``: whole MoE layers (:mod:`w4a16.bench.moe`)."""
    from . import moe, plots

    result = moe.run_moe(device=device, fake=args.fake_timer, seed=args.seed, progress=not args.no_progress,
                         **settings)
    text = moe.markdown(result)
    print(text, end="")
    pngs, message = plots.plot_moe(result.rows, result.header.get("card", ""), result.header["settings"], args.out)
    if message:
        print(message, file=sys.stderr)
    return _finish(moe.write_all(result, args.out, text) + pngs, len(result.wrong()))


def main(argv=None) -> int:
    """``python -m w4a16.bench.cli ...``: the sub-command on its own."""
    parser = argparse.ArgumentParser(prog="w4a16")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
