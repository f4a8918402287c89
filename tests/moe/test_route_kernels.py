"""The MoE layer's small kernels and tiles: the one-launch align kernel and the two-launch one of
prefill give torch's grouped order element for element (random routings over several chunks, ids
out of range, experts with no slots, E not a power of two) and compile for sm_90a; the combine
kernel sums each token's routed rows and skips the others, even when those rows hold NaN; the
gate_up kernel's SiLU*up epilogue and every tile shape the heuristic can pick match the reference
on a poisoned output."""
import pytest
import torch

from conftest import DEVICE
from w4a16.backends.triton import moe as kernel
from w4a16.backends.triton import moe_route
from w4a16.moe import QuantizedExperts, reference
from w4a16.moe.routing import align


@pytest.fixture
def poisoned_empty(monkeypatch):
    """moe_route's torch.empty fills what it allocates with -7 (a cell the kernels leave unwritten
    then differs from torch's order)."""
    real = torch.empty

    def empty(*args, **kwargs):
        return real(*args, **kwargs).fill_(-7)
    monkeypatch.setattr(moe_route.torch, "empty", empty)


def _assert_same_order(got, want):
    assert torch.equal(got.sorted_slots.cpu(), want.sorted_slots.cpu())
    assert torch.equal(got.block_expert.cpu(), want.block_expert.cpu())
    assert (got.block_m, got.slots) == (want.block_m, want.slots)


def _ids(gen, T, k, E):
    return torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(T)]).to(DEVICE)


@pytest.mark.parametrize("T,k,E,bm", [(1, 8, 128, 16), (16, 8, 128, 16), (50, 2, 8, 16), (33, 3, 7, 64),
                                      (200, 1, 5, 64), (9, 4, 300, 16)])
def test_align_kernel_equals_torch_align(gen, T, k, E, bm):
    ids = _ids(gen, T, k, E)
    ids[0, 0] = E                      # another rank's choice
    if T > 2:
        ids[2, -1] = -1
    got, want = moe_route.align(ids, E, bm), align(ids, E, bm)
    _assert_same_order(got, want)


@pytest.mark.parametrize("T,k,E,bm", [(2048, 8, 128, 64), (300, 8, 256, 128), (1500, 1, 5, 128), (700, 2, 7, 64),
                                      (130, 8, 128, 16), (3, 2, 4, 16)])
def test_wide_align_kernels_equal_torch_align(gen, poisoned_empty, T, k, E, bm):
    """The two-launch align of prefill (several chunks of slots, the last one partial; ids out of
    range; experts with no slots; few slots too) gives torch's order, every cell written (its
    buffers start poisoned)."""
    ids = _ids(gen, T, k, E)
    ids[0, 0] = E
    if T > 2:
        ids[2, -1] = -1
    got, want = moe_route.align_wide(ids, E, bm), align(ids, E, bm)
    _assert_same_order(got, want)


def test_wide_align_all_slots_on_one_expert(poisoned_empty):
    ids = torch.full((1300, 1), 2, device=DEVICE)
    got, want = moe_route.align_wide(ids, 4, 64), align(ids, 4, 64)
    _assert_same_order(got, want)


def test_align_kernel_all_slots_on_one_expert():
    ids = torch.full((70, 1), 2, device=DEVICE)
    got, want = moe_route.align(ids, 4, 16), align(ids, 4, 16)
    _assert_same_order(got, want)


def test_combine_sums_routed_rows_and_skips_the_rest(gen):
    T, k, E, H = 5, 3, 4, 40
    ids = _ids(gen, T, k, E)
    ids[1, 2] = E
    ids[3, 0] = -1
    ys = torch.randn(T * k, H, generator=gen).to(DEVICE)
    ys[1 * k + 2] = float("nan")       # rows of skipped choices are never written: garbage
    ys[3 * k + 0] = float("nan")
    y = moe_route.combine(ys, ids, E, torch.float16)
    ok = ((ids >= 0) & (ids < E)).reshape(-1, 1).float()
    want = (torch.nan_to_num(ys) * ok).reshape(T, k, H).sum(1)
    assert y.dtype == torch.float16 and torch.isfinite(y).all()
    torch.testing.assert_close(y.float(), want, rtol=2e-3, atol=2e-3)


def _experts(gen, E, N, K, g, zeros):
    return QuantizedExperts.quantize(torch.randn(E, N, K, generator=gen), g, not zeros, torch.float16).to(DEVICE)


@pytest.mark.parametrize("g,zeros", [(32, False), (128, True), (-1, False)])
@pytest.mark.parametrize("bm", [16, 64])
def test_silu_mul_epilogue_matches_reference(gen, g, zeros, bm):
    E, I, H, T, k = 6, 48, 128, 9, 2
    gu = _experts(gen, E, 2 * I, H, g, zeros)
    ids = _ids(gen, T, k, E)
    x = torch.randn(T, H, generator=gen).to(DEVICE, torch.float16)
    r = align(ids, E, bm)
    out = torch.full((T * k, I), float("nan"), dtype=torch.float16, device=DEVICE)
    kernel.grouped_gemm(x, gu, r, k, True, out, silu_mul=True)
    want = reference.silu_mul(reference.grouped_gemm(x, gu, ids).to(torch.float16))
    assert torch.isfinite(out).all()
    assert float((out.float() - want.float()).norm() / want.float().norm()) < 3e-3


