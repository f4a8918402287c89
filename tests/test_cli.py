"""The command line: every sub-command returns 0, says what it ran on, and ``check`` can fail."""
import pytest
import torch

import w4a16
from w4a16 import cli, ops

HAS_CUDA = torch.cuda.is_available()


def test_version(capsys):
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"w4a16 {w4a16.__version__}"


def test_no_command_is_a_usage_error(capsys):
    assert cli.main([]) == 2
    assert "COMMAND" in capsys.readouterr().err


def test_info(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    path, reason = ops.describe_path(cli._device())
    for word in ("torch", torch.__version__, "triton", "TRITON_INTERPRET", "CUDA available",
                 "compute capability", "SMs", "gemm path", path, reason):
        assert word in out, word


def test_check_default(capsys):
    """The CPU default is the quick set in fp16; on a GPU the quick set in fp16 and bf16."""
    assert cli.main(["check", "--quick"] if HAS_CUDA else ["check"]) == 0
    out = capsys.readouterr().out
    path = ops.describe_path(cli._device())[0]
    assert out.startswith("device: ") and f"gemm path: {path}" in out
    assert "| config |" in out and "rel err" in out
    passed = len(cli.QUICK_CASES) * (2 if HAS_CUDA else 1)
    assert out.rstrip().endswith(f"{passed} passed, 0 failed")


def test_check_one_named_config(capsys):
    assert cli.main(["check", "--quick", "--config", "decode"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("|")][2:]
    assert rows and all("| decode " in r and "| ok " in r for r in rows)


def test_check_rejects_unknown_config(capsys):
    assert cli.main(["check", "--config", "bogus"]) == 2
    assert "bogus" in capsys.readouterr().err


def test_check_fails_on_a_wrong_result(monkeypatch, capsys):
    good = ops.gemm

    def off_by_a_bit(x, w, bias=None, alpha=1.0, config="auto"):
        y = good(x, w, bias, alpha, config=config)
        return y * 1.01 if x.shape[0] == 5 else y          # one problem of the quick set is 1% off

    monkeypatch.setattr(ops, "gemm", off_by_a_bit)
    assert cli.main(["check", "--quick", "--dtype", "fp16"]) == 1
    out = capsys.readouterr().out
    assert out.rstrip().endswith(f"{len(cli.QUICK_CASES) - 1} passed, 1 failed")
    assert "| FAIL " in out


def test_check_reports_nan_and_exceptions(monkeypatch, capsys):
    good = ops.gemm

    def broken(x, w, bias=None, alpha=1.0, config="auto"):
        if x.shape[0] == 1:
            return torch.full_like(good(x, w, bias, alpha, config=config), float("nan"))
        if x.shape[0] == 3:
            raise RuntimeError("launch failed")
        return good(x, w, bias, alpha, config=config)

    monkeypatch.setattr(ops, "gemm", broken)
    assert cli.main(["check", "--quick", "--dtype", "fp16"]) == 1
    out = capsys.readouterr().out
    assert "| NaN " in out and "| ERROR " in out and "RuntimeError: launch failed" in out
    assert out.rstrip().endswith(f"{len(cli.QUICK_CASES) - 2} passed, 2 failed")


@pytest.mark.skipif(HAS_CUDA, reason="checks the CPU version of the demo")
def test_demo_cpu(capsys):
    assert cli.main(["demo"]) == 0
    out = capsys.readouterr().out
    path = ops.describe_path(torch.device("cpu"))[0]
    assert out.startswith("device: cpu")
    assert f"no CUDA GPU: ran a small version on the CPU, using {path}" in out
    assert "SQNR dB" in out and "saved" in out and "timing skipped" in out
    assert f"{len(cli.LLAMA3_8B_LAYERS) * len(cli.SMALL_M)} passed, 0 failed" in out


@pytest.mark.gpu
def test_demo_small_on_gpu(capsys):
    assert cli.main(["demo", "--small"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("device: cuda") and "speedup" in out


def test_bench_registered_only_when_present(capsys):
    bench, error = cli._bench_module()
    assert error is None, error
    cli.main(["--help"])
    text = capsys.readouterr().out
    assert ("bench" in text) == (bench is not None)


@pytest.mark.skipif(HAS_CUDA, reason="the command line on a machine without a GPU")
def test_demo_as_the_readme_runs_it():
    """`python -m w4a16 demo` in a fresh process with TRITON_INTERPRET unset: the command line sets
    it before anything imports Triton (importing w4a16 must not), and the demo passes."""
    import subprocess
    import sys

    env = {k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"}
    probe = subprocess.run([sys.executable, "-c", "import sys, w4a16; "
                            "print(sorted(m for m in ('triton', 'torch._dynamo') if m in sys.modules))"],
                           capture_output=True, text=True, env=env, timeout=300)
    assert probe.returncode == 0 and probe.stdout.strip() == "[]", probe.stdout + probe.stderr
    r = subprocess.run([sys.executable, "-m", "w4a16", "demo"], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert f"{len(cli.LLAMA3_8B_LAYERS) * len(cli.SMALL_M)} passed, 0 failed" in r.stdout

