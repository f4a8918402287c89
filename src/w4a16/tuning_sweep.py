"""Tuning entries from the log of a Gluon decode config sweep (``benchmarks/gluon_decode_session.py
--sweep``): for each (layer, M) line of the log, the fastest config and its time, keyed as
:func:`w4a16.tune` keys them (fp16, group size 128, the GPU named in the log's ``env:`` line with
the SM count given, since the log does not say it).

A sweep line reads ``70B gate_up  M= 16 g16x64c2s4wssk 66.1 (0.86)  g16x64c2s4wsskfo 69.0 (0.80)``:
a preset layer label, M, then config names each with microseconds per call.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import List, NamedTuple

LINE = re.compile(r"^(?P<layer>\d+B \w+)\s+M=\s*(?P<M>\d+)\s+(?P<rest>.*)$")
ENTRY = re.compile(r"(g\S+) ([\d.]+) \(")
ENV = re.compile(r"^env: (.*?) torch ", re.M)


class Winner(NamedTuple):
    """The fastest config of one sweep line: preset layer label, M, GluonDecodeConfig, microseconds."""

    layer: str
    M: int
    config: object
    time_us: float


def winners(text: str) -> List[Winner]:
    """The fastest config of every sweep line of a log's ``text``, in log order."""
    from .backends.gluon.decode.config import GluonDecodeConfig

    out = []
    for ln in text.splitlines():
        m = LINE.match(ln)
        if m:
            timed = [(float(t), c) for c, t in ENTRY.findall(m["rest"])]
            if timed:
                t, c = min(timed)
                out.append(Winner(m["layer"], int(m["M"]), GluonDecodeConfig.from_short(c), t))
    return out


def entries_from_sweep(log: Path, out: Path, sms: int) -> List[Winner]:
    """Store the winners of the sweep log ``log`` (run on a card of ``sms`` SMs) in the tuning file
    ``out``; returns them.

    W4A16Error when the log has no ``env: <GPU> torch ...`` line (the GPU the entries are for)
    or names a layer that is not a preset layer.
    """
    import torch

    from . import tuning_cache
    from .backends import registry
    from .bench.shapes import preset_layers
    from .errors import expect

    text = Path(log).read_text()
    env = ENV.search(text)
    expect(env is not None, "sweep log", "an 'env: <GPU> torch ...' line", f"none in {log}")
    expect(isinstance(sms, int) and sms > 0, "sms", "a positive SM count", sms)
    gpu, layers, backend = f"{env.group(1)}/{sms}", preset_layers(), registry()["gluon"]
    rows = winners(text)
    for r in rows:
        expect(r.layer in layers, f"layer of {log}", f"one of {tuple(layers)}", r.layer)
    tuning_cache.store_all([(backend, backend.layout_version, gpu, r.M, *layers[r.layer], 128, torch.float16,
                             r.config, r.time_us) for r in rows], out)
    return rows
