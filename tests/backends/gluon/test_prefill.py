"""The Gluon prefill kernel on the CPU: configs, backend wiring, and every shipped config compiled
for sm_90a with its SASS checked (no spills, HGMMA in both consumers' main loops, no wgmma wait
between consecutive HGMMAs, setmaxnreg present). Correctness and speed need a GPU
(tests/backends/gluon/test_prefill_gpu.py, benchmarks/gluon_prefill_session.py).

tests/conftest.py sets TRITON_INTERPRET=1 on machines without a GPU; ``compile_prefill``
unsets it around the compile."""
import json

import pytest
import torch

from w4a16.backends.base import Problem
from w4a16.backends.gluon.backend import GluonBackend
from w4a16.backends.gluon.decode.config import GluonDecodeConfig
from w4a16.backends.gluon.prefill.config import (NAMED, SMEM_LIMIT, GluonPrefillConfig, prefill_candidates,
                                                  prefill_heuristic)
from w4a16.errors import W4A16Error

LLAMA = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336),
         (10240, 8192), (8192, 8192), (57344, 8192), (8192, 28672)]


def _p(M, N=4096, K=4096, group=128, zeros=False):
    return Problem(M, N, K, group, torch.float16, zeros, torch.device("cpu"))


# ----------------------------------------------------------------------------- configs and wiring
def test_config_validation_and_labels():
    with pytest.raises(W4A16Error):
        GluonPrefillConfig(mt=96)
    with pytest.raises(W4A16Error):
        GluonPrefillConfig(bn=32)
    with pytest.raises(W4A16Error):
        GluonPrefillConfig(maxnreg=224)        # 12 warps x 32 x 224 > 64K registers: would not launch
    with pytest.raises(W4A16Error):
        GluonPrefillConfig(creg=240)           # more than the pool leaves the consumers at 168
    assert GluonPrefillConfig().regs == 168 and GluonPrefillConfig().consumer_regs == 232
    assert GluonPrefillConfig(maxnreg=152).consumer_regs == 208
    assert NAMED["prefill-128"].short() == "p128x64x2c1s4pp"
    assert NAMED["prefill-128-coop"].short() == "p128x64x2c1s4co"
    assert NAMED["prefill-256"].epi_parts == 4 and NAMED["prefill-128"].epi_parts == 1
    assert GluonPrefillConfig(epi=2).short() == "p128x64x2c1s4ppe2"
    assert GluonPrefillConfig(256, 64, 1, 3, hold=False, creg=224).short() == "p256x64x2c1s3ppw0c224"
    labels = [c.short() for c in NAMED.values()]
    assert len(set(labels)) == len(labels)


@pytest.mark.parametrize("N,K", LLAMA)
@pytest.mark.parametrize("M", [65, 256, 1024, 4096, 8192])
def test_heuristic_and_candidates_fit(M, N, K):
    h = prefill_heuristic(M, N, K, 128, 132)
    cands = prefill_candidates(M, N, K, 128, 132)
    assert cands[0] == h and len(set(cands)) == len(cands) >= 4
    for c in cands:
        assert c.smem_bytes(64, 2, True, 32) <= SMEM_LIMIT or c.smem_bytes(64, 2, True, 128) <= SMEM_LIMIT


def b_sms(p):
    from w4a16.backends.device import sms_of
    return sms_of(p.device)


