"""How a tuned choice holds on shapes it was not tuned on, from the CSVs of `w4a16 tune --csv --cublas`
(benchmarks/card_sweep.sh): per card, the sweep's winners of the fit families become a tuning
file; each problem of the held-out families is then answered as ``backend="auto"`` would answer
it with only that file (``w4a16.tuning_cache.lookup``: the nearest tuned shape's winner) and as the
heuristic would, and both are read off the sweep's own timings of those configs.

    python3 benchmarks/heldout_report.py sweep.csv --held Qwen7B [--table] [--cv] [--out heldout.md]

Ratios are cuBLAS time / Gluon time of the same run (> 1: faster than cuBLAS). "tuned" is the
sweep's best config for the shape itself (what tuning that shape gives); the gap columns divide a
held-out ratio by the geomean ratio of the fit shapes at the same M (the issue's "within 10% of the
tuned shapes' ratios" is a gap >= 0.90).
"""
from __future__ import annotations

import argparse
import csv
import math
import tempfile
from collections import defaultdict
from pathlib import Path

import torch

from w4a16 import tuning_cache
from w4a16.backends import registry
from w4a16.backends.base import Problem

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def read(paths) -> dict:
    """{(card, layer, N, K, M, dtype, group): {"cublas": us, config_key: us, ...}} from sweep CSVs."""
    out: dict = defaultdict(dict)
    for path in paths:
        with open(path, newline="") as f:
            for r in csv.DictReader(f):
                k = (r["card"], r["layer"], int(r["N"]), int(r["K"]), int(r["M"]), r["dtype"], int(r["group_size"]))
                t = float(r["time_us"])
                out[k]["cublas" if r["backend"] == "cublas" else r["config"]] = t
    return out


def family(layer: str) -> str:
    """The model label of a layer as the CSV names it: "qwen7b" for "qwen7b.qkv" or "Qwen7B qkv"."""
    return layer.replace(".", " ").split()[0].lower()


def geomean(xs) -> float:
    xs = [x for x in xs if x > 0 and math.isfinite(x)]
    return math.exp(sum(map(math.log, xs)) / len(xs)) if xs else float("nan")


def fit_file(problems: dict, fit, backend, directory: Path) -> Path:
    """A tuning file of the winners of the fit layers' problems."""
    rows = []
    for (card, layer, N, K, M, dt, g), times in problems.items():
        cfgs = {c: t for c, t in times.items() if c != "cublas" and math.isfinite(t)}
        if family(layer) in fit and cfgs:
            best = min(cfgs, key=cfgs.get)
            rows.append((backend, backend.layout_version, card, M, N, K, g, DTYPES[dt],
                         backend.config_from_key(best), cfgs[best]))
    path = directory / "fit.json"
    tuning_cache.store_all(rows, path)
    return path


def report(problems: dict, held, backend) -> list:
    """Markdown lines: per card and held-out problem, the ratios of the tuned, nearest-lent and
    heuristic configs, and per M the gap against the fit shapes."""
    held = {h.lower() for h in held}
    fit = sorted({family(k[1]) for k in problems} - held)
    lines = [f"Fit families: {', '.join(fit)}; held out: {', '.join(sorted(held))}.", ""]
    with tempfile.TemporaryDirectory() as d:
        path = fit_file(problems, fit, backend, Path(d))
        for card in sorted({k[0] for k in problems}):
            lines += [f"### {card}", "", "| layer | M | cuBLAS us | tuned | lent (from) | heuristic |",
                      "|---|---:|---:|---:|---|---:|"]
            fit_ratio, held_rows = defaultdict(list), defaultdict(list)
            for (c, layer, N, K, M, dt, g), times in sorted(problems.items(), key=lambda kv: (kv[0][4], kv[0][1])):
                if c != card or "cublas" not in times:
                    continue
                cfgs = {k: t for k, t in times.items() if k != "cublas" and math.isfinite(t)}
                if not cfgs:
                    continue
                tuned = times["cublas"] / min(cfgs.values())
                if family(layer) not in held:
                    fit_ratio[M].append(tuned)
                    continue
                p = Problem(M, N, K, g, DTYPES[dt], False, torch.device("cpu"))
                hit = tuning_cache.lookup(backend, backend.layout_version, card, p, paths=[path])
                heur = times.get(backend.config_key(backend.default_config(p)))
                lent = times.get(backend.config_key(hit.config)) if hit else heur   # no neighbour: the heuristic
                r_lent = times["cublas"] / lent if lent else float("nan")   # nan: the lent config was not timed here
                r_heur = times["cublas"] / heur if heur else float("nan")
                held_rows[M].append((tuned, r_lent, r_heur))
                src = f"{hit.shape[0]}x{hit.shape[1]}" if hit else "heuristic"
                lines.append(f"| {layer} | {M} | {times['cublas']:.1f} | {tuned:.2f} | {r_lent:.2f} ({src}) | {r_heur:.2f} |")
            lines += ["", "| M | fit shapes' ratio (geomean, tuned) | held-out tuned | held-out lent | gap lent | held-out heuristic | gap heuristic |",
                      "|---:|---:|---:|---:|---:|---:|---:|"]
            for M in sorted(held_rows):
                f = geomean(fit_ratio[M])
                t, lent, heur = (geomean(col) for col in zip(*held_rows[M]))
                lines.append(f"| {M} | {f:.2f} | {t:.2f} | {lent:.2f} | {lent / f:.2f} | {heur:.2f} | {heur / f:.2f} |")
            lines.append("")
    return lines


