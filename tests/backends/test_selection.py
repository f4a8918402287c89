"""The backend registry: names and order, the automatic choice and its reasons, forced backends,
the tuning cache keyed on backend and layout version, and adding a backend without editing ops."""
import json

import pytest
import torch

import w4a16
from w4a16 import tuning_cache
from w4a16.backends import Problem, get, registry
from w4a16.backends import selection as registry_mod
from w4a16.backends.reference import ReferenceBackend
from w4a16.config import GemmConfig


def test_registry_names_in_order_of_preference():
    names = list(registry())
    assert names[-2:] == ["triton", "reference"]
    assert all(isinstance(get(n), type(registry()[n])) for n in names)
    with pytest.raises(w4a16.W4A16Error, match="backend: expected 'auto' or one of"):
        get("cutlass")


def test_bf16_on_the_cpu_never_runs_in_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    w = w4a16.quantize(torch.randn(32, 128), 64, dtype=torch.bfloat16)
    x = torch.randn(3, 128, dtype=torch.bfloat16)
    choice = w4a16.choose(x, w)
    assert choice.backend.name == "reference" and "bf16" in choice.reason
    y = w4a16.gemm(x, w)
    assert torch.equal(y, w4a16.reference.gemm(x, w))
    with pytest.raises(w4a16.W4A16Error, match="interpreter computes bf16 dots wrongly"):
        w4a16.gemm(x, w, backend="triton")


def test_config_object_names_its_backend(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    w = w4a16.quantize(torch.randn(32, 128), 64)
    x = torch.randn(3, 128, dtype=torch.float16)
    cfg = GemmConfig("splitk", 16, 16, split_k=2, num_warps=4, num_stages=1)
    choice = w4a16.choose(x, w, cfg)
    assert choice.backend.name == "triton" and choice.config is cfg
    with pytest.raises(w4a16.W4A16Error, match="backend: expected 'triton' or 'auto'"):
        w4a16.gemm(x, w, config=cfg, backend="reference")
    assert w4a16.choose(x, w, "reference").backend.name == "reference"
    assert set(w4a16.config_names()) >= {"auto", "128", "64", "decode", "reference"}


def test_tuning_cache_keys_on_backend_and_layout(tmp_path, monkeypatch):
    monkeypatch.setenv("W4A16_CACHE", str(tmp_path / "tuned.json"))
    tb = get("triton")
    p = Problem(16, 4096, 4096, 128, torch.float16, False, torch.device("cpu"))
    cfg = GemmConfig("splitk", 16, 64, split_k=4, num_warps=4, num_stages=1)
    gen = tuning_cache.generation()
    tuning_cache.store(tb, tb.layout_version, "GPU X", 16, 4096, 4096, 128, torch.float16, cfg, 12.5)
    assert tuning_cache.generation() == gen + 1
    assert tuning_cache.lookup(tb, tb.layout_version, "GPU X", p)[:2] == (cfg, 12.5)
    assert tuning_cache.lookup(tb, tb.layout_version + 1, "GPU X", p) is None   # another layout
    assert tuning_cache.lookup(tb, tb.layout_version, "GPU Y", p) is None
    data = json.loads((tmp_path / "tuned.json").read_text())
    assert list(data["entries"]) == [f"triton|{tb.layout_version}|GPU X|16|4096|4096|128|fp16"]


def test_shipped_table_is_readable():
    tb = get("triton")
    p = Problem(1, 57344, 8192, 128, torch.float16, False, torch.device("cpu"))
    hit = tuning_cache.lookup(tb, tb.layout_version, "NVIDIA H200/132", p)
    assert hit is not None and isinstance(hit.config, GemmConfig) and hit.time_us > 0 and hit.shape == (57344, 8192)


class _DoubleReference(ReferenceBackend):
    """A stand-in 'new backend': the reference with its own name, preferred first."""

    name = "double"

    def default_config(self, p):
        return "reference"


def test_a_new_backend_is_a_registry_entry(monkeypatch):
    monkeypatch.setitem(registry_mod.ENTRIES, "double", (__name__, "_DoubleReference"))
    monkeypatch.setattr(registry_mod, "ORDER", ("double",) + registry_mod.ORDER)
    monkeypatch.setattr(w4a16.ops, "_CHOICES", {})
    w = w4a16.quantize(torch.randn(32, 128), 64)
    x = torch.randn(2, 128, dtype=torch.float16)
    choice = w4a16.choose(x, w)
    assert choice.backend.name == "double" and "double heuristic" in choice.reason
    assert torch.equal(w4a16.gemm(x, w, backend="double"), w4a16.reference.gemm(x, w))
    registry_mod._BACKENDS.pop("double", None)


def test_describe_path_names_the_backend(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert w4a16.describe_path("cpu")[0] == "triton-interpreter"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    path, reason = w4a16.describe_path("cpu")
    assert path == "reference" and "TRITON_INTERPRET" in reason


def test_tuned_ties_go_to_the_preferred_backend():
    """Tuned times within 3% count as a tie: the earlier backend in the registry's order runs (one
    prepared layout per weight); a clearly faster later backend still wins."""
    from w4a16.backends.selection import TIE_MARGIN, pick_tuned

    assert TIE_MARGIN == 0.03
    assert pick_tuned([(24.8, "gluon", "g"), (24.5, "triton", "t")])[1] == "gluon"
    assert pick_tuned([(26.0, "gluon", "g"), (24.5, "triton", "t")])[1] == "triton"
    assert pick_tuned([(20.0, "gluon", "g"), (24.5, "triton", "t")])[1] == "gluon"
    assert pick_tuned([(9.0, "triton", "t")])[1] == "triton"


def test_a_forced_backend_that_cannot_run_the_call_is_refused_by_type():
    """backend="gluon" on the CPU: BackendRefused (a W4A16Error) naming the backend and why."""
    import w4a16
    from w4a16.errors import BackendRefused, W4A16Error

    w = w4a16.quantize(torch.randn(64, 256, generator=torch.Generator().manual_seed(0)), group_size=128,
                       dtype=torch.float16)
    x = torch.randn(2, 256, generator=torch.Generator().manual_seed(1)).half()
    with pytest.raises(BackendRefused, match="backend: expected a backend that runs this call, got 'gluon'") as e:
        w4a16.gemm(x, w, backend="gluon")
    assert isinstance(e.value, W4A16Error) and isinstance(e.value, ValueError)
