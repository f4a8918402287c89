"""Tune one backend's configs for the Llama 8B / 70B layers on this GPU (w4a16.tune), one layer at
a time within a time budget, into $OUT/tuned.json (merge the winners into the shipped table with
``scripts/merge_tuned.py``).

    PYTHONPATH=src python3 scripts/tune_session.py --out $OUT --backend gluon --ms 128 256 1024 2048 4096
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

from w4a16.bench.shapes import preset_layers  # noqa: E402

LAYERS = preset_layers(cli=True)   # "8b.qkv": (N, K), ... (w4a16.bench.shapes.PRESETS)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=os.environ.get("OUT", "out"))
    p.add_argument("--backend", nargs="+", default=["gluon"])
    p.add_argument("--ms", type=int, nargs="+", default=[128, 256, 1024, 2048, 4096])
    p.add_argument("--layers", nargs="+", default=list(LAYERS), choices=list(LAYERS))
    p.add_argument("--budget", type=float, default=480.0, help="seconds; no new layer is started after it")
    a = p.parse_args()
    os.makedirs(a.out, exist_ok=True)
    os.environ["W4A16_CACHE"] = os.path.join(a.out, "tuned.json")
    import w4a16
    t0 = time.time()
    for name in a.layers:
        if time.time() - t0 > a.budget:
            print(f"budget of {a.budget:.0f} s reached before {name}", flush=True)
            break
        t = time.time()
        w4a16.tune([LAYERS[name]], ms=a.ms, backends=a.backend, progress=False,
                   print_fn=lambda s, n=name: print(f"{n}: {s}", flush=True))
        print(f"{name} tuned in {time.time() - t:.0f} s", flush=True)
    print(f"done in {time.time() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
