"""``w4a16 build-lib``: build the C library (see :mod:`w4a16.capi.build`)."""
from __future__ import annotations

import argparse


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "build-lib", help="build libw4a16_sm90_kernel.so, its header and test_w4a16_sm90 (no GPU needed)",
        description="Compile the GEMM kernels ahead of time for sm_90a and build the C library "
                    "(libw4a16_sm90_kernel.so, w4a16_sm90_kernel.h, test_w4a16_sm90, a Makefile) into --out.")
    p.add_argument("--out", required=True, help="output directory (created if needed)")
    p.add_argument("--jobs", type=int, default=None, help="kernel compile processes (default: CPU count, at most 8)")
    p.add_argument("--cuda-include", default=None,
                   help="directory holding cuda.h (default: $CUDA_HOME/include, /usr/local/cuda/include, "
                        "then the Triton wheel's copy)")
    p.add_argument("--cc", default="gcc", help="C compiler (default: gcc)")
    p.add_argument("--no-test-program", action="store_true", help="do not build test_w4a16_sm90")
    return p


def run(args) -> int:
    from .build import build_lib

    r = build_lib(args.out, jobs=args.jobs, cuda_include=args.cuda_include, cc=args.cc,
                  test_program=not args.no_test_program, log=print)
    print(f"built {r.library} ({r.library.stat().st_size / 2**20:.1f} MiB, {r.kernels} kernels) in {r.seconds:.0f} s")
    print(f"header: {r.header}")
    if r.test_program:
        print(f"test program: {r.test_program} (run it on an sm_90 GPU)")
    if r.missing:
        print(f"left out (run-time fallback to the 128x128 tile kernel): {', '.join(r.missing)}")
    return 0


def main(argv=None) -> int:
    """``python -m w4a16.capi.cli --out DIR``: the sub-command on its own."""
    parser = argparse.ArgumentParser(prog="w4a16")
    sub = parser.add_subparsers(dest="command", required=True)
    add_parser(sub)
    args = parser.parse_args(["build-lib", *(argv if argv is not None else __import__("sys").argv[1:])])
    return run(args)


if __name__ == "__main__":
    raise SystemExit(main())
