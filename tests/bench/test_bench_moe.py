"""w4a16 bench --moe on the CPU with the fake timer: every preset and peer gives a checked row,
the files (and the two plots) are written, a wrong peer is recorded and fails the run, bad arguments are refused."""
import csv

import pytest

from w4a16.bench import moe
from w4a16.cli import main


def test_fake_run_writes_checked_rows(tmp_path, capsys):
    out = tmp_path / "o"
    assert main(["bench", "--moe", "qwen3-30b-a3b,mixtral-8x7b", "--m", "1,5", "--fake-timer", "--no-progress",
                 "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "FAKE TIMER" in text
    rows = list(csv.DictReader(open(out / "moe.csv")))
    assert len(rows) == 2 * 2 * len(moe.DEFAULT_PEERS)
    assert {r["peer"] for r in rows} == {"w4a16", "torch-loop", "w4a16-loop"}   # no _grouped_mm on the CPU
    assert all(r["status"] == "ok" and float(r["rel_err"]) < 1e-2 for r in rows)
    assert {(r["preset"], r["top_k"]) for r in rows} == {("qwen3-30b-a3b", "8"), ("mixtral-8x7b", "2")}
    assert (out / "moe.md").read_text() == text and (out / "moe.json").exists()
    pytest.importorskip("matplotlib")
    for png in ("moe_speedup.png", "moe_copy.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_triton_only_peer_is_timed_when_named(tmp_path):
    """w4a16-triton (fused_moe with backend "triton") beside w4a16, both checked; w4a16-gluon, which
    the CPU cannot run, is reported as such and the run goes on."""
    assert main(["bench", "--moe", "qwen3-30b-a3b", "--m", "1,3", "--fake-timer", "--no-progress",
                 "--peers", "w4a16,w4a16-triton,w4a16-gluon", "--out", str(tmp_path)]) == 0
    rows = list(csv.DictReader(open(tmp_path / "moe.csv")))
    assert sorted(r["peer"] for r in rows) == ["w4a16", "w4a16", "w4a16-gluon", "w4a16-gluon", "w4a16-triton",
                                               "w4a16-triton"]
    assert {r["status"] for r in rows if r["peer"] != "w4a16-gluon"} == {"ok"}
    assert {r["status"] for r in rows if r["peer"] == "w4a16-gluon"} == {"n/a"}


def test_each_points_first_timing_is_a_discarded_warm_up(tmp_path, monkeypatch):
    from w4a16.bench.timing import FakeTimer

    calls = []
    real = FakeTimer.measure
    monkeypatch.setattr(FakeTimer, "measure", lambda self, *a, **kw: calls.append(1) or real(self, *a, **kw))
    assert main(["bench", "--moe", "qwen3-30b-a3b", "--m", "1,2", "--fake-timer", "--no-progress",
                 "--peers", "w4a16,w4a16-loop", "--out", str(tmp_path)]) == 0
    assert len(calls) == 2 * (2 + 1)          # two points, two peers and one warm-up each
    assert len(list(csv.DictReader(open(tmp_path / "moe.csv")))) == 4


def test_a_peer_that_cannot_be_timed_is_reported_and_the_run_goes_on(tmp_path, monkeypatch):
    """A timing that raises (a peer a CUDA graph cannot capture, say) gives an n/a row with the reason;
    the peers after it are timed."""
    from w4a16.bench.timing import FakeTimer

    real = FakeTimer.measure

    def measure(self, calls, *a, **kw):
        if self.name == "eager":                  # the loop peers
            raise RuntimeError("Cannot copy between CPU and CUDA tensors during CUDA graph capture")
        return real(self, calls, *a, **kw)

    monkeypatch.setattr(FakeTimer, "measure", measure)
    assert main(["bench", "--moe", "qwen3-30b-a3b", "--m", "2", "--fake-timer", "--no-progress",
                 "--peers", "torch,w4a16", "--out", str(tmp_path)]) == 0
    rows = {r["peer"]: r for r in csv.DictReader(open(tmp_path / "moe.csv"))}
    assert rows["torch-loop"]["status"] == "n/a" and "CUDA graph capture" in rows["torch-loop"]["note"]
    assert rows["w4a16"]["status"] == "ok" and float(rows["w4a16"]["median_us"]) > 0


def test_torch_grouped_mm_is_graph_timed_only_where_its_fast_kernel_runs():
    import torch
    assert moe.grouped_mm_capturable(torch.bfloat16, (9, 0))
    assert moe.grouped_mm_capturable(torch.bfloat16, (10, 0))
    assert not moe.grouped_mm_capturable(torch.float16, (9, 0))      # offsets copied to the host
    assert not moe.grouped_mm_capturable(torch.bfloat16, (8, 0))


def test_a_wrong_peer_is_recorded_and_fails(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(moe, "fused_moe", lambda x, *a: x * 0)
    assert main(["bench", "--moe", "mixtral-8x7b", "--m", "4", "--fake-timer", "--no-progress",
                 "--peers", "w4a16", "--out", str(tmp_path)]) == 1
    rows = list(csv.DictReader(open(tmp_path / "moe.csv")))
    assert [r["status"] for r in rows] == ["wrong"] and rows[0]["median_us"] == ""
    assert "WRONG" in capsys.readouterr().err


@pytest.mark.parametrize("argv,msg", [(["--moe", "llama"], "--moe: expected 'all' or names from"),
                                      (["--moe", "all", "--peers", "cublas-fp16"], "--peers: expected names from")])
def test_bad_arguments(tmp_path, capsys, argv, msg):
    assert main(["bench", *argv, "--fake-timer", "--out", str(tmp_path)]) == 2
    assert msg in capsys.readouterr().err
