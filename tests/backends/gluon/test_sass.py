"""Every shipped Gluon decode config compiles for sm_90a on the CPU (Triton ships ptxas and
cuobjdump), with no spills, HGMMA in the main loop and no wgmma wait between consecutive HGMMAs.

tests/conftest.py sets TRITON_INTERPRET=1 on machines without a GPU; ``compile_decode`` unsets it
around the compile (Gluon kernels never run in the interpreter; compiling them for a CUDA target
needs no GPU)."""
import pytest
import torch

pytest.importorskip("triton")
from w4a16.backends.triton_compat import gluon_unsupported  # noqa: E402

if gluon_unsupported():
    pytest.skip(gluon_unsupported(), allow_module_level=True)

from w4a16.backends.gluon.decode.config import NAMED, GluonDecodeConfig, candidates, heuristic  # noqa: E402
from w4a16.backends.gluon.offline import compile_decode, decode_stats  # noqa: E402


def _check(cfg, dtype, has_zeros, group, split_mode=1):
    k = compile_decode(cfg, dtype, has_zeros, group, has_bias=True, split_mode=split_mode)
    st = decode_stats(k, cfg, group)
    assert st["spills"] == 0, st
    assert st["hgmma"] >= 2 * cfg.nch * (min(group, 64) // 16), st
    assert not st["wait_between_hgmma"], st
    assert st["shared_bytes"] <= 227 * 1024, st
    return st


@pytest.mark.parametrize("name", sorted(NAMED))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_named_configs(name, dtype):
    st = _check(NAMED[name], dtype, False, 128)
    # dequant budget: about 1.6 (fp16) / 1.9 (bf16) instructions per weight, plus the loop's fixed cost
    limit = (2.8 if dtype == torch.float16 else 3.1) + (0 if NAMED[name].ws else 1.0)   # + TMA issue in-loop
    assert st["instr_per_weight"] < limit, st


@pytest.mark.parametrize("group", [32, 64, 128, 256, 4096])
@pytest.mark.parametrize("has_zeros", [False, True])
def test_groups_and_zeros(group, has_zeros):
    _check(heuristic(16, 8192, 8192, group, 132), torch.float16, has_zeros, group, split_mode=0)


@pytest.mark.parametrize("M", [1, 16, 64])
def test_heuristic_and_candidates(M):
    cfgs = {heuristic(M, 57344, 8192, 128, 132)} | set(candidates(M, 57344, 8192, 128, 132))
    for cfg in cfgs:
        _check(cfg, torch.float16, False, 128, split_mode=2 if M == 64 else 1)


def test_single_partition_variant():
    _check(GluonDecodeConfig(mt=16, warps=4, nch=2, stages=4, ws=False), torch.float16, True, 64)


@pytest.mark.parametrize("cfg", [GluonDecodeConfig(8, 4, 2, 4, sk=True), GluonDecodeConfig(16, 4, 2, 5, sk=True),
                                 GluonDecodeConfig(64, 8, 2, 3, sk=True)], ids=lambda c: c.short())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_stream_k_configs(cfg, dtype):
    """The stream-K kernel's main loop is the plain kernel's: same budget, no spills from the
    epilogue that now sits in the consumer partition."""
    st = _check(cfg, dtype, False, 128, split_mode=3)
    assert st["instr_per_weight"] < (2.8 if dtype == torch.float16 else 3.1), st


@pytest.mark.parametrize("group,has_zeros", [(32, True), (64, False), (4096, True)])
def test_stream_k_groups_and_zeros(group, has_zeros):
    _check(GluonDecodeConfig(16, 4, 4 if group == 32 else 2, 4, sk=True), torch.float16, has_zeros, group, split_mode=3)


@pytest.mark.parametrize("cfg", [GluonDecodeConfig(8, 4, 2, 4), GluonDecodeConfig(8, 4, 2, 4, ws=False),
                                 GluonDecodeConfig(16, 4, 2, 4, sk=True)], ids=lambda c: c.short())
def test_programmatic_dependent_launch(cfg):
    """pdl (the default): compiled for a programmatic dependent launch, waiting for the previous
    grid and letting dependents launch (the compiler may duplicate either on several paths);
    without it, neither instruction."""
    import dataclasses
    k = compile_decode(cfg, torch.float16, False, 128)
    ptx = k.asm["ptx"]
    assert k.metadata.launch_pdl
    assert "griddepcontrol.wait" in ptx and "griddepcontrol.launch_dependents" in ptx
    plain = compile_decode(dataclasses.replace(cfg, pdl=False), torch.float16, False, 128)
    assert not plain.metadata.launch_pdl and "griddepcontrol" not in plain.asm["ptx"]


@pytest.mark.parametrize("M", [1, 16])
def test_small_layer_candidates(M):
    """The extra candidates of a small layer (one chunk per stage, fixed program counts for
    stream-K) compile as cleanly as the rest."""
    cfgs = {c for c in candidates(M, 4096, 4096, 128, 132) if c.nch == 1 or (c.sk and c.splits)}
    assert cfgs
    for cfg in cfgs:
        _check(cfg, torch.float16, False, 128)


# the decode configs a Llama-3-8B decoder layer runs at batch 1 and 16 (qkv, o, gate_up, down)
LAYER_SHAPES = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)]


@pytest.mark.parametrize("epi", [1, 2], ids=["silu_mul", "residual"])
@pytest.mark.parametrize("M", [1, 16])
def test_epilogues_leave_the_main_loop_alone(epi, M):
    """SiLU(gate) * up and the residual change the epilogue only: the main loop of every decode
    config a Llama layer picks compiles to the same instructions per weight (within 2%: ptxas
    schedules the loop a little differently), and nothing spills."""
    for N, K in LAYER_SHAPES:
        cfg = heuristic(M, N, K, 128, 132)
        plain = decode_stats(compile_decode(cfg, torch.float16, False, 128, True, 1), cfg, 128)
        st = decode_stats(compile_decode(cfg, torch.float16, False, 128, True, 1, epi=epi), cfg, 128)
        assert st["spills"] == 0, (cfg.short(), st)
        assert st["instr_per_weight"] <= plain["instr_per_weight"] * 1.02, (cfg.short(), st, plain)
