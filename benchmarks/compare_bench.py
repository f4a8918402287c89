"""Two ``w4a16 bench`` runs side by side (e.g. the same card on two Tritons): per layer and M, the
w4a16 time of each, their ratio, and each one's speedup over cuBLAS fp16 of its own run.

    python benchmarks/compare_bench.py BASE/bench.csv NEW/bench.csv [--peer w4a16]
"""
from __future__ import annotations

import argparse
import csv
import math
import sys


def read(path: str) -> tuple:
    """(header dict from the '# key: value' lines, rows as dicts)."""
    header, lines = {}, []
    with open(path) as f:
        for line in f:
            if line.startswith("#"):
                key, _, value = line[1:].partition(":")
                header[key.strip()] = value.strip()
            else:
                lines.append(line)
    return header, list(csv.DictReader(lines))


def times(rows: list, peer: str) -> dict:
    """{(layer, M, dtype): median us} of ``peer``'s rows that ran ok."""
    return {(r["layer"], int(r["M"]), r["dtype"]): float(r["median_us"]) for r in rows
            if r["peer"] == peer and r["status"] == "ok" and r["median_us"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("base")
    p.add_argument("new")
    p.add_argument("--peer", default="w4a16")
    a = p.parse_args(argv)
    (hb, rb), (hn, rn) = read(a.base), read(a.new)
    tb, tn = times(rb, a.peer), times(rn, a.peer)
    cb, cn = times(rb, "cublas-fp16"), times(rn, "cublas-fp16")
    print(f"base: {hb.get('card')} torch {hb.get('torch')} triton {hb.get('triton')}")
    print(f"new:  {hn.get('card')} torch {hn.get('torch')} triton {hn.get('triton')}")
    print("| layer | M | dtype | base us | new us | new/base | base x cuBLAS | new x cuBLAS |")
    print("| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |")
    logs = []
    for key in sorted(tb, key=lambda k: (k[2], k[1], k[0])):
        if key not in tn:
            print(f"| {key[0]} | {key[1]} | {key[2]} | {tb[key]:.2f} | - | - | - | - |")
            continue
        r = tn[key] / tb[key]
        logs.append(math.log(r))
        sb = f"{cb[key] / tb[key]:.2f}" if key in cb else "-"
        sn = f"{cn[key] / tn[key]:.2f}" if key in cn else "-"
        print(f"| {key[0]} | {key[1]} | {key[2]} | {tb[key]:.2f} | {tn[key]:.2f} | {r:.3f} | {sb} | {sn} |")
    if logs:
        worst = max(math.exp(v) for v in logs)
        print(f"geomean new/base {math.exp(sum(logs) / len(logs)):.3f} over {len(logs)} points, worst {worst:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
