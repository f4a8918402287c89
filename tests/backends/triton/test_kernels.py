"""The Triton kernels in Triton's CPU interpreter (fp16; bf16 dots are checked on the GPU)."""
import os

import pytest
import torch

from kernel_cases import check_gemm, identity_probe, rel_err

import w4a16
from w4a16.config import GemmConfig

pytestmark = pytest.mark.skipif(
    torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") != "1",
    reason="CPU interpreter tests (TRITON_INTERPRET=1, no GPU); the GPU tests (pytest -m gpu) cover the GPU")
triton = pytest.importorskip("triton")

SMALL = [GemmConfig("tile", 16, 32, num_warps=4, num_stages=2),
         GemmConfig("splitk", 16, 16, split_k=3, num_warps=4, num_stages=2)]


@pytest.mark.parametrize("group_size", [32, 64, 128, 256, -1])
@pytest.mark.parametrize("zeros", [None, "int", "float"])
def test_group_sizes_and_zeros(group_size, zeros):
    check_gemm(3, 40, 512, group_size, zeros, torch.float16, "cpu", config=SMALL[0], alpha=0.75)


@pytest.mark.parametrize("M,N,K,g", [(1, 72, 576, 64), (17, 200, 1376, 32), (3, 72, 576, -1),
                                     (20, 33, 256, 128), (0, 16, 128, 128)])
@pytest.mark.parametrize("cfg", SMALL + ["auto"], ids=["tile", "splitk", "auto"])
def test_odd_shapes(M, N, K, g, cfg):
    check_gemm(M, N, K, g, "int", torch.float16, "cpu", config=cfg, bias=M % 2 == 1)


@pytest.mark.parametrize("cfg", [GemmConfig("tile", 16, 32, num_warps=4, num_stages=2, prefetch=False),
                                 GemmConfig("splitk", 16, 16, split_k=2, swap_ab=False, unroll=2, prefetch=False)],
                         ids=["tile", "splitk-noswap-u2"])
@pytest.mark.parametrize("group_size,zeros", [(32, "float"), (64, None), (-1, "int")])
def test_scales_loaded_in_loop(cfg, group_size, zeros):
    check_gemm(5, 40, 576, group_size, zeros, torch.float16, "cpu", config=cfg, bias=True, alpha=0.5)


@pytest.mark.parametrize("deterministic", [True, False])
def test_split_k_modes(deterministic):
    check_gemm(5, 48, 1024, 128, None, torch.float16, "cpu", config=SMALL[1], deterministic=deterministic)


def test_deterministic_split_k_is_bitwise_repeatable():
    a = check_gemm(4, 32, 768, 64, None, torch.float16, "cpu", config=SMALL[1], seed=3)
    b = check_gemm(4, 32, 768, 64, None, torch.float16, "cpu", config=SMALL[1], seed=3)
    assert torch.equal(a, b)


def test_leading_dims_and_perm():
    qw = w4a16.quantize(torch.randn(24, 256), 64)
    perm = torch.randperm(256)
    qp = w4a16.QuantizedWeight.from_plain(qw.qweight, qw.scales, None, 64, perm=perm)
    x = torch.randn(2, 3, 256).half()
    y = w4a16.gemm(x, qp, config=SMALL[0])
    ref = w4a16.reference.gemm(x, qp)
    assert y.shape == (2, 3, 24)
    assert rel_err(y, ref) <= 2e-3


@pytest.mark.parametrize("group_size,zeros", [(32, None), (128, "int"), (-1, None)])
def test_identity_probe_through_kernel(group_size, zeros):
    identity_probe(256, 32, group_size, zeros, torch.float16, "cpu", config=SMALL[0])


@pytest.mark.parametrize("cfg", [GemmConfig("splitk", 16, 16, split_k=2, wide_scales=True, prefetch=False),
                                 GemmConfig("splitk", 16, 32, split_k=3, num_stages=1, unroll=2),
                                 GemmConfig("tile", 16, 64, num_warps=4, num_stages=2, prefetch=False,
                                            wide_scales=True),
                                 GemmConfig("splitk", 16, 32, split_k=2, swap_ab=False, wide_scales=True),
                                 GemmConfig("splitk", 16, 32, split_k=2, num_stages=1, unroll=2, scale_after=True),
                                 GemmConfig("splitk", 16, 16, split_k=3, swap_ab=False, scale_after=True,
                                            wide_scales=True, prefetch=False)],
                         ids=["splitk-s32", "splitk-s1-u2", "tile-s32", "noswap-s32", "scale-after",
                              "noswap-scale-after-s32"])