def card_table(problems: dict) -> list:
    """Markdown lines: per card, each layer's best Gluon time and its ratio to cuBLAS at every M."""
    lines = []
    for card in sorted({k[0] for k in problems}):
        rows = {k: t for k, t in problems.items() if k[0] == card and "cublas" in t}
        Ms = sorted({k[4] for k in rows})
        lines += [f"### {card}: best tuned Gluon config, cuBLAS time / Gluon time (us in brackets)", "",
                  "| layer | N x K | " + " | ".join(f"M={M}" for M in Ms) + " |", "|---|---|" + "---:|" * len(Ms)]
        layers = dict.fromkeys((k[1], k[2], k[3]) for k in rows)
        for layer, N, K in layers:
            cells = []
            for M in Ms:
                t = next((v for k, v in rows.items() if (k[1], k[4]) == (layer, M)), None)
                best = min((x for c, x in t.items() if c != "cublas" and math.isfinite(x)), default=None) if t else None
                cells.append(f"{t['cublas'] / best:.2f} ({best:.1f})" if best else "")
            lines.append(f"| {layer} | {N}x{K} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def _efficiency(problems: dict, card: str, held: str, pick) -> dict:
    """{M: geomean of best time / picked time} over ``held``'s problems on ``card``; ``pick(key, times)``
    returns a config key or None (then the heuristic's)."""
    out: dict = defaultdict(list)
    for key, times in problems.items():
        if key[0] != card or family(key[1]) != held:
            continue
        cfgs = {c: t for c, t in times.items() if c != "cublas" and math.isfinite(t)}
        chosen = pick(key, cfgs)
        if cfgs and chosen in cfgs:
            out[key[4]].append(min(cfgs.values()) / cfgs[chosen])
    return out


def cross_validation(problems: dict, backend) -> list:
    """Markdown lines: every family held out in turn, the choice rules' efficiency per M (geomean of
    best / chosen time over all held-out problems): the heuristic, the nearest tuned shape's winner
    (``tuning_cache.lookup``), and the config best on average over the 3 nearest shapes (radius 1.5)."""
    lines = []
    for card in sorted({k[0] for k in problems}):
        fams = sorted({family(k[1]) for k in problems if k[0] == card})
        res = {name: defaultdict(list) for name in ("heuristic", "nearest", "3 nearest, averaged")}

        def heuristic(key, cfgs):
            _, _, N, K, M, dt, g = key
            return backend.config_key(backend.default_config(Problem(M, N, K, g, DTYPES[dt], False, torch.device("cpu"))))

        for held in fams:
            others = {k: t for k, t in problems.items() if k[0] == card and family(k[1]) != held}
            with tempfile.TemporaryDirectory() as d:
                path = fit_file(others, sorted(set(fams) - {held}), backend, Path(d))

                def nearest(key, cfgs):
                    _, _, N, K, M, dt, g = key
                    hit = tuning_cache.lookup(backend, backend.layout_version, card,
                                              Problem(M, N, K, g, DTYPES[dt], False, torch.device("cpu")), paths=[path])
                    return backend.config_key(hit.config) if hit else heuristic(key, cfgs)

                def averaged(key, cfgs):
                    _, _, N, K, M, dt, g = key
                    near = sorted((abs(math.log2(N / k[2])) + abs(math.log2(K / k[3])), i, t)
                                  for i, (k, t) in enumerate(others.items()) if k[4] == M)[:3]
                    near = [{c: x for c, x in t.items() if c != "cublas" and math.isfinite(x)} for dd, _, t in near
                            if dd <= 1.5]
                    scores = defaultdict(list)
                    for t in near:
                        for c, x in t.items():
                            scores[c].append(math.log(min(t.values()) / x))
                    best = [(sum(v) / len(v), c) for c, v in scores.items() if near and len(v) == len(near)]
                    return max(best)[1] if best else heuristic(key, cfgs)

                for name, rule in (("heuristic", heuristic), ("nearest", nearest), ("3 nearest, averaged", averaged)):
                    for M, v in _efficiency(problems, card, held, rule).items():
                        res[name][M] += v
        Ms = sorted({M for r in res.values() for M in r})
        lines += [f"### {card}: every family held out in turn, geomean of best / chosen time", "",
                  "| rule | " + " | ".join(f"M={M}" for M in Ms) + " |", "|---|" + "---:|" * len(Ms)]
        for name, r in res.items():
            lines.append(f"| {name} | " + " | ".join(f"{geomean(r[M]):.3f}" for M in Ms) + " |")
        lines.append("")
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("csv", nargs="+", help="sweep CSVs of w4a16 tune --csv --cublas")
    ap.add_argument("--held", nargs="+", required=True, help="model labels held out of the fit (e.g. Qwen7B)")
    ap.add_argument("--out", default=None, help="also write the markdown here")
    ap.add_argument("--table", action="store_true", help="also print each card's layer x M table of ratios")
    ap.add_argument("--cv", action="store_true", help="also hold every family out in turn and compare the choice rules")
    args = ap.parse_args()
    problems = read(args.csv)
    b = registry()["gluon"]
    text = "\n".join((card_table(problems) if args.table else []) + report(problems, args.held, b)
                     + (cross_validation(problems, b) if args.cv else []))
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
