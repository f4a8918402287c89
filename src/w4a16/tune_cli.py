"""``w4a16 tune``: tune this GPU for your shapes and keep the result; merge tuning files.

    w4a16 tune --layers 8b.qkv 8b.o --ms 1 16 256 1024          # preset layers (w4a16 bench --help)
    w4a16 tune --shape 5120,3584 --shape 3584,18944 --backend gluon --out tuned.json
    w4a16 tune --merge tuned.json                                # into your cache (default)
    w4a16 tune --merge tuned.json --into src/w4a16/data/tuned.json   # into the shipped table
    w4a16 tune --from-sweep gluon_decode_session.log --sms 132 --out tuned_sweep.json
    w4a16 tune --family qwen2.5-7b --ms 256 1024 --backend gluon --cublas --csv sweep.csv

Tuning times every candidate config of each kernel backend (:func:`w4a16.tune`) and writes the
winners to ``--out`` (default: the user's cache, ``$W4A16_CACHE`` or ``~/.cache/w4a16/tuned.json``),
which ``gemm(config="auto")`` reads on a GPU of the same name and SM count before the shipped
table; a shape that was not tuned takes the winner of the nearest tuned one. ``--csv`` keeps
every candidate's time (and, with ``--cublas``, F.linear on the dequantized weight) for analysis.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path


def add_parser(subparsers) -> argparse.ArgumentParser:
    from .bench.shapes import FAMILIES, PRESETS, preset_layers

    p = subparsers.add_parser("tune", help="tune configs on this GPU and keep the winners; merge tuning files",
                              description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    what = p.add_mutually_exclusive_group()
    what.add_argument("--layers", nargs="+", choices=list(preset_layers(cli=True, families=True)), metavar="LAYER",
                      help=f"preset layers to tune ({', '.join(preset_layers(cli=True))}; and the "
                           f"families' layers, e.g. qwen7b.qkv)")
    what.add_argument("--family", nargs="+", choices=list(PRESETS) + list(FAMILIES), metavar="FAMILY",
                      help=f"every layer of these model families ({', '.join(list(PRESETS) + list(FAMILIES))})")
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
    p.add_argument("--csv", default=None, help="also write every candidate's time to this CSV file")
    p.add_argument("--cublas", action="store_true",
                   help="also time F.linear on the dequantized weight (a 'cublas' row in --csv)")
    p.add_argument("--sms", type=int, default=None,
                   help="with --from-sweep (required there): SM count of the card the log came from "
                        "(132 for an H100 or H200 SXM, 114 for an H100 PCIe)")
    p.add_argument("--into", default=None, help="tuning file --merge writes (default: the user's cache)")
    return p


def _shapes(args) -> list:
    """[(label, (N, K))] named by --layers or --shape (W4A16Error for a malformed --shape)."""
    from .bench.shapes import preset_layers
    from .errors import expect

    if args.layers:
        layers = preset_layers(cli=True, families=True)
        return [(name, layers[name]) for name in args.layers]
    if args.family:
        from .bench.shapes import FAMILIES, PRESETS

        return [(s.label, (s.N, s.K)) for f in args.family for s in {**PRESETS, **FAMILIES}[f]]
    out = []
    for s in args.shape or []:
        parts = s.split(",")
        ok = len(parts) == 2 and all(v.strip().isdigit() and int(v) > 0 for v in parts)
        expect(ok, "--shape", "N,K with two positive integers", s)
        out.append((s, (int(parts[0]), int(parts[1]))))
    return out


CSV_FIELDS = ("card", "layer", "N", "K", "M", "dtype", "group_size", "zeros", "backend", "config", "time_us",
              "rel_err", "best")


def write_csv(path: Path, label: str, args, rows) -> None:
    """Append ``rows`` (TuneResults of layer ``label``) to the CSV ``path`` (header when new)."""
    import csv

    import torch

    from .backends import registry
    from .backends.device import card_id

    card = card_id(torch.cuda.current_device())
    new = not path.exists()
    with open(path, "a", newline="") as f:
        w = csv.writer(f)
        if new:
            w.writerow(CSV_FIELDS)
        for r in rows:
            cfg = "" if r.config is None else registry()[r.backend].config_key(r.config)
            w.writerow([card, label, r.N, r.K, r.M, args.dtype, args.group_size, int(args.zeros), r.backend, cfg,
                        f"{r.time_us:.3f}", f"{r.rel_err:.3g}", int(r.best)])


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

        expect(args.sms is not None, "--sms", "the SM count of the card the sweep log came from (the log "
               "names the GPU, not its SM count)", "none")
        rows = entries_from_sweep(Path(args.from_sweep), out, args.sms)
        for r in rows:
            print(f"{r.layer:12s} M={r.M:4d} {r.config.short():18s} {r.time_us:8.1f} us")
        print(f"{len(rows)} entries -> {out}")
        return 0
    shapes = _shapes(args)
    expect(bool(shapes), "tune", "--layers, --family, --shape, --merge or --from-sweep", "none of them")
    expect(torch.cuda.is_available(), "device", "a CUDA GPU for tuning", "none")
    from .tune import tune

    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    t0 = time.time()
    for label, (N, K) in shapes:
        if args.budget and time.time() - t0 > args.budget:
            print(f"budget of {args.budget:.0f} s reached before {label}", flush=True)
            break
        t = time.time()
        rows = tune([(N, K)], ms=args.ms, dtype=dtype, group_size=args.group_size, zeros=args.zeros,
                    backends=args.backend, progress=False, path=out, cublas=args.cublas,
                    print_fn=lambda s, n=label: print(f"{n}: {s}", flush=True))
        if args.csv:
            write_csv(Path(args.csv), label, args, rows)
        print(f"{label} tuned in {time.time() - t:.0f} s", flush=True)
    print(f"done in {time.time() - t0:.0f} s; winners in {out}", flush=True)
    return 0
