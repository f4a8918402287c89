"""scripts/tuned_from_sweep.py: a decode sweep log becomes tuning entries that name the fastest
config of each (layer, M) line, keyed as w4a16.tune keys them; and config names round-trip."""
import importlib.util
import json
import sys
from pathlib import Path

import pytest

from w4a16.backends import registry
from w4a16.backends.gluon.decode.config import GluonDecodeConfig, candidates
from w4a16.errors import W4A16Error

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "tuned_from_sweep.py"
LOG = """env: NVIDIA H200 torch 2.11.0+cu130 triton 3.6.0 python 3.12.3 2026-12-01 03:10:00
== sweep: us per call (fraction of copy bandwidth)
8B o         M=  1 g8x64c2s4ws 5.6 (0.37)  g8x64c4s3ws 5.5 (0.36)  g8x64c2s4np 6.1 (0.33)
70B gate_up  M= 16 g16x64c2s4wssk 66.1 (0.86)  g16x64c2s4wsskfo 69.0 (0.80)
done; correctness failures: 0
"""


def _script():
    spec = importlib.util.spec_from_file_location("tuned_from_sweep", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_config_names_round_trip():
    for M in (1, 16, 64):
        for g in (32, 128):
            for c in candidates(M, 57344, 8192, g, 132) + candidates(M, 4096, 4096, g, 132):
                assert GluonDecodeConfig.from_short(c.short()) == c
    with pytest.raises(W4A16Error, match="config name"):
        GluonDecodeConfig.from_short("p128x64x2c1s4pp")


def test_winners_become_tuning_entries(tmp_path, monkeypatch):
    mod = _script()
    rows = mod.winners(LOG)
    assert [(layer, M, c.short(), t) for layer, M, c, t in rows] == [
        ("8B o", 1, "g8x64c4s3ws", 5.5), ("70B gate_up", 16, "g16x64c2s4wssk", 66.1)]
    log, out = tmp_path / "sweep.log", tmp_path / "tuned.json"
    log.write_text(LOG)
    monkeypatch.setattr(sys, "argv", ["tuned_from_sweep.py", str(log), "--out", str(out)])
    mod.main()
    entries = json.loads(out.read_text())["entries"]
    v = registry()["gluon"].layout_version
    assert set(entries) == {f"gluon|{v}|NVIDIA H200|1|4096|4096|128|fp16", f"gluon|{v}|NVIDIA H200|16|57344|8192|128|fp16"}
    e = entries[f"gluon|{v}|NVIDIA H200|16|57344|8192|128|fp16"]
    assert e["time_us"] == 66.1 and GluonDecodeConfig(**json.loads(e["config"])).short() == "g16x64c2s4wssk"
