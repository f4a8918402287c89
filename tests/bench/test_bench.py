"""The benchmark harness on the CPU: options, roofline arithmetic, a fake-timer run end to end.

The fake timer gives made-up times, so these tests check the harness (what is run, checked,
computed and written), never performance. w4a16.gemm takes its reference path here
(TRITON_INTERPRET=0) so the runs stay fast.
"""
import argparse
import csv
import importlib.util
import json
import math

import pytest
import torch

import w4a16
from w4a16.bench import cli as bench_cli
from w4a16.bench import peers as peers_mod
from w4a16.bench import report, roofline, runner, shapes, timing
from w4a16.measure import generator, random_activation, random_weight, rel_error
from w4a16.bench.settings import Settings
from w4a16.errors import W4A16Error

HAS_MPL = importlib.util.find_spec("matplotlib") is not None
TINY = ["--shape", "64,256", "--shape", "128,512", "--m", "1,3,16", "--group-size", "64", "--no-progress"]


@pytest.fixture(autouse=True)
def _reference_path(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")


def parse(argv):
    p = argparse.ArgumentParser()
    bench_cli.add_parser(p.add_subparsers(dest="command"))
    return p.parse_args(["bench", *argv])


# ---------------------------------------------------------------------------- options
def test_defaults():
    s = Settings.from_args(parse([]))
    assert s.presets == ("llama3-8b", "llama3-70b")
    assert [(x.label, x.N, x.K) for x in s.shapes[:4]] == [
        ("8B qkv", 6144, 4096), ("8B o", 4096, 4096), ("8B gate_up", 28672, 4096), ("8B down", 4096, 14336)]
    assert [(x.N, x.K) for x in s.shapes[4:]] == [(10240, 8192), (8192, 8192), (57344, 8192), (8192, 28672)]
    assert s.ms == (1, 16, 64, 256, 1024, 4096)
    assert s.dtypes == (torch.float16,) and s.group_sizes == (128,) and not s.zeros
    assert s.peers == peers_mod.PEER_NAMES and s.timing == "graph" and s.out == "bench-out"
    assert not s.configs and not s.fake_timer


def test_options_parsed():
    s = Settings.from_args(parse(["--preset", "llama3-70b", "--shape", "256,512", "--m", "1,16,1", "--dtype",
                                  "bf16", "--group-size", "64", "--zeros", "--peers", "w4a16,cublas-fp16",
                                  "--timing", "both", "--out", "o", "--configs"]))
    assert s.presets == ("llama3-70b",)
    assert s.shapes[-1] == shapes.Shape("custom", "256x512", 256, 512) and len(s.shapes) == 5
    assert s.ms == (1, 16) and s.dtypes == (torch.bfloat16,) and s.group_sizes == (64,) and s.zeros
    assert s.peers == ("w4a16", "cublas-fp16") and s.timing == "both" and s.out == "o" and s.configs


def test_quick_and_custom_only():
    q = Settings.from_args(parse(["--quick"]))
    assert q.presets == ("llama3-8b",) and q.ms == shapes.QUICK_M
    c = Settings.from_args(parse(["--shape", "64,256"]))
    assert c.presets == () and [(x.N, x.K) for x in c.shapes] == [(64, 256)]


@pytest.mark.parametrize("argv", [["--shape", "64"], ["--shape", "64,255"], ["--m", "0"], ["--m", "a"],
                                  ["--dtype", "fp32"], ["--group-size", "100"], ["--peers", "cublas-fp8"],
                                  ["--shape", "64,96", "--group-size", "64"]])
def test_bad_options_rejected(argv):
    with pytest.raises(W4A16Error):
        Settings.from_args(parse(argv))
    assert bench_cli.run(parse(argv + ["--fake-timer"])) == 2


def test_no_gpu_exits_2(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bench_cli.run(parse(TINY)) == 2
    assert "no CUDA device" in capsys.readouterr().err


# ---------------------------------------------------------------------------- arithmetic
def test_roofline_by_hand():
    # 8B qkv, M = 16, g = 128: codes 6144*4096/2 = 12582912, scales 6144*32*2 = 393216,
    # x 2*16*4096 = 131072, y 2*16*6144 = 196608.
    assert roofline.w4_bytes(16, 6144, 4096, 128, zeros=False) == 13303808
    assert roofline.w4_bytes(16, 6144, 4096, 128, zeros=True) == 13303808 + 393216
    assert roofline.w4_bytes(16, 6144, 4096, -1, zeros=False) == 12582912 + 6144 * 2 + 131072 + 196608
    assert roofline.fp16_bytes(16, 6144, 4096) == 50331648 + 131072 + 196608
    assert roofline.flops(16, 6144, 4096) == 805306368
    # Memory-bound: 13303808 B / 3.35 TB/s = 3.971286 us > 805306368 / 700 TFLOP/s = 1.150438 us.
    m = roofline.merit(5e-6, 13303808, 805306368, 3.35e12, 700e12)
    assert m.floor_us == pytest.approx(3.971286, rel=1e-6)
    assert m.frac_floor == pytest.approx(0.7942572, rel=1e-6)
    assert m.tflops == pytest.approx(161.0612736, rel=1e-9)
    assert m.gbps == pytest.approx(2660.7616, rel=1e-9)
    # Compute-bound at M = 4096: 2*4096*6144*4096 / 700e12 = 294.512043 us.
    nb = roofline.w4_bytes(4096, 6144, 4096, 128, False)
    assert nb == 12582912 + 393216 + 33554432 + 50331648
    assert roofline.floor_s(nb, roofline.flops(4096, 6144, 4096), 3.35e12, 700e12) * 1e6 == pytest.approx(
        294.512043, rel=1e-6)
    assert roofline.speedup(10.0, 4.0) == 2.5 and roofline.speedup(None, 4.0) is None


def test_timing_helpers():
    assert timing.copies_for(8 * 2**20, 50 * 2**20) == 13
    assert timing.copies_for(2**30, 50 * 2**20) == 2
    assert timing.copies_for(1000, 50 * 2**20) == 64
    assert timing.percentile([4.0, 1.0, 3.0, 2.0, 5.0], 50) == 3.0
    assert timing.percentile([1.0, 2.0], 10) == pytest.approx(1.1)
    t = timing.summarize([10.0, 12.0, 11.0], calls=20)
    assert (t.median_us, t.calls, t.samples) == (11.0, 20, 3)
    f = timing.FakeTimer("graph")
    a = f.measure([None], nbytes=1.6e9, nflops=0)
    assert a == f.measure([None], nbytes=1.6e9, nflops=0) and a.median_us == pytest.approx(1002.0)
    assert timing.FakeTimer("eager").measure([None], 1.6e9, 0).median_us > a.median_us


def test_torch_int4_peer_matches_reference():
    gen = generator("cpu", 0)
    w = random_weight(64, 256, 64, True, torch.bfloat16, "cpu", gen)
    x = random_activation(5, 256, torch.bfloat16, "cpu", gen)
    p = shapes.Point(shapes.Shape("custom", "64x256", 64, 256), 5, torch.bfloat16, 64, True)
    peer = peers_mod.TorchInt4Peer()
    if peer.unavailable(p, torch.device("cpu")):
        pytest.skip(peer.unavailable(p, torch.device("cpu")))
    calls = peer.build(w, copies=2).bind(x)
    ref = w4a16.reference.gemm(x, w)
    assert len(calls) == 2
    for c in calls:
        assert rel_error(c(), ref) < 1e-2
    # The pack is what the CUDA op wants: element 2j in the high nibble.
    sz = peers_mod.tinygemm_scales_and_zeros(w)
    assert sz.shape == (256 // 64, 64, 2) and sz.dtype == torch.bfloat16


# ---------------------------------------------------------------------------- end to end
def _csv_rows(path):
    with open(path) as f:
        lines = [ln for ln in f if not ln.startswith("#")]
    return list(csv.DictReader(lines))


def test_fake_run_writes_reports(tmp_path, capsys):
    out = tmp_path / "o"
    rc = bench_cli.run(parse(TINY + ["--timing", "both", "--fake-timer", "--out", str(out)]))
    assert rc == 0
    text = capsys.readouterr().out
    assert "| custom 64x256 | 64 | 256 | 1 |" in text and "graph timing" in text and "eager timing" in text

    rows = _csv_rows(out / "bench.csv")
    assert list(rows[0].keys()) == list(runner.COLUMNS)
    n_peers = len(peers_mod.PEER_NAMES)
    assert len(rows) == 2 * 3 * n_peers * 2  # shapes x M x peers x timings
    for r in rows:
        assert r["status"] in ("ok", "wrong", "n/a")
        assert r["card"] == "cpu" and r["dtype"] == "fp16" and r["group_size"] == "64"
        if r["status"] == "ok":
            for k in ("median_us", "p10_us", "p90_us", "tflops", "gbps", "floor_us", "frac_floor",
                      "speedup_vs_fp16", "rel_err", "copies", "calls"):
                assert r[k] != "" and math.isfinite(float(r[k])), (k, r)
            assert float(r["p10_us"]) <= float(r["median_us"]) <= float(r["p90_us"])
        else:
            assert r["median_us"] == "" and r["note"]
    by = {(r["layer"], r["M"], r["peer"], r["timing"]): r for r in rows}
    for peer in ("w4a16", "cublas-fp16", "cublas-bf16"):
        assert by[("custom 128x512", "16", peer, "graph")]["status"] == "ok"
    assert float(by[("custom 64x256", "1", "cublas-fp16", "eager")]["speedup_vs_fp16"]) == 1.0
    assert by[("custom 64x256", "1", "w4a16", "graph")]["config"] == "reference"
    if importlib.util.find_spec("gemlite") is None:
        assert by[("custom 64x256", "1", "gemlite", "graph")]["note"] == "gemlite not installed"

    doc = json.loads((out / "bench.json").read_text())
    for k in ("card", "sm_count", "driver", "torch", "triton", "cuda", "date", "settings", "ceilings"):
        assert k in doc["header"]
    assert doc["header"]["settings"]["m"] == [1, 3, 16] and doc["header"]["ceilings"]["source"] == "fake"
    assert len(doc["rows"]) == len(rows) and all(set(r) == set(runner.COLUMNS) for r in doc["rows"])
    assert (out / "bench.md").read_text() == text
    if HAS_MPL:
        assert (out / "speedup.png").stat().st_size > 0 and (out / "roofline.png").stat().st_size > 0


def _settings(tmp_path, *extra):
    return Settings.from_args(parse(TINY + ["--fake-timer", "--out", str(tmp_path), *extra]))


def test_wrong_result_is_not_timed(tmp_path, monkeypatch):
    real = w4a16.gemm
    monkeypatch.setattr(w4a16, "gemm", lambda x, w, **kw: real(x, w, **kw) * 1.01)
    res = runner.run_bench(_settings(tmp_path, "--peers", "w4a16,cublas-fp16"), "cpu", progress=False)
    wrong = [r for r in res.rows if r["peer"] == "w4a16"]
    assert wrong and all(r["status"] == "wrong" and r["median_us"] is None for r in wrong)
    assert all(r["rel_err"] == pytest.approx(0.01, rel=0.05) for r in wrong)
    assert all(r["status"] == "ok" for r in res.rows if r["peer"] == "cublas-fp16")
    assert "WRONG (not timed): w4a16" in report.markdown(res)


def test_failing_peer_reports_na(tmp_path, monkeypatch):
    def boom(self, w, copies):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(peers_mod.CublasPeer, "build", boom)
    res = runner.run_bench(_settings(tmp_path, "--peers", "w4a16,cublas-bf16"), "cpu", progress=False)
    bf = [r for r in res.rows if r["peer"] == "cublas-bf16"]
    assert all(r["status"] == "n/a" and r["note"] == "build: RuntimeError: boom" for r in bf)
    w = [r for r in res.rows if r["peer"] == "w4a16"]
    assert all(r["status"] == "ok" and r["speedup_vs_fp16"] is None for r in w)  # no baseline measured


def test_configs_mode(tmp_path):
    res = runner.run_bench(_settings(tmp_path, "--configs", "--m", "1"), "cpu", progress=False)
    names = list(dict.fromkeys(r["peer"] for r in res.rows))
    assert names == ["w4a16"] + [f"w4a16[{n}]" for n in w4a16.config.NAMED_CONFIGS] + ["cublas-fp16"]
    assert all(r["status"] == "ok" for r in res.rows)
    named = [r for r in res.rows if r["peer"] == "w4a16[128]"]
    assert named[0]["config"].startswith("128: ")
    assert "fastest" in report.markdown(res)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton (interpreter)")
def test_fake_run_through_kernels(tmp_path, monkeypatch):
    """With TRITON_INTERPRET=1 on a CPU, w4a16 runs its Triton kernels: checked and labelled by config."""
    if torch.cuda.is_available():
        pytest.skip("the fake timer runs on the CPU; on a GPU the interpreter is not used")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    s = Settings.from_args(parse(["--shape", "64,256", "--m", "1,16", "--group-size", "64", "--fake-timer",
                                  "--peers", "w4a16,cublas-fp16", "--out", str(tmp_path)]))
    res = runner.run_bench(s, "cpu", progress=False)
    w = [r for r in res.rows if r["peer"] == "w4a16"]
    assert len(w) == 2
    for r in w:
        assert r["status"] == "ok" and r["config"] != "reference", (r["status"], r["config"], r["note"])
