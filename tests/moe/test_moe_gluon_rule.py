"""Which one-token expert layers the Gluon MoE decode kernel takes (``backends.gluon.moe.launch.
refusal``), and which backend ``fused_moe`` picks: decided on the host, tested on the CPU."""
import pytest
import torch

from w4a16.backends.gluon.moe.launch import refusal
from w4a16.errors import BackendRefused
from w4a16.moe import QuantizedExperts, fused_moe
from w4a16.moe.ops import _backend

F16, B16 = torch.float16, torch.bfloat16
OK = dict(T=1, E=128, I=768, H=2048, g_gu=128, g_dn=128, dtype=B16, layouts=(2, 2), has_zeros=False,
          scale_dtypes=(B16, B16))


def test_the_model_shapes_are_taken():
    assert refusal(**OK) is None
    for E, I, H in ((128, 1536, 4096), (8, 14336, 4096), (256, 2048, 7168)):
        assert refusal(**dict(OK, E=E, I=I, H=H)) is None
    assert refusal(**dict(OK, g_gu=256, g_dn=768)) is None   # 256, and per channel (down: g = K = I)
    assert refusal(**dict(OK, dtype=F16, scale_dtypes=(F16, F16))) is None


@pytest.mark.parametrize("change,why", [
    (dict(T=2), "one token"), (dict(has_zeros=True), "symmetric"), (dict(layouts=(0, 2)), "layout 2"),
    (dict(I=800), "I % 64"), (dict(H=2080), "H % 64"), (dict(g_gu=64), "gate_up: group size 64"),
    (dict(g_dn=32), "down: group size 32"), (dict(scale_dtypes=(torch.float32, B16)), "scales of dtype"),
    (dict(dtype=torch.float32), "not fp16/bf16")])
def test_what_it_refuses_and_why(change, why):
    assert why in refusal(**dict(OK, **change))


def test_the_cpu_and_the_interpreter_never_pick_gluon():
    x = torch.zeros(1, 64, dtype=F16)
    assert _backend(x, "auto") in ("triton", "reference")
    with pytest.raises(BackendRefused, match="got 'gluon'"):
        _backend(x, "gluon")
    gu = QuantizedExperts.quantize(torch.randn(2, 64, 64), 32, True, F16)
    dn = QuantizedExperts.quantize(torch.randn(2, 64, 32), 32, True, F16)
    with pytest.raises(BackendRefused, match="sm_90"):
        fused_moe(x, gu, dn, torch.tensor([[0]]), torch.ones(1, 1), backend="gluon")


def test_down_splits_k_only_where_the_grid_is_small():
    """(stages per K range, ranges) of the down launch on 132 SMs: Mixtral's two wide experts split
    I in three (128 (tile, choice) units would fill a third of the resident slots); the others not,
    or in two (Qwen3-235B-A22B: 512 units of 12 stages)."""
    from w4a16.backends.gluon.moe.launch import down_splits

    cpu = torch.device("cpu")
    assert down_splits(4096, 14336, 2, cpu) == (38, 3)
    assert down_splits(2048, 768, 8, cpu) == (6, 1) and down_splits(7168, 2048, 8, cpu) == (16, 1)
    assert down_splits(4096, 1536, 8, cpu) == (6, 2)


def test_gate_up_splits_k_only_where_its_grid_is_small(monkeypatch):
    """The gate_up launch's rule on 132 SMs, two programs resident per SM (two rings of 8 stages):
    Qwen3-30B-A3B's 96 tiles of 16 stages split K in two (one wave of 192 programs); the bigger
    layers not; ``GATE_UP_SPLITS`` overrides the rule, never past one stage per range."""
    from w4a16.backends.gluon.moe import launch

    cpu = torch.device("cpu")
    assert launch.gate_up_resident() == 2
    monkeypatch.setattr(launch, "GATE_UP_SPLITS", None)
    assert launch.gate_up_splits(2048, 768, 8, cpu) == (8, 2)
    assert launch.gate_up_splits(4096, 1536, 8, cpu) == (32, 1) and launch.gate_up_splits(7168, 2048, 8, cpu) == (56, 1)
    assert launch.gate_up_splits(4096, 14336, 2, cpu) == (32, 1)
    monkeypatch.setattr(launch, "GATE_UP_SPLITS", 3)
    assert launch.gate_up_splits(4096, 14336, 2, cpu) == (11, 3)
    monkeypatch.setattr(launch, "GATE_UP_SPLITS", 16)
    assert launch.gate_up_splits(640, 256, 2, cpu) == (1, 5)


def test_sass_compiles_both_launches():
    from w4a16.sass.shipped import shipped_cases

    labels = {(c.config.short(), c.dtype) for c in shipped_cases(kernels=("gluon-moe",))}
    assert {("moe-gate_up", "bf16"), ("moe-gate_up split", "fp16"), ("moe-down split", "fp16"),
            ("moe-down", "bf16")} <= labels
