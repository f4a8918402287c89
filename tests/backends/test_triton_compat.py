"""backends/triton_compat.py: the supported range, and each version-dependent spelling working on
the installed Triton (CI compiles every shipped kernel with each supported release as well:
.ci/sass_versions.sh)."""
import os
import pathlib
import re
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")

from w4a16.backends import triton_compat as tc  # noqa: E402

SRC = pathlib.Path(__file__).resolve().parents[2] / "src" / "w4a16"


@pytest.mark.parametrize("version,expected", [("3.6.0", (3, 6)), ("3.9.1", (3, 9)), ("3.7.0+git1a2b3c", (3, 7)),
                                              ("3.10.0", (3, 10)), ("4.0.0rc1", (4, 0))])
def test_release(version, expected):
    assert tc.release(version) == expected


@pytest.mark.parametrize("version", ["3.6.0", "3.7.1", "3.8.0", "3.9.0", "3.9.2"])
def test_supported_releases(version):
    assert tc.gluon_unsupported(version) is None


@pytest.mark.parametrize("version", ["3.5.1", "3.10.0", "4.0.0"])
def test_unsupported_releases_say_why(version):
    reason = tc.gluon_unsupported(version)
    assert reason and version in reason and "3.6 to 3.9" in reason


def test_spellings_exist_on_this_triton():
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import tma
    assert tc.GLUON_IMPORT_ERROR is None
    assert tc.barrier in (getattr(gl, "barrier", None), getattr(gl, "thread_barrier", None))
    assert tc.tma_load in (getattr(tma, "async_load", None), getattr(tma, "async_copy_global_to_shared", None))
    assert tc.COMPILE_OPTIONS == {"enable_fp_fusion": True}
    assert tc.hooks_active() is False


PROBE = """
from triton.experimental import gluon
from triton.experimental.gluon import language as gl

from w4a16.backends import triton_compat as tc
from w4a16.backends.gluon.offline import compile_gluon


@gluon.jit
def probe(out_ptr):
    flat_l: gl.constexpr = gl.SwizzledSharedLayout(vec=1, per_phase=1, max_phase=1, order=[0])
    buf = gl.allocate_shared_memory(gl.float16, [2, 64],
                                    gl.SwizzledSharedLayout(vec=1, per_phase=1, max_phase=1, order=[1, 0]))
    flat = tc.reinterpret(buf, gl.float16, [128], flat_l)
    reg_l: gl.constexpr = gl.BlockedLayout([1], [32], [4], [0])
    offs = gl.arange(0, 128, layout=reg_l)
    flat.store(offs.to(gl.float16))
    tc.barrier()
    gl.store(out_ptr + offs, flat.load(reg_l))


k = compile_gluon(probe, {"out_ptr": "*fp16"}, {}, num_warps=4, maxnreg=None)
ptx = k.asm["ptx"]
assert k.asm["cubin"] and "st.shared" in ptx and "ld.shared" in ptx and "bar.sync" in ptx, ptx
print("compiled")
"""


def test_reinterpret_and_barrier_compile_on_this_triton(tmp_path):
    """``reinterpret`` (private ``_reinterpret`` before 3.9) and ``barrier`` in a kernel compiled for
    sm_90a: a [2, 64] buffer viewed as [128] under another layout, stored, loaded and written out.
    In a fresh process without TRITON_INTERPRET (kernels defined under the interpreter cannot be
    compiled)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = tmp_path / "probe.py"   # Triton reads a kernel's source from its file
    script.write_text(PROBE)
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0 and "compiled" in r.stdout, r.stderr[-3000:]


def test_no_other_module_tests_a_triton_version():
    """Version comparisons and Gluon feature probes live in triton_compat.py only."""
    pattern = re.compile(r"__version__\s*(==|!=|<|>|\.startswith)|hasattr\((gl|tma|triton)\b|"
                         r"['\"]3\.[6-9](\.\d)?['\"]")
    offenders = []
    for path in SRC.rglob("*.py"):
        if path.name == "triton_compat.py":
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if pattern.search(line):
                offenders.append(f"{path.relative_to(SRC)}:{n}: {line.strip()}")
    assert not offenders, offenders


def test_legacy_sm90_ptxas_is_chosen_only_where_it_differs(monkeypatch):
    """W4A16_SM90_PTXAS=legacy: the older ptxas a Triton ships is offered only when it is a 12.x
    release and sm_90 is compiled with another one (Triton 3.9)."""
    from types import SimpleNamespace as Tool

    from w4a16.backends import triton_compat as tc

    new, old = Tool(path="/t/ptxas-blackwell", version="13.4"), Tool(path="/t/ptxas", version="12.9")
    monkeypatch.setattr(tc, "_ptxas_tools", lambda: (new, old))
    assert tc.legacy_sm90_ptxas() == "/t/ptxas"
    assert tc.sm90_ptxas() == "13.4 (Triton's default)"
    monkeypatch.setattr(tc, "_ptxas_tools", lambda: (old, old))              # 3.6 to 3.8: one ptxas
    assert tc.legacy_sm90_ptxas() is None
    monkeypatch.setattr(tc, "_ptxas_tools", lambda: (new, Tool(path="/t/ptxas", version="13.0")))
    assert tc.legacy_sm90_ptxas() is None                                   # not an older release
    monkeypatch.setattr(tc, "_ptxas_tools", lambda: (old, old))
    monkeypatch.setattr(tc, "LEGACY_PTXAS_APPLIED", [True])                # as the import sets it
    assert tc.sm90_ptxas() == "12.9 (W4A16_SM90_PTXAS=legacy)"
    monkeypatch.setattr(tc, "LEGACY_PTXAS_APPLIED", [False])
    assert tc.sm90_ptxas() == "12.9 (Triton's default)"
