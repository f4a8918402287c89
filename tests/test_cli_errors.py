"""The command line on the CPU: demo at every group size, notes that match the path taken,
``bench --fake-timer`` fast and labelled as made up everywhere, and the package metadata."""
import argparse
import csv
import importlib.util
import json
import time
from pathlib import Path

import pytest
import torch

from w4a16 import cli, spec
from w4a16.bench import cli as bench_cli
from w4a16.bench import runner
from w4a16.bench.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
FAKE = "FAKE TIMER \N{EM DASH} not a measurement"
HAS_MPL = importlib.util.find_spec("matplotlib") is not None
pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU versions of the commands")


@pytest.mark.parametrize("group_size", spec.SUPPORTED_GROUP_SIZES)
def test_small_demo_shapes_fit_every_group_size(group_size):
    for name, N, K in cli.small_layers():
        spec.check_group_size(group_size, K)
        assert K % 2 == 0 and N >= 1
    assert [K for _, _, K in cli.small_layers()] == [256, 256, 256, 1024]


def test_demo_group_size_256_asymmetric_runs(capsys):
    assert cli.main(["demo", "--group-size", "256", "--asym"]) == 0
    out = capsys.readouterr().out
    assert "group size 256, asymmetric" in out and out.count("| ok") == len(cli.small_layers()) * len(cli.SMALL_M)


def test_check_on_the_reference_path_has_no_interpreter_note(monkeypatch, capsys):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert cli.main(["check"]) == 0
    out = capsys.readouterr().out
    assert "gemm path: reference" in out
    assert cli.BF16_ON_CPU not in out and "interpreter" not in out.split("gemm path")[1].split("\n", 1)[1]
    assert "| bf16" in out  # the reference path computes bf16 correctly, so it is checked


def test_check_in_the_interpreter_keeps_the_note(monkeypatch, capsys):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert cli.main(["check", "--dtype", "all"]) == 0
    assert cli.BF16_ON_CPU in capsys.readouterr().out


def _bench_args(argv):
    p = argparse.ArgumentParser()
    bench_cli.add_parser(p.add_subparsers(dest="command"))
    return p.parse_args(["bench", *argv])


def test_quick_fake_bench_is_fast_and_labelled(tmp_path, monkeypatch, capsys):
    """``w4a16 bench --quick --fake-timer`` (8B layers, M up to 1024) through the kernels in the
    interpreter: seconds, not minutes, and every output says the times are made up."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    out = tmp_path / "o"
    t0 = time.perf_counter()
    rc = bench_cli.run(_bench_args(["--quick", "--fake-timer", "--no-progress", "--out", str(out),
                                    "--peers", "w4a16,cublas-fp16"]))
    assert rc == 0 and time.perf_counter() - t0 < 60
    text = capsys.readouterr().out
    assert text.startswith(f"# w4a16 bench ({FAKE})")
    headings = [ln for ln in text.splitlines() if ln.startswith("## ") and "timing" in ln]
    assert headings and all(FAKE in ln for ln in headings)
    assert "CUDA-graph replay" not in text
    with open(out / "bench.csv", encoding="utf-8") as f:
        first = f.readline()
        rows = list(csv.DictReader(ln for ln in f if not ln.startswith("#")))
    assert first.startswith(f"# warning: {FAKE}")
    assert rows and all(r["note"] == FAKE for r in rows if r["status"] == "ok")
    assert {r["N"] for r in rows} == {"6144", "4096", "28672"}  # the real layers are reported
    doc = json.loads((out / "bench.json").read_text(encoding="utf-8"))
    assert doc["header"]["warning"].startswith(FAKE)
    assert (out / "bench.md").read_text(encoding="utf-8") == text


@pytest.mark.skipif(not HAS_MPL, reason="needs matplotlib")
def test_fake_plot_titles_say_so(tmp_path, monkeypatch):
    from w4a16.bench import plots

    titles = []
    monkeypatch.setattr(plots, "_panels", lambda fig, rows, field, ylabel, title, *a, **k: titles.append(title))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    s = Settings.from_args(_bench_args(["--shape", "64,256", "--m", "1", "--fake-timer", "--no-progress",
                                        "--peers", "w4a16,cublas-fp16", "--out", str(tmp_path)]))
    res = runner.run_bench(s, "cpu", progress=False)
    plots.plot_all(res, str(tmp_path))
    assert titles and all(t.startswith(FAKE) for t in titles)


def test_fake_proxy_is_valid_for_every_group_size():
    for M, N, K in [(4096, 57344, 28672), (1, 64, 96), (1024, 4096, 14336)]:
        m, n, k = runner.fake_proxy(M, N, K)
        assert m <= 16 and n <= 256 and k <= 1024 and (m, n) == (min(M, 16), min(N, 256))
        for g in spec.SUPPORTED_GROUP_SIZES:
            if g == -1 or K % g == 0:
                assert g == -1 or k % g == 0


def test_license_is_an_spdx_string():
    tomllib = pytest.importorskip("tomllib")
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert meta["project"]["license"] == "Apache-2.0"
    req = [r for r in meta["build-system"]["requires"] if r.startswith("setuptools")]
    assert req == ["setuptools>=77"]