@pytest.mark.parametrize("M,N,K,group_size,zeros", [(5, 40, 576, 32, "float"), (3, 72, 640, 128, None),
                                                    (2, 48, 512, -1, "int"), (4, 64, 512, 256, "int")])
def test_schedule_options_and_odd_n(cfg, M, N, K, group_size, zeros):
    """wide_scales, scale_after, one-stage loops and N not a multiple of 16 (padded fragment
    blocks); g = 32 (64-wide chunks), g = 256, per-channel, zero points."""
    check_gemm(M, N, K, group_size, zeros, torch.float16, "cpu", config=cfg, bias=True, alpha=0.5)


def test_row_blocks_below_int32_offsets(monkeypatch):
    """Above 2**31 elements of x or y the launcher runs row blocks; shrink the limit to see it."""
    import w4a16.backends.triton.launch as launch
    monkeypatch.setattr(launch, "INT32_LIMIT", 64 * 256 + 5)  # 64-row blocks for K = 256
    qw = w4a16.quantize(torch.randn(40, 256), 64)
    x = torch.randn(150, 256).half()
    bias = torch.randn(80).half()[::2]  # non-contiguous: gemm copies it
    y = w4a16.gemm(x, qw, bias, config=SMALL[0])
    assert rel_err(y, w4a16.reference.gemm(x, qw, bias.contiguous())) <= 2e-3


def test_row_blocks_count_split_k_partials(monkeypatch):
    """The split-K partials [splits, M, N] are indexed with 32-bit offsets too: row blocks shrink."""
    import w4a16.backends.triton.launch as launch
    monkeypatch.setattr(launch, "INT32_LIMIT", 2 * 160 * 64 + 1)  # 2 splits x 64 rows x N = 160
    blocks = []
    real = launch.launch_gemm_compiled
    monkeypatch.setattr(launch, "launch_gemm_compiled",
                        lambda x, *a, **k: blocks.append(x.shape[0]) or real(x, *a, **k))
    qw = w4a16.quantize(torch.randn(160, 256), 64)
    x = torch.randn(150, 256).half()
    cfg = GemmConfig("splitk", 16, 32, split_k=2)
    y = launch.launch_gemm(x, w4a16.prepare(qw), None, 1.0, cfg)
    assert blocks[1:] == [64, 64, 22]  # without the partials: 80-row blocks (the K limit)
    assert rel_err(y, w4a16.reference.gemm(x, qw)) <= 2e-3


def test_split_k_leaves_its_tile_counters_at_zero():
    """The last program of each tile sums the partials and resets the tile's counter for the next call."""
    from w4a16.backends import workspace
    cfg = GemmConfig("splitk", 16, 16, split_k=3)
    for _ in range(2):
        check_gemm(5, 40, 768, 128, None, torch.float16, "cpu", config=cfg, bias=True)
    used = [buf for key, buf in workspace._COUNTERS.items() if key[0] == "cpu"]
    assert used and all(int(buf.abs().sum()) == 0 for buf in used)


def test_a_hopper_launch_runs_the_unswapped_twin_of_a_hazardous_config(monkeypatch):
    """On sm_90 a pipelined swapped config with the scales before the MMA runs as
    ``GemmConfig.for_wgmma`` says (unswapped): the launch plan's constexprs say so, and the
    result is still the reference's (the interpreter stands in for the GPU)."""
    import w4a16.backends.triton.launch as launch
    monkeypatch.setattr(launch, "uses_wgmma", lambda device: True)
    cfg = GemmConfig("tile", 256, 32, num_warps=4, num_stages=3)
    assert cfg.swap_ab and cfg.for_wgmma() == GemmConfig("tile", 256, 32, num_warps=4, num_stages=2, swap_ab=False)
    qw = w4a16.quantize(torch.randn(64, 256), 64)
    pw = w4a16.prepare(qw)
    plan = launch.launch_plan(pw, 20, cfg, False, False, torch.float16)
    assert plan[4]["SWAP_AB"] is False and plan[5][2] == 2           # constexprs and the stages of the twin
    bound = launch.BoundGemm(pw, 20, torch.float16, False, 1.0, cfg, True)
    assert bound.cfg == cfg.for_wgmma()                                # what the launch passes Triton
    x = torch.randn(20, 256).half()
    out = torch.full((20, 64), float("nan"), dtype=torch.float16)
    launch.launch_gemm(x, pw, None, 1.0, cfg, out=out)
    assert not torch.isnan(out).any() and rel_err(out, w4a16.reference.gemm(x, qw)) <= 2e-3