def test_backend_wiring():
    b = GluonBackend()
    assert isinstance(NAMED["prefill-128"], b.config_type) and isinstance(GluonDecodeConfig(), b.config_type)
    for M in (65, 300, 1024, 8192):
        p = _p(M)
        assert b.supports(p) is None
        assert b.default_config(p) == prefill_heuristic(M, 4096, 4096, 128, b_sms(p))
        cands = b.candidates(p)
        assert cands and all(isinstance(c, GluonPrefillConfig) for c in cands) and cands[0] == b.default_config(p)
        assert b.config_supports(cands[0], p) is None
    assert b.supports(_p(1024, group=96)) is not None
    assert b.supports(_p(65536, N=57344)) is not None      # 32-bit output offsets
    assert b.config_supports(NAMED["prefill-128"], _p(64)) is not None
    assert b.config_supports(GluonDecodeConfig(mt=64), _p(65)) is not None
    # decode is unchanged
    assert isinstance(b.default_config(_p(16)), GluonDecodeConfig)
    assert all(isinstance(c, GluonDecodeConfig) for c in b.candidates(_p(64)))
    named = b.named_configs()
    for k, v in NAMED.items():
        assert named[f"gluon-{k}"] is v
    assert "gluon-m16" in named
    for cfg in list(NAMED.values()) + [GluonDecodeConfig(), GluonPrefillConfig(256, 64, 1, 3, hold=False, creg=224)]:
        key = b.config_key(cfg)
        assert b.config_from_key(key) == cfg and type(b.config_from_key(key)) is type(cfg)
    assert "kind" not in json.loads(b.config_key(GluonDecodeConfig()))


def test_named_config_selection():
    """``config="gluon-prefill-128"`` resolves to the gluon backend (which cannot run on this CPU:
    the forced choice falls back to the reference, with the reason)."""
    from w4a16.backends import selection
    names = selection.config_names()
    assert "gluon-prefill-128" in names
    p = _p(1024)
    ch = selection.choose(p, "auto", "gluon-prefill-128")
    assert ch.backend.name in ("gluon", "reference")


# ----------------------------------------------------------------------------- SASS (no GPU needed)
def _gluon_unsupported():
    pytest.importorskip("triton")
    from w4a16.backends.triton_compat import gluon_unsupported
    return gluon_unsupported()


pytestmark_sass = pytest.mark.skipif(bool(_gluon_unsupported()), reason=str(_gluon_unsupported()))


def _compile(cfg, dtype=torch.float16, has_zeros=False, group=128, has_bias=True):
    from w4a16.backends.gluon.offline import compile_prefill, prefill_stats
    k = compile_prefill(cfg, dtype, has_zeros, group, has_bias)
    return prefill_stats(k, cfg, group)


