"""``w4a16 tune``: tune this GPU for your shapes and keep the result; merge tuning files.

    w4a16 tune --layers 8b.qkv 8b.o --ms 1 16 256 1024          # preset layers (w4a16 bench --help)
    w4a16 tune --shape 5120,3584 --shape 3584,18944 --backend gluon --out tuned.json
    w4a16 tune --merge tuned.json                                # into your cache (default)
    w4a16 tune --merge tuned.json --into src/w4a16/data/tuned.json   # into the shipped table
    w4a16 tune --from-sweep gluon_decode_session.log --out tuned_sweep.json

Tuning times every candidate config of each kernel backend (:func:`w4a16.tune`) and writes the
winners to ``--out`` (default: the user's cache, ``$W4A16_CACHE`` or ``~/.cache/w4a16/tuned.json``),
which ``gemm(config="auto")`` reads on a GPU of the same name before the shipped table.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path


def add_parser(subparsers) -> argparse.ArgumentParser:
    from .bench.shapes import preset_layers

    p = subparsers.add_parser("tune", help="tune configs on this GPU and keep the winners; merge tuning files",
                              description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    what = p.add_mutually_exclusive_group()
    what.add_argument("--layers", nargs="+", choices=list(preset_layers(cli=True)), metavar="LAYER",
                      help=f"preset layers to tune ({', '.join(preset_layers(cli=True))})")
    what.add_argument("--shape", action="append", metavar="N,K", help="a weight shape to tune, repeatable")
    what.add_argument("--merge", nargs="+", metavar="FILE", help="tuning files to merge into --into")
    what.add_argument("--from-sweep", metavar="LOG", help="a decode sweep log to turn into entries in --out")
    p.add_argument("--ms", type=int, nargs="+", default=[1, 16, 64, 256, 1024, 4096], help="values of M to tune")
    p.add_argument("--dtype", choices=["fp16", "bf16"], default="fp16")
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--zeros", action="store_true", help="weights with zero points")
    p.add_argument("--backend", action="append", default=None, help="backend to tune, repeatable (default: all)")
    p.add_argument("--budget", type=float, default=0.0,
                   help="seconds; no new shape is started after it (default 0: no limit)")
    p.add_argument("--out", default=None, help="tuning file written (default: the user's cache)")
    p.add_argument("--into", default=None, help="tuning file --merge writes (default: the user's cache)")
    return p


def _shapes(args) -> list:
    """[(label, (N, K))] named by --layers or --shape (W4A16Error for a malformed --shape)."""
    from .bench.shapes import preset_layers
    from .errors import expect

    if args.layers:
        layers = preset_layers(cli=True)
        return [(name, layers[name]) for name in args.layers]
    out = []
    for s in args.shape or []:
        parts = s.split(",")
        ok = len(parts) == 2 and all(v.strip().isdigit() and int(v) > 0 for v in parts)
        expect(ok, "--shape", "N,K with two positive integers", s)
        out.append((s, (int(parts[0]), int(parts[1]))))
    return out


def run(args) -> int:
    import torch

    from . import tuning_cache
    from .errors import expect

    if args.merge:
        into = Path(args.into) if args.into else tuning_cache.cache_path()
        merged, new, total = tuning_cache.merge(args.merge, into)
        print(f"{merged} entries merged ({new} new, {merged - new} replaced): {total} in {into}")
        return 0
    out = Path(args.out) if args.out else tuning_cache.cache_path()
    if args.from_sweep:
        from .tuning_sweep import entries_from_sweep

        rows = entries_from_sweep(Path(args.from_sweep), out)
        for r in rows:
            print(f"{r.layer:12s} M={r.M:4d} {r.config.short():18s} {r.time_us:8.1f} us")
        print(f"{len(rows)} entries -> {out}")
        return 0
    shapes = _shapes(args)
    expect(bool(shapes), "tune", "--layers, --shape, --merge or --from-sweep", "none of them")
    expect(torch.cuda.is_available(), "device", "a CUDA GPU for tuning", "none")
    from .tune import tune

    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    t0 = time.time()
    for label, (N, K) in shapes:
        if args.budget and time.time() - t0 > args.budget:
            print(f"budget of {args.budget:.0f} s reached before {label}", flush=True)
            break
        t = time.time()
        tune([(N, K)], ms=args.ms, dtype=dtype, group_size=args.group_size, zeros=args.zeros,
             backends=args.backend, progress=False, path=out,
             print_fn=lambda s, n=label: print(f"{n}: {s}", flush=True))
        print(f"{label} tuned in {time.time() - t:.0f} s", flush=True)
    print(f"done in {time.time() - t0:.0f} s; winners in {out}", flush=True)
    return 0
