"""``w4a16 tune``: --from-sweep turns a decode sweep log into tuning entries that name the fastest
config of each (layer, M) line, keyed as w4a16.tune keys them; --merge merges tuning files; bad
input is refused by name; decode config names round-trip."""
import json

import pytest

from w4a16 import tuning_cache
from w4a16.cli import main

from w4a16.backends import registry
from w4a16.backends.gluon.decode.config import GluonDecodeConfig, candidates
from w4a16.errors import W4A16Error

LOG = """env: NVIDIA H200 torch 2.11.0+cu130 triton 3.6.0 python 3.12.3 2026-12-01 03:10:00
== sweep: us per call (fraction of copy bandwidth)
8B o         M=  1 g8x64c2s4ws 5.6 (0.37)  g8x64c4s3ws 5.5 (0.36)  g8x64c2s4np 6.1 (0.33)
70B gate_up  M= 16 g16x64c2s4wssk 66.1 (0.86)  g16x64c2s4wsskfo 69.0 (0.80)
done; correctness failures: 0
"""


def test_config_names_round_trip():
    for M in (1, 16, 64):
        for g in (32, 128):
            for c in candidates(M, 57344, 8192, g, 132) + candidates(M, 4096, 4096, g, 132):
                assert GluonDecodeConfig.from_short(c.short()) == c
    with pytest.raises(W4A16Error, match="config name"):
        GluonDecodeConfig.from_short("p128x64x2c1s4pp")


def test_winners_become_tuning_entries(tmp_path, capsys):
    from w4a16.tuning_sweep import winners

    rows = winners(LOG)
    assert [(layer, M, c.short(), t) for layer, M, c, t in rows] == [
        ("8B o", 1, "g8x64c4s3ws", 5.5), ("70B gate_up", 16, "g16x64c2s4wssk", 66.1)]
    log, out = tmp_path / "sweep.log", tmp_path / "tuned.json"
    log.write_text(LOG)
    with pytest.raises(W4A16Error, match="--sms: expected the SM count"):
        main(["tune", "--from-sweep", str(log), "--out", str(out)])
    assert main(["tune", "--from-sweep", str(log), "--sms", "132", "--out", str(out)]) == 0
    assert f"2 entries -> {out}" in capsys.readouterr().out
    entries = json.loads(out.read_text())["entries"]
    v = registry()["gluon"].layout_version
    card = "NVIDIA H200/132"   # the log names the GPU; --sms its SM count
    assert set(entries) == {f"gluon|{v}|{card}|1|4096|4096|128|fp16", f"gluon|{v}|{card}|16|57344|8192|128|fp16"}
    e = entries[f"gluon|{v}|{card}|16|57344|8192|128|fp16"]
    assert e["time_us"] == 66.1 and GluonDecodeConfig(**json.loads(e["config"])).short() == "g16x64c2s4wssk"


def test_sweep_entries_name_the_sm_count_given(tmp_path):
    log, out = tmp_path / "sweep.log", tmp_path / "tuned.json"
    log.write_text(LOG)
    assert main(["tune", "--from-sweep", str(log), "--sms", "114", "--out", str(out)]) == 0
    assert all("|NVIDIA H200/114|" in k for k in json.loads(out.read_text())["entries"])
    with pytest.raises(W4A16Error, match="sms: expected a positive SM count, got 0"):
        main(["tune", "--from-sweep", str(log), "--sms", "0", "--out", str(out)])


def test_family_names_every_layer_of_the_family():
    import argparse

    from w4a16.tune_cli import _shapes

    args = argparse.Namespace(layers=None, family=["qwen2.5-7b", "llama3-8b"], shape=None)
    assert _shapes(args)[:4] == [("Qwen7B qkv", (4608, 3584)), ("Qwen7B o", (3584, 3584)),
                                 ("Qwen7B gate_up", (37888, 3584)), ("Qwen7B down", (3584, 18944))]
    assert len(_shapes(args)) == 8


def test_sweep_log_without_env_line_is_refused(tmp_path):
    log = tmp_path / "sweep.log"
    log.write_text(LOG.split("\n", 1)[1])
    with pytest.raises(W4A16Error, match="sweep log: expected an 'env: <GPU> torch ...' line"):
        main(["tune", "--from-sweep", str(log), "--sms", "132", "--out", str(tmp_path / "t.json")])


def _file(path, entries, fmt=tuning_cache.FORMAT):
    path.write_text(json.dumps({"format": fmt, "entries": entries}))
    return path


def test_merge_replaces_same_keys_and_keeps_the_rest(tmp_path, capsys):
    into = _file(tmp_path / "into.json", {"a": {"config": "x", "time_us": 1.0}, "b": {"config": "y", "time_us": 2.0}})
    src1 = _file(tmp_path / "s1.json", {"b": {"config": "y2", "time_us": 1.5}, "c": {"config": "z", "time_us": 3.0}})
    src2 = _file(tmp_path / "s2.json", {"c": {"config": "z2", "time_us": 2.5}})
    assert main(["tune", "--merge", str(src1), str(src2), "--into", str(into)]) == 0
    assert "3 entries merged (1 new, 2 replaced): 3 in" in capsys.readouterr().out
    data = json.loads(into.read_text())
    assert data["format"] == tuning_cache.FORMAT
    assert data["entries"] == {"a": {"config": "x", "time_us": 1.0}, "b": {"config": "y2", "time_us": 1.5},
                               "c": {"config": "z2", "time_us": 2.5}}


def test_merge_into_the_user_cache_by_default(tmp_path, monkeypatch):
    cache = tmp_path / "cache" / "tuned.json"
    monkeypatch.setenv("W4A16_CACHE", str(cache))
    src = _file(tmp_path / "s.json", {"k": {"config": "x", "time_us": 1.0}})
    assert main(["tune", "--merge", str(src)]) == 0
    assert json.loads(cache.read_text())["entries"] == {"k": {"config": "x", "time_us": 1.0}}


def test_merge_refuses_another_format_and_non_json(tmp_path):
    into = tmp_path / "into.json"
    old = _file(tmp_path / "old.json", {"k": {}}, fmt=tuning_cache.FORMAT - 1)
    with pytest.raises(W4A16Error, match=f"format of {old}: expected {tuning_cache.FORMAT}, got {tuning_cache.FORMAT - 1}"):
        main(["tune", "--merge", str(old), "--into", str(into)])
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(W4A16Error, match="tuning file: expected a readable JSON file"):
        main(["tune", "--merge", str(bad), "--into", str(into)])
    with pytest.raises(W4A16Error, match="tuning file: expected a readable JSON file"):
        main(["tune", "--merge", str(tmp_path / "missing.json"), "--into", str(into)])
    assert not into.exists()


def test_tune_needs_something_to_do_and_well_formed_shapes():
    with pytest.raises(W4A16Error, match="tune: expected --layers, --family, --shape, --merge or --from-sweep"):
        main(["tune"])
    with pytest.raises(W4A16Error, match="--shape: expected N,K with two positive integers, got 4096"):
        main(["tune", "--shape", "4096"])