@pytest.mark.parametrize("tile", [kernel.MoeTile(16, 128, 4, 4), kernel.MoeTile(32, 64, 4, 2),
                                  kernel.MoeTile(64, 32, 4, 3), kernel.MoeTile(128, 64, 8, 3)])
@pytest.mark.parametrize("bm", [16, 64])
def test_every_tile_matches_reference(gen, tile, bm):
    E, N, K, T, k = 4, 80, 256, 21, 2
    ex = _experts(gen, E, N, K, 64 if tile.block_k <= 64 else 128, True)
    ids = _ids(gen, T, k, E)
    x = torch.randn(T, K, generator=gen).to(DEVICE, torch.float16)
    w = torch.rand(T, k, generator=gen).to(DEVICE)
    out = torch.full((T * k, N), float("nan"), dtype=torch.float32, device=DEVICE)
    kernel.grouped_gemm(x, ex, align(ids, E, bm), k, True, out, w.reshape(-1), tile=tile)
    want = reference.grouped_gemm(x, ex, ids, True, w)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, want, rtol=2e-3, atol=2e-2)


def test_a_tile_whose_k_step_crosses_groups_is_refused(gen):
    from w4a16.errors import W4A16Error

    ex = _experts(gen, 2, 16, 64, 32, False)
    ids = _ids(gen, 3, 1, 2)
    out = torch.empty(3, 16, device=DEVICE)
    with pytest.raises(W4A16Error, match="tile.block_k: expected a divisor of the group size 32, got 64"):
        kernel.grouped_gemm(torch.randn(3, 64, device=DEVICE, dtype=torch.float16), ex, align(ids, 2, 16), 1, True,
                            out, tile=kernel.MoeTile(16, 64, 4, 3))


@pytest.mark.parametrize("block_m,silu,G,one,want", [
    (16, True, 128, False, kernel.MoeTile(32, 128, 4, 3)),          # decode gate_up
    (16, False, 128, False, kernel.MoeTile(64, 128, 4, 3)),         # decode down
    (16, False, 32, False, kernel.MoeTile(64, 32, 4, 3)),           # the K step stays inside a group
    (64, True, 128, False, kernel.MoeTile(64, 64, 4, 3)),
    (128, False, 4096, True, kernel.MoeTile(128, 64, 4, 3))])
def test_tile_heuristic(block_m, silu, G, one, want):
    assert kernel.tile_for(block_m, silu, G, one) == want


def test_one_token_runs_without_grouping(gen):
    """T = 1 takes the direct routing (no align launch): block b is slot b; a repeated expert and
    ids outside [0, E) are handled as by the reference; every routed row of a poisoned output is
    written, the skipped one is not."""
    from w4a16.moe import fused_moe
    from w4a16.moe.routing import direct

    E, I, H = 8, 64, 64
    gu, dn = _experts(gen, E, 2 * I, H, 32, False), _experts(gen, E, H, I, 32, False)
    x = torch.randn(1, H, generator=gen).to(DEVICE, torch.float16)
    ids = torch.tensor([[3, 3, 9, 0, -1]], device=DEVICE)
    w = torch.rand(1, 5, generator=gen).to(DEVICE)
    r = direct(ids)
    assert r.direct and r.slots == 5 and r.block_expert.numel() == 5
    out = torch.full((5, I), float("nan"), dtype=torch.float16, device=DEVICE)
    kernel.grouped_gemm(x, gu, r, 5, True, out, silu_mul=True)
    want = reference.silu_mul(reference.grouped_gemm(x, gu, ids).to(torch.float16))
    written = torch.tensor([True, True, False, True, False], device=DEVICE)
    assert torch.isfinite(out[written]).all() and torch.isnan(out[~written]).all()
    assert float((out[written].float() - want[written].float()).norm() / want[written].float().norm()) < 3e-3
    y = fused_moe(x, gu, dn, ids, w, backend="triton")
    ref = reference.fused_moe(x, gu, dn, ids, w)
    assert float((y.float() - ref.float()).norm() / ref.float().norm()) < 3e-3


def test_route_kernels_compile_for_sm90a():
    """The align kernels compile for sm_90a with the installed Triton, launched as their launches
    are (``offline.compile_route_kernels``; a worker process started without Triton's
    interpreter, which runs them on a CPU but does not lower them; no GPU needed)."""
    from kernel_cases import run_offline

    out = run_offline("from w4a16.backends.triton.offline import compile_route_kernels; "
                      "print('compiled', len(compile_route_kernels()))")
    assert "compiled 3" in out, out
