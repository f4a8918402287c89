"""Merge the entries of a tuning file written by ``w4a16.tune`` (e.g. $OUT/tuned.json of a GPU
session) into the shipped table src/w4a16/data/tuned.json; an entry of the same key is replaced.

    python3 scripts/merge_tuned.py OUT/tuned.json [--into src/w4a16/data/tuned.json]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

SHIPPED = Path(__file__).resolve().parents[1] / "src" / "w4a16" / "data" / "tuned.json"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("source")
    p.add_argument("--into", default=str(SHIPPED))
    a = p.parse_args()
    src, dst = json.loads(Path(a.source).read_text()), json.loads(Path(a.into).read_text())
    if src.get("format") != dst.get("format"):
        raise SystemExit(f"format {src.get('format')} of {a.source} differs from {dst.get('format')} of {a.into}")
    new = sum(k not in dst["entries"] for k in src["entries"])
    dst["entries"].update(src["entries"])
    dst["entries"] = dict(sorted(dst["entries"].items()))
    Path(a.into).write_text(json.dumps(dst, indent=1, sort_keys=True) + "\n")
    print(f"{len(src['entries'])} entries merged ({new} new, {len(src['entries']) - new} replaced): "
          f"{len(dst['entries'])} in {a.into}")


if __name__ == "__main__":
    main()
