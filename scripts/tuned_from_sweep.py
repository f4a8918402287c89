"""Turn the per-shape sweep of ``scripts/gluon_decode_session.py --sweep`` into a tuning file: for
each (layer, M) line the fastest Gluon decode config and its time, keyed as ``w4a16.tune`` keys
them (fp16, g = 128, the GPU named in the log's env line). Merge it into the shipped table with
``scripts/merge_tuned.py``.

    python3 scripts/tuned_from_sweep.py OUT/gluon_decode_session.log --out OUT/tuned_sweep.json
"""
from __future__ import annotations

import argparse
import os
import re
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

from w4a16 import tuning_cache  # noqa: E402
from w4a16.backends import registry  # noqa: E402
from w4a16.backends.gluon.decode.config import GluonDecodeConfig  # noqa: E402
from w4a16.bench.shapes import preset_layers  # noqa: E402

LINE = re.compile(r"^(?P<layer>\d+B \w+)\s+M=\s*(?P<M>\d+)\s+(?P<rest>.*)$")
ENTRY = re.compile(r"(g\S+) ([\d.]+) \(")


def winners(text: str) -> list:
    """[(layer, M, config, time_us)]: the fastest config of every sweep line of the log."""
    out = []
    for ln in text.splitlines():
        m = LINE.match(ln)
        if m:
            timed = [(float(t), c) for c, t in ENTRY.findall(m["rest"])]
            if timed:
                t, c = min(timed)
                out.append((m["layer"], int(m["M"]), GluonDecodeConfig.from_short(c), t))
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("log")
    p.add_argument("--out", required=True)
    a = p.parse_args()
    text = open(a.log).read()
    env = re.search(r"^env: (.*?) torch ", text, re.M)
    if env is None:
        raise SystemExit(f"{a.log}: no 'env: <GPU> torch ...' line")
    gpu, layers = env.group(1), preset_layers()
    backend = registry()["gluon"]
    rows = winners(text)
    for layer, M, cfg, t in rows:
        N, K = layers[layer]
        tuning_cache.store(backend, backend.layout_version, gpu, M, N, K, 128, torch.float16, cfg, t, path=a.out)
        print(f"{layer:12s} M={M:3d} {cfg.short():18s} {t:7.1f} us")
    print(f"{len(rows)} entries for {gpu} -> {a.out}")


if __name__ == "__main__":
    main()
