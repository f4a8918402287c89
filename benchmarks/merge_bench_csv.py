"""Join the bench.csv files of several ``w4a16 bench`` runs of one session (e.g. one per preset, to
keep each GPU call short) into one CSV, and draw its speedup and roofline plots.

    python3 benchmarks/merge_bench_csv.py OUT/llama3-70b/bench.csv OUT/llama3-8b/bench.csv \\
        --out docs/bench/bench_fp16_h200.csv --plots docs/bench --suffix _fp16

The header comments of the first file are kept (its settings line names only its own preset);
a line lists the joined files.
"""
from __future__ import annotations

import argparse
import csv
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

NUMERIC = ("M", "N", "K", "speedup_vs_fp16", "frac_floor", "median_us")


def read(path: str) -> tuple:
    """(comment lines, rows as dicts) of one bench.csv."""
    with open(path) as f:
        lines = f.read().splitlines()
    comments = [ln for ln in lines if ln.startswith("#")]
    rows = list(csv.DictReader([ln for ln in lines if not ln.startswith("#")]))
    return comments, rows


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("csvs", nargs="+")
    p.add_argument("--out", required=True)
    p.add_argument("--plots", help="folder for speedup{suffix}.png and roofline{suffix}.png")
    p.add_argument("--suffix", default="")
    a = p.parse_args()
    comments, rows = read(a.csvs[0])
    for path in a.csvs[1:]:
        rows += read(path)[1]
    with open(a.out, "w", newline="") as f:
        f.write("\n".join(comments) + "\n")
        f.write(f"# joined: {', '.join(os.path.basename(os.path.dirname(c)) or c for c in a.csvs)}\n")
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print(f"{len(rows)} rows -> {a.out}")
    if a.plots:
        from w4a16.bench.plots import plot_all
        from w4a16.bench.runner import BenchResult
        for r in rows:
            for k in NUMERIC:
                r[k] = float(r[k]) if r.get(k) not in (None, "") else None
            r["M"] = int(r["M"])
        paths, msg = plot_all(BenchResult(header={}, rows=rows), a.plots)
        for src in paths:
            stem, ext = os.path.splitext(src)
            os.replace(src, stem + a.suffix + ext)
            print(f"wrote {stem + a.suffix + ext}")
        if msg:
            print(msg)


if __name__ == "__main__":
    main()
