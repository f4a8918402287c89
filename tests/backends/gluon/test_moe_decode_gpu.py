"""The Gluon mixture-of-experts decode kernel (``backends/gluon/moe``) on a Hopper GPU: one token's
expert layer against the reference, every element of a poisoned output, fp16 and bf16, group
sizes 128, 256 and per channel, model-sized and odd expert shapes, k = 1, a choice another rank
owns; deterministic; captured in a CUDA graph; and ``fused_moe`` takes it on Hopper ("auto")."""
import pytest
import torch

from conftest import DEVICE, KERNEL_DTYPES
from w4a16.moe import QuantizedExperts, fused_moe, reference
from w4a16.moe.ops import gluon_refusal, kernel_tensors

pytestmark = pytest.mark.gpu


def _hopper_gluon():
    from w4a16.backends.selection import get

    return DEVICE.type == "cuda" and get("gluon").available(DEVICE) is None


needs_gluon = pytest.mark.skipif(not torch.cuda.is_available() or not _hopper_gluon(),
                                 reason="needs a Hopper GPU whose Triton builds the Gluon kernels")


def _layer(gen, E, I, H, g, dtype):
    gu = QuantizedExperts.quantize(torch.randn(E, 2 * I, H, generator=gen) * H ** -0.5, g, True, dtype).to(DEVICE)
    dn = QuantizedExperts.quantize(torch.randn(E, H, I, generator=gen) * I ** -0.5, g, True, dtype).to(DEVICE)
    return gu, dn


def _route(gen, k, E):
    ids = torch.randperm(E, generator=gen)[:k].reshape(1, k)
    w = torch.rand(1, k, generator=gen) + 0.1
    return ids.to(DEVICE), (w / w.sum()).to(DEVICE)


def _gluon(x, gu, dn, ids, w, out=None):
    """The layer through the kernel's launcher, after checking that fused_moe would take it."""
    from w4a16.backends.gluon.moe.launch import fused_moe_one_token

    (gl, gt), (dl, dt) = kernel_tensors(gu, True), kernel_tensors(dn, False)
    E, I2, H = gu.shape
    dims = [E, I2 // 2, H, gu.group_size_effective, dn.group_size_effective, gl, dl]
    assert gluon_refusal(x, gt[1], gt[2], dt[1], dt[2], 1, dims) is None
    return fused_moe_one_token(x, gt[0], gt[1], dt[0], dt[1], ids, w, E, I2 // 2, H, dims[3], dims[4], out=out)


def _check(y, ref, dtype):
    assert torch.isfinite(y).all()                      # every element written (poisoned with NaN)
    tol = (4e-3 if dtype == torch.float16 else 2e-2) * float(ref.abs().max()) + 1e-3
    err = float((y.float() - ref.float()).abs().max())
    assert err <= tol, f"max error {err} > {tol}"


@needs_gluon
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("E,I,H,k,g", [(16, 768, 2048, 8, 128), (4, 256, 512, 2, 256), (8, 128, 192, 1, -1),
                                       (6, 1024, 384, 3, 128), (3, 192, 128, 3, -1)])
def test_one_token_matches_the_reference(gen, dtype, E, I, H, k, g):
    gu, dn = _layer(gen, E, I, H, g, dtype)
    x = torch.randn(1, H, generator=gen).to(DEVICE, dtype)
    for _ in range(3):
        ids, w = _route(gen, k, E)
        y = torch.full((1, H), float("nan"), dtype=dtype, device=DEVICE)
        _gluon(x, gu, dn, ids, w, out=y)
        _check(y, reference.fused_moe(x, gu, dn, ids, w), dtype)


@needs_gluon
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("E,I,H,k,g,splits", [(16, 768, 2048, 8, 128, 2), (16, 768, 2048, 8, 128, 16),
                                              (6, 1024, 384, 3, 128, 3), (4, 256, 640, 2, -1, 2)])
def test_gate_up_over_k_ranges_matches_the_reference(gen, monkeypatch, dtype, E, I, H, k, g, splits):
    """The gate_up launch with its K split (the last program of a tile sums the gate and up
    partials in order): right, and bitwise the same on a second call (the counters were reset)."""
    from w4a16.backends.gluon.moe import launch

    monkeypatch.setattr(launch, "GATE_UP_SPLITS", splits)
    assert launch.gate_up_splits(H, I, k, DEVICE)[1] == min(splits, -(-H // 128))
    gu, dn = _layer(gen, E, I, H, g, dtype)
    x = torch.randn(1, H, generator=gen).to(DEVICE, dtype)
    ids, w = _route(gen, k, E)
    ids[0, -1] = E                                      # a choice of another rank: zero partials, still counted
    y = torch.full((1, H), float("nan"), dtype=dtype, device=DEVICE)
    _gluon(x, gu, dn, ids, w, out=y)
    _check(y, reference.fused_moe(x, gu, dn, ids, w), dtype)
    assert torch.equal(y, _gluon(x, gu, dn, ids, w))


@needs_gluon
def test_a_choice_another_rank_owns_contributes_nothing(gen):
    dtype, E, I, H = torch.bfloat16, 8, 128, 256
    gu, dn = _layer(gen, E, I, H, 128, dtype)
    x = torch.randn(1, H, generator=gen).to(DEVICE, dtype)
    ids, w = _route(gen, 4, E)
    ids[0, 1] = E                       # transformers' mark for a choice of another rank
    ids[0, 3] = -1
    y = _gluon(x, gu, dn, ids, w)
    _check(y, reference.fused_moe(x, gu, dn, ids, w), dtype)
    keep = torch.tensor([[0, 2]], device=DEVICE)
    _check(y, reference.fused_moe(x, gu, dn, ids.gather(1, keep), w.gather(1, keep)), dtype)


@needs_gluon
def test_deterministic_and_the_same_as_the_triton_kernels(gen):
    dtype, E, I, H, k = torch.float16, 64, 1536, 4096, 8      # the down projection splits K here
    gu, dn = _layer(gen, E, I, H, 128, dtype)
    x = torch.randn(1, H, generator=gen).to(DEVICE, dtype)
    ids, w = _route(gen, k, E)
    a, b = _gluon(x, gu, dn, ids, w), _gluon(x, gu, dn, ids, w)
    assert torch.equal(a, b)
    _check(a, fused_moe(x, gu, dn, ids, w, backend="triton"), dtype)


@needs_gluon
@pytest.mark.parametrize("backend", ["gluon", "auto"])
def test_fused_moe_takes_it_and_a_graph_replays_it(gen, backend):
    from w4a16.backends.gluon.host import STATE
    from w4a16.moe import ops

    dtype, E, I, H, k = torch.bfloat16, 16, 384, 1024, 4
    gu, dn = _layer(gen, E, I, H, 128, dtype)
    x = torch.randn(1, H, generator=gen).to(DEVICE, dtype)
    ids, w = _route(gen, k, E)
    STATE.last = None
    fused_moe(x, gu, dn, ids, w, backend=backend)          # the first call prepares the weights and compiles
    ran = STATE.last is not None and "moe" in getattr(STATE.last[0], "name", "moe")
    assert ran == (backend == "gluon" or ops.AUTO_TAKES_GLUON)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = fused_moe(x, gu, dn, ids, w, backend=backend)
    for _ in range(3):
        new_ids, new_w = _route(gen, k, E)
        ids.copy_(new_ids)
        w.copy_(new_w)
        graph.replay()
        _check(y, reference.fused_moe(x, gu, dn, ids, w), dtype)