def _check(cfg, dtype=torch.float16, has_zeros=False, group=128, strict=True):
    st = _compile(cfg, dtype, has_zeros, group)
    kh = min(group, 64) if group < 64 else 64
    if group not in (32, 64, 128, 256):
        kh = 64
    assert st["shared_bytes"] <= SMEM_LIMIT, st
    assert st["setmaxnreg"] > 0, st                      # the producer warp gives registers back
    assert st["num_warps"] == 12 and st["registers"] * 12 * 32 <= 65536, st   # it can launch
    assert len(st["main_loops"]) == 2, st                # one K loop per consumer warpgroup
    for L in st["main_loops"]:
        assert L["hgmma"] == 2 * cfg.nch * (kh // 16) * (cfg.bn // 64), (cfg.short(), L)
        assert not L["wait_between_hgmma"], (cfg.short(), L)
    if strict:
        assert st["spills"] == 0, (cfg.short(), st["spills"])
        assert all(L["spills"] == 0 for L in st["main_loops"])
    return st


@pytestmark_sass
@pytest.mark.parametrize("name", sorted(NAMED))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_named_configs_sass(name, dtype):
    cfg = NAMED[name]
    st = _check(cfg, dtype)
    limit = 3.0 if dtype == torch.float16 else 3.3
    for L in st["main_loops"]:
        h = L["histogram"]
        assert L["instr_per_weight"] < limit, (name, L)
        # the dequant: 13 (fp16) / 15 (bf16) instructions per 8 weights, as in the decode kernel
        if dtype == torch.float16:
            deq = h.get("HFMA2", 0) + h.get("LOP3.LUT", 0) + h.get("HADD2", 0) + h.get("SHF.R.U32.HI", 0)
            assert deq / L["weights_per_thread"] <= 1.65, (name, h)
        print(name, dtype, L["instr_per_weight"], dict(list(h.items())[:12]))


@pytestmark_sass
@pytest.mark.parametrize("group", [32, 64, 128, 256, 4096])
@pytest.mark.parametrize("has_zeros", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_groups_and_zeros_sass(group, has_zeros, dtype):
    _check(NAMED["prefill-128"], dtype, has_zeros, group)


@pytestmark_sass
@pytest.mark.parametrize("name", sorted(set(NAMED) - {"prefill-128"}))
@pytest.mark.parametrize("group", [32, 64, 4096])
@pytest.mark.parametrize("has_zeros", [False, True])
def test_groups_and_zeros_other_named(name, group, has_zeros):
    _check(NAMED[name], torch.float16, has_zeros, group)


@pytestmark_sass
def test_candidates_compile():
    """Every candidate compiles without spills, with HGMMA in both K loops and no wait between them."""
    seen = set()
    for N, K in [(28672, 4096), (8192, 28672)]:
        for M in (1024, 4096):
            for cfg in prefill_candidates(M, N, K, 128, 132):
                if cfg in seen:
                    continue
                seen.add(cfg)
                st = _check(cfg, torch.float16, True, 128, strict=True)
                print(cfg.short(), st["registers"], st["shared_bytes"], st["spills"],
                      [L["instr_per_weight"] for L in st["main_loops"]])


@pytestmark_sass
@pytest.mark.parametrize("cfg", [GluonPrefillConfig(128, 64, 1, 4, pingpong=False, splits=2),
                                 GluonPrefillConfig(128, 64, 1, 4, splits=3), GluonPrefillConfig(64, 64, 2, 4, splits=2),
                                 GluonPrefillConfig(128, 64, 1, 4, stream=True),
                                 GluonPrefillConfig(128, 64, 1, 4, pingpong=False, stream=True),
                                 GluonPrefillConfig(64, 64, 2, 4, stream=True)],
                         ids=lambda c: c.short())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_split_k_configs_sass(cfg, dtype):
    """K-split and stream-K prefill configs: the same main loops as without the split (no spills, no
    wait between HGMMAs) and a spill-free split epilogue."""
    _check(cfg, dtype, True, 128, strict=True)


def test_split_k_config_rules():
    assert GluonPrefillConfig(128, 64, 1, 4, splits=2).short().endswith("k2")
    assert GluonPrefillConfig(128, 64, 1, 4, splits=2).epi_parts == 4
    for bad in (dict(mt=256, bn=64, stages=3, splits=2), dict(mt=128, bn=128, stages=3, splits=2), dict(splits=0),
                dict(splits=33)):
        with pytest.raises(W4A16Error, match="splits"):
            GluonPrefillConfig(**bad)
    sk = GluonPrefillConfig(128, 64, 1, 4, stream=True)
    assert sk.short().endswith("sk") and sk.epi_parts == 4 and sk != GluonPrefillConfig(128, 64, 1, 4)
    for bad in (dict(mt=256, bn=64, stages=3, stream=True), dict(mt=128, bn=128, stages=3, stream=True),
                dict(splits=2, stream=True)):
        with pytest.raises(W4A16Error, match="stream"):
            GluonPrefillConfig(**bad)


@pytest.mark.parametrize("tiles,n_k,programs", [(6, 22, 132), (128, 64, 132), (192, 32, 132), (256, 112, 132),
                                                (1, 1, 132), (5, 3, 4), (300, 7, 132), (132, 16, 132)])
def test_stream_runs_deal_every_stage_once(tiles, n_k, programs):
    """Stream-K's runs: at most ``programs`` runs of equal length (the last shorter) that cover
    the tiles' stages once each, and the most pieces of a tile is what the runs cut it into."""
    from w4a16.backends.gluon.prefill.launch import stream_runs

    run, pieces, grid = stream_runs(tiles, n_k, programs)
    total = tiles * n_k
    assert 1 <= grid <= programs and (grid - 1) * run < total <= grid * run
    owner = [min(i // run, grid - 1) for i in range(total)]
    assert owner == sorted(owner) and set(owner) == set(range(grid))
    cut = [len(set(owner[t * n_k:(t + 1) * n_k])) for t in range(tiles)]
    assert pieces == max(cut)


@pytestmark_sass
def test_heuristic_is_a_named_config():
    assert prefill_heuristic(4096, 57344, 8192, 128, 132) is NAMED["prefill-128x128"]
    assert prefill_heuristic(1024, 8192, 28672, 128, 132) is NAMED["prefill-256"]
    assert prefill_heuristic(1024, 6144, 4096, 128, 132) is NAMED["prefill-128-coop"]
    assert prefill_heuristic(256, 4096, 4096, 128, 132) is NAMED["prefill-64"]       # 128 tiles: one wave
    assert prefill_heuristic(128, 8192, 28672, 128, 132) is NAMED["prefill-64"]
    assert prefill_heuristic(256, 6144, 4096, 128, 132) is NAMED["prefill-128-coop"]  # 192 tiles


# ----------------------------------------------------------------------------- host path (no GPU)
@pytestmark_sass
def test_run_prefill_host_path(monkeypatch):
    """run_prefill on CPU tensors up to the launch: the arguments and constexprs it passes are the
    kernel's parameters in signature order (the direct launcher passes them positionally), the grid
    is persistent (min(tiles, SMs)), the tile counts cover M, N and K, and the plan is cached."""
    import types

    from w4a16.backends.gluon.prefill import launch as pl
    from w4a16.backends.gluon.layout import prepare_decode
    from w4a16.backends.gluon.prefill.kernel import w4a16_prefill_kernel

    calls = []
    monkeypatch.setattr(pl, "launch", lambda kernel, grid, args, cx, cfg, static: calls.append(
        (kernel, grid, args, cx, cfg, static)))
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: types.SimpleNamespace(multi_processor_count=132))
    monkeypatch.setattr(torch.Tensor, "get_device", lambda self: 0)
    gen = torch.Generator().manual_seed(3)
    N, K, M = 4100, 1376, 1000
    qw = torch.randint(0, 256, (N, K // 2), dtype=torch.uint8, generator=gen)
    s = (torch.rand(N, K // 32, generator=gen) * 0.01).half()
    z = torch.randint(0, 16, (N, K // 32), generator=gen).half()
    pw = prepare_decode(qw, s, z, 32)
    x = torch.randn(M, K, generator=gen).half()
    for cfg in (NAMED["prefill-128"], GluonPrefillConfig(64, 128, 1, 6), GluonPrefillConfig(128, 64, 1, 4, splits=4)):
        y = pl.run_prefill(x, pw, None, 0.5, cfg)
        assert y.shape == (M, N) and y.dtype == torch.float16
        kernel, grid, args, cx, cfg2, static = calls[-1]
        assert kernel is w4a16_prefill_kernel and cfg2 is cfg
        names = w4a16_prefill_kernel.arg_names
        assert len(args) + len(cx) == len(names) and list(cx) == names[len(args):]
        M_, N_, group, n_k, n_tn, n_tm, n_split, kps, alpha = args[9:]
        assert (M_, N_, group, alpha) == (M, N, 32, 0.5)
        ks = cfg.nch * 2 * 32
        assert n_k * ks >= K > (n_k - 1) * ks
        assert n_tn == -(-N // cfg.rows) and n_tm == -(-M // cfg.mt)
        # K ranges: none empty, together exactly the n_k stages; the counters cover every slice
        assert n_split <= cfg.splits and (n_split - 1) * kps < n_k <= n_split * kps and cx["SPLIT"] == (n_split > 1)
        if n_split > 1:
            assert args[7].numel() == n_split * M * N and args[7].dtype == torch.float32
            assert args[8].dtype == torch.int32 and args[8].numel() >= n_tn * n_tm * 2 * cfg.epi_parts
            assert int(args[8].abs().sum()) == 0
        assert grid == (min(132, n_tn * n_tm * n_split), 1)
        assert cx["BN"] == cfg.bn and cx["MT"] == cfg.mt and cx["HAS_ZEROS"] and not cx["HAS_BIAS"]
        assert cx["CONSUMER_REGS"] == 232 and cx["PRODUCER_REGS"] == 40
        assert args[0].block_shape == [cfg.bn // 16, ks // 32, 256] and args[2].block_shape == [ks // 32, cfg.bn]
        assert args[1].block_shape == [cfg.mt, 32]
    from w4a16.backends.workspace import plans_of
    assert sum(1 for k in plans_of(pw) if k[0] == "prefill") == 3


@pytestmark_sass
def test_run_prefill_host_path_stream_k(monkeypatch):
    """A stream-K config up to the launch: STREAM set and SPLIT not, one program per run of stages
    (``stream_runs``), fp32 partials for the most pieces of a tile and a zeroed counter per slice."""
    import types

    from w4a16.backends.gluon.layout import prepare_decode
    from w4a16.backends.gluon.prefill import launch as pl

    calls = []
    monkeypatch.setattr(pl, "launch", lambda kernel, grid, args, cx, cfg, static: calls.append((grid, args, cx)))
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: types.SimpleNamespace(multi_processor_count=132))
    monkeypatch.setattr(torch.Tensor, "get_device", lambda self: 0)
    gen = torch.Generator().manual_seed(4)
    N, K, M = 200, 1376, 300
    pw = prepare_decode(torch.randint(0, 256, (N, K // 2), dtype=torch.uint8, generator=gen),
                        (torch.rand(N, K // 32, generator=gen) * 0.01).half(), None, 32)
    cfg = GluonPrefillConfig(128, 64, 1, 4, stream=True)
    pl.run_prefill(torch.randn(M, K, generator=gen).half(), pw, None, 1.0, cfg)
    grid, args, cx = calls[-1]
    n_k, n_tn, n_tm, n_split, kps = args[12:17]
    assert cx["STREAM"] and not cx["SPLIT"] and cx["EPI_PARTS"] == 4
    assert (n_tn, n_tm, n_k) == (2, 3, 22)                     # 6 tiles of 22 stages (64 of K each)
    assert (kps, n_split, grid[0]) == (*pl.stream_runs(6, 22, 132)[:2], pl.stream_runs(6, 22, 132)[2])
    assert grid == (132, 1) and kps == 1 and n_split == 22     # one stage per program: 22 pieces a tile
    assert args[7].numel() == n_split * M * N and args[7].dtype == torch.float32
    assert args[8].numel() >= 6 * 2 * 4 and int(args[8].abs().sum()) == 0


def test_direct_launch_with_a_prefill_config(monkeypatch):
    """host.launch compiles with num_warps 4 (the default partition) and maxnreg 168 for a
    prefill config, then goes straight to the compiled launcher."""
    from w4a16.backends.gluon import host

    log = []

    class Compiled:
        function, packed_metadata = "fn", "meta"

        def run(self, *a):
            log.append(("direct", a))

    class Kernel:
        def __getitem__(self, grid):
            def go(*args, **kw):
                log.append(("generic", grid, args, kw))
                return Compiled()
            return go

    monkeypatch.setattr(host, "STATE", host.LaunchState())
    monkeypatch.setattr(torch._C, "_cuda_getDevice", lambda: 0, raising=False)
    monkeypatch.setattr(torch._C, "_cuda_getCurrentRawStream", lambda i: 7, raising=False)
    cfg = NAMED["prefill-128"]
    X = torch.zeros(4)
    args = ("c", "x", "s", "o", X, X, 1000, 4096, 128, 32, 32, 8, 1.0)
    for _ in range(2):
        host.launch(Kernel(), (132, 1), args, {"MT": 128}, cfg, ("prefill", cfg, 64, 4096, 0))
    assert [e[0] for e in log] == ["generic", "direct"]
    assert log[0][3] == {"num_warps": 4, "maxnreg": 168, "enable_fp_fusion": True, "MT": 128}
