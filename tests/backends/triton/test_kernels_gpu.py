"""Kernel correctness on a CUDA GPU: the full option matrix, bf16, CUDA graphs, determinism."""
import pytest
import torch

pytestmark = pytest.mark.gpu   # selected by: pytest -m gpu tests

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # tests/: kernel_cases
from kernel_cases import check_gemm, identity_probe, make_weight, rel_err  # noqa: E402

import w4a16  # noqa: E402
from w4a16.config import GemmConfig  # noqa: E402

DTYPES = [torch.float16, torch.bfloat16]
CONFIGS = ["auto", "128", "64", "decode", GemmConfig("splitk", 16, 64, split_k=4, dequant="portable"),
           GemmConfig("splitk", 16, 128, split_k=3, swap_ab=False, unroll=2),
           GemmConfig("tile", 128, 128, num_warps=8, num_stages=3, prefetch=False),
           GemmConfig("tile", 256, 128, num_warps=8, num_stages=3, prefetch=False, wide_scales=True),
           GemmConfig("splitk", 16, 128, split_k=3, num_stages=1, unroll=2, scale_after=True),
           GemmConfig("splitk", 32, 64, split_k=5, wide_scales=True, prefetch=False),
           GemmConfig("tile", 64, 128, num_warps=4, num_stages=4, dequant="portable")]
SHAPES = [(1, 72, 576), (3, 200, 1376), (17, 72, 4096), (100, 200, 576), (257, 72, 1376), (16, 200, 14336)]


def _group_ok(K, g):
    return g == -1 or K % g == 0


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
@pytest.mark.parametrize("zeros", [None, "int", "float"])
@pytest.mark.parametrize("group_size", [32, 64, 128, 256, -1])
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c if isinstance(c, str) else c.short())
def test_matrix(dtype, zeros, group_size, config):
    for i, (M, N, K) in enumerate(SHAPES):
        if _group_ok(K, group_size):
            check_gemm(M, N, K, group_size, zeros, dtype, "cuda", config=config,
                       bias=i % 2 == 0, alpha=1.0 if i % 3 else 0.5, seed=i)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
@pytest.mark.parametrize("config", ["128", "decode"])
def test_identity_probe(dtype, config):
    identity_probe(1024, 256, 128, "int", dtype, "cuda", config=config)
    identity_probe(512, 96, 32, None, dtype, "cuda", config=config)


@pytest.mark.parametrize("deterministic", [True, False])
def test_cuda_graph_replay_matches_eager(deterministic):
    qw = make_weight(4096, 4096, 128, None, torch.float16, "cuda")
    x = torch.randn(16, 4096, device="cuda", dtype=torch.float16)
    w4a16.gemm(x, qw, deterministic=deterministic)  # compile + prepare outside capture
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y = w4a16.gemm(x, qw, deterministic=deterministic)
    for _ in range(3):
        x.copy_(torch.randn_like(x))
        g.replay()
        torch.cuda.synchronize()
        eager = w4a16.gemm(x, qw, deterministic=deterministic)
        if deterministic:
            assert torch.equal(y, eager)
        else:
            torch.testing.assert_close(y, eager, rtol=1e-3, atol=1e-3)


def test_deterministic_is_bitwise_reproducible():
    qw = make_weight(8192, 8192, 128, "int", torch.bfloat16, "cuda")
    x = torch.randn(4, 8192, device="cuda", dtype=torch.bfloat16)
    cfg = GemmConfig("splitk", 16, 64, split_k=16)
    first = w4a16.gemm(x, qw, config=cfg, deterministic=True)
    for _ in range(5):
        assert torch.equal(first, w4a16.gemm(x, qw, config=cfg, deterministic=True))


@pytest.mark.parametrize("backend,M", [("auto", 8), ("triton", 8), ("gluon", 8), ("gluon", 300), ("triton", 300)])
def test_kernel_info_reports_resources(backend, M):
    qw = make_weight(4096, 4096, 128, None, torch.float16, "cuda")
    x = torch.randn(M, 4096, device="cuda", dtype=torch.float16)
    info = w4a16.kernel_info(x, qw, backend=backend)
    assert backend == "auto" or info.backend == backend
    assert info.registers > 0 and info.blocks_per_sm >= 1 and info.spills >= 0 and info.num_warps >= 4
    assert len(info.grid) >= 1 and all(g >= 1 for g in info.grid)


@pytest.mark.parametrize("config", ["decode", "128"])
def test_cached_launch_with_misaligned_x(config):
    """The second call of a shape takes the cached launcher; an x that is not 16-byte aligned must
    get its own compiled kernel, not the aligned one."""
    from w4a16.backends.triton.launch import _GEMM

    qw = make_weight(256, 1024, 128, "int", torch.float16, "cuda")
    base = torch.randn(33 * 1024 + 1, device="cuda", dtype=torch.float16)
    aligned, shifted = base[:33 * 1024].view(33, 1024), base[1:].view(33, 1024)
    assert shifted.is_contiguous() and shifted.data_ptr() % 16 != 0
    compiled = []
    for x in (aligned, aligned, shifted, shifted):
        y = w4a16.gemm(x, qw, config=config)
        assert rel_err(y.cpu(), w4a16.reference.gemm(x.cpu(), qw.to("cpu"))) <= 2e-3
        compiled.append(len(_GEMM._compiled))
    assert compiled[1] == compiled[0] and compiled[2] > compiled[1] and compiled[3] == compiled[2], compiled
