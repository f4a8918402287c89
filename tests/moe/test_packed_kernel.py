"""The grouped kernel over the experts' layout-2 copy (``w4a16.backends.triton.moe_packed``) against
the reference, every element, on a poisoned output: each launch shape (swapped or not, scales
before or after the MMA, 16..128 columns, pipelined or not), one token (direct routing), decode
and prefill block sizes, gather or not, SiLU*up or the routing weights, K not a multiple of the
chunk, group sizes 32, 64, 128 and per channel, zero points. Then the storage: the packed copy
is the only copy of the codes, and edits through ``qweight``, ``scales`` and ``.data`` reach the
next call; a module saved after its first call loads into another and gives the same result."""
import pytest
import torch

from conftest import DEVICE, KERNEL_DTYPES
from w4a16.backends.selection import get
from w4a16.backends.triton import moe_packed
from w4a16.backends.triton.moe_packed import PackedTile, packable, packed_tile_for, split_for, tile_refusal
from w4a16.backends.triton.moe_route import combine
from w4a16.errors import W4A16Error
from w4a16.moe import QuantizedExperts, W4A16Experts, align, fused_moe, grouped_gemm, reference
from w4a16.moe.ops import block_m_for, kernel_tensors
from w4a16.moe.routing import direct

TILES = [None, PackedTile(16, True, True, 1, 3), PackedTile(32, True, False, 2, 1),
         PackedTile(64, False, False, 4, 1), PackedTile(128, True, True, 8, 3)]


def _experts(gen, E, N, K, g, zeros, dtype, std=1.0):
    return QuantizedExperts.quantize(torch.randn(E, N, K, generator=gen) * std, g, not zeros, dtype).to(DEVICE)


def _ids(gen, T, k, E):
    ids = torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(T)]).to(DEVICE)
    w = torch.rand(T, k, generator=gen).to(DEVICE) + 0.1
    return ids, w


def _expected(x, ex, ids, gather, w, silu_mul, dtype):
    """The reference rows [T*k, N] (SiLU(gate) * up of the rounded halves with silu_mul)."""
    y = reference.grouped_gemm(x, ex, ids, gather, None if silu_mul else w)
    if not silu_mul:
        return y.float()
    gate, up = y.to(dtype).float().chunk(2, dim=1)
    return torch.nn.functional.silu(gate) * up


def _assert_every_element(out, ref, dtype):
    assert torch.isfinite(out).all()                      # every element written (poisoned with NaN)
    tol = (2e-3 if dtype == torch.float16 else 1e-2) * float(ref.abs().max()) + 1e-3
    err = (out.float() - ref).abs()
    assert float(err.max()) <= tol, f"max error {float(err.max())} > {tol}"


@pytest.mark.parametrize("tile", TILES, ids=lambda t: "auto" if t is None else t.short())
@pytest.mark.parametrize("T,k,E,gather,silu_mul", [(1, 4, 6, True, True), (7, 2, 4, True, False),
                                                   (40, 2, 2, False, False), (5, 3, 4, True, True)])
def test_packed_kernel_matches_reference(gen, tile, T, k, E, gather, silu_mul):
    dtype, K, g, zeros = torch.float16, 192, 64, T % 2 == 1
    N = 64
    ex = _experts(gen, E, N, K, g, zeros, dtype)
    ids, w = _ids(gen, T, k, E)
    x = torch.randn(T if gather else T * k, K, generator=gen).to(DEVICE, dtype)
    S = T * k
    routing = direct(ids) if T == 1 else align(ids, E, block_m_for(S, E))
    n_out = N // 2 if silu_mul else N
    out = torch.full((S, n_out), float("nan"), dtype=dtype if silu_mul else torch.float32, device=DEVICE)
    tw = None if silu_mul else w.reshape(-1).float()
    pw = ex.weight.prepared(get("triton"))
    moe_packed.grouped_gemm(x, pw, E, routing, k, gather, out, tw, silu_mul=silu_mul, tile=tile)
    _assert_every_element(out, _expected(x, ex, ids, gather, w, silu_mul, dtype), dtype)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("g,zeros", [(32, False), (128, True), (-1, False), (-1, True)])
def test_fused_layer_on_packed_experts_matches_reference(gen, dtype, g, zeros):
    E, I, H, T, k = 4, 128, 128, 6, 2
    gu, dn = _experts(gen, E, 2 * I, H, g, zeros, dtype), _experts(gen, E, H, I, g, zeros, dtype)
    assert kernel_tensors(gu, True)[0] == 2 and kernel_tensors(dn, False)[0] == 2
    x = torch.randn(T, H, generator=gen).to(DEVICE, dtype)
    ids, w = _ids(gen, T, k, E)
    y = fused_moe(x, gu, dn, ids, w, backend="triton")
    ref = reference.fused_moe(x, gu, dn, ids, w)
    _assert_every_element(y, ref.float(), dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("T", [16, 128, 512])
def test_fused_layer_at_every_block_size_on_model_sized_experts(gen, dtype, T):
    """Qwen3-30B-A3B's expert sizes (H 2048, I 768) with 16 experts, 8 per token: block_m 16, 64
    and 128 (T = 16, 128, 512), three routings each. A down tile the kernel now refuses computed NaN
    here at block_m 64 in fp16 on an H100, and right in the interpreter. Weights of std 1/sqrt(K)
    keep the layer's values far from fp16's range at these K."""
    E, I, H, k = 16, 768, 2048, 8
    gu = _experts(gen, E, 2 * I, H, 128, False, dtype, H ** -0.5)
    dn = _experts(gen, E, H, I, 128, False, dtype, I ** -0.5)
    x = torch.randn(T, H, generator=gen).to(DEVICE, dtype)
    for _ in range(3):
        ids, w = _ids(gen, T, k, E)
        y = fused_moe(x, gu, dn, ids, w, backend="triton")
        _assert_every_element(y, reference.fused_moe(x, gu, dn, ids, w).float(), dtype)


@pytest.mark.parametrize("splits", [2, 3])
def test_split_k_planes_sum_to_the_rows_and_combine_sums_them(gen, splits):
    """Down projections with few programs split K: each plane holds a partial sum over its chunks
    (every element written), the planes sum to the whole rows, and the combine kernel adds them in
    order into each token's output."""
    dtype, E, N, K, T, k = torch.float16, 4, 48, 640, 3, 2
    ex = _experts(gen, E, N, K, 128, False, dtype)
    ids, w = _ids(gen, T, k, E)
    a = torch.randn(T * k, K, generator=gen).to(DEVICE, dtype)
    routing = align(ids, E, 16)
    out = torch.full((splits, T * k, N), float("nan"), dtype=torch.float32, device=DEVICE)
    moe_packed.grouped_gemm(a, ex.weight.prepared(get("triton")), E, routing, k, False, out, w.reshape(-1).float(),
                            splits=splits)
    ref = _expected(a, ex, ids, False, w, False, dtype)
    _assert_every_element(out.sum(0), ref, dtype)
    assert float((out[0] - ref).abs().max()) > 1e-2          # a plane is a part, not the whole
    y = combine(out, ids, E, torch.float32)
    _assert_every_element(y, ref.reshape(T, k, N).sum(1), dtype)


def test_split_rule():
    """About four programs per SM, at least 8 chunks a split, at most 8 splits."""
    assert split_for(2 * 64, 112, 132) == 5 and split_for(600, 112, 132) == 1
    assert split_for(8, 112, 132) == 8 and split_for(8, 12, 132) == 1


def test_a_decode_tile_without_scale_after_and_with_a_pipeline_is_refused(gen):
    ex = _experts(gen, 2, 32, 128, 32, False, torch.float16)
    ids, w = _ids(gen, 2, 1, 2)
    out = torch.empty(2, 32, device=DEVICE)
    with pytest.raises(W4A16Error, match="tile: expected scale_after with a pipeline"):
        moe_packed.grouped_gemm(torch.zeros(2, 128, dtype=torch.float16, device=DEVICE), ex.weight.prepared(get("triton")),
                                2, align(ids, 2, 16), 1, True, out, tile=PackedTile(64, True, False, 4, 3))


@pytest.mark.parametrize("costly", [False, True])
def test_one_token_gate_up_takes_narrower_tiles_where_triton_builds_them_well(monkeypatch, costly):
    """Fewer than three programs per SM at 64 columns: halve down to 16 (Qwen3-30B-A3B and
    Qwen3-235B-A22B: 16, DeepSeek-V3: 32, Mixtral's two wide experts: 64), on a Triton that
    compiles narrow pipelined tiles well; 64 everywhere on one that does not; down keeps 64."""
    from w4a16.backends import triton_compat

    monkeypatch.setattr(triton_compat, "NARROW_TILES_COSTLY", costly)
    widths = [packed_tile_for(16, n, True, blocks, 132).block_n
              for n, blocks in ((768, 8), (1536, 8), (2048, 8), (14336, 2))]
    assert widths == ([64] * 4 if costly else [16, 16, 32, 64])
    t = packed_tile_for(16, 768, True, 8, 132)
    assert (t.num_warps, t.num_stages, t.scale_after) == (t.block_n // 16, 3, True)
    assert packed_tile_for(16, 2048, False, 8, 132).block_n == 64


def test_one_token_layer_on_narrow_gate_up_tiles_matches_reference(gen):
    """The rule's narrow tile on a one-token layer (k blocks of 64 columns: few programs)."""
    from w4a16.backends.triton_compat import NARROW_TILES_COSTLY

    dtype, E, I, H, k = torch.float16, 8, 64, 128, 2
    gu, dn = _experts(gen, E, 2 * I, H, 32, False, dtype), _experts(gen, E, H, I, 32, False, dtype)
    x = torch.randn(1, H, generator=gen).to(DEVICE, dtype)
    ids, w = _ids(gen, 1, k, E)
    routing = direct(ids)
    assert moe_packed.launch_plan(routing, I, 1, E, x.device, True)[0].block_n == (64 if NARROW_TILES_COSTLY else 16)
    _assert_every_element(fused_moe(x, gu, dn, ids, w, backend="triton"),
                          reference.fused_moe(x, gu, dn, ids, w).float(), dtype)


@pytest.mark.parametrize("block_m", [64, 128])
@pytest.mark.parametrize("warps", [4, 8])
def test_a_swapped_down_tile_with_scales_before_and_a_pipeline_is_refused(gen, block_m, warps):
    """Measured wrong on an H100 (fp16, block_m 64, 4 warps), and its SASS rewrites registers an
    issued wgmma reads (8 warps too); gate_up tiles of that shape, scales after the MMA, unswapped
    or unpipelined down tiles run."""
    ex = _experts(gen, 2, 32, 128, 32, False, torch.float16)
    ids, w = _ids(gen, 2, 1, 2)
    out = torch.empty(2, 32, device=DEVICE)
    tile = PackedTile(128, True, False, warps, 3)
    assert tile_refusal(tile, block_m, True) is None
    for ok in (tile._replace(scale_after=True), tile._replace(swap_ab=False), tile._replace(num_stages=1)):
        assert tile_refusal(ok, block_m, False) is None
    with pytest.raises(W4A16Error, match="tile: expected scale_after or an unswapped tile"):
        moe_packed.grouped_gemm(torch.zeros(2, 128, dtype=torch.float16, device=DEVICE), ex.weight.prepared(get("triton")),
                                2, align(ids, 2, block_m), 1, False, out, w.reshape(-1), tile=tile)


def test_layout_choice():
    """Experts run packed where every expert (and a gate_up weight's up half) starts on a 16-row
    block, else on the plain kernel."""
    assert packable(64, True) and packable(48, False) and not packable(48, True) and not packable(40, False)


def test_tile_choice():
    """Decode blocks: 64 columns, four warps, the scales after the MMA, a pipeline (a small down
    projection splits K); narrow outputs take a narrow tile without a pipeline; prefill blocks:
    wide tiles, a pipeline, a down tile of 128 columns swapped with the scales after the MMA."""
    t = packed_tile_for(16, 4096, True)
    assert (t.block_n, t.num_warps, t.swap_ab, t.scale_after, t.num_stages) == (64, 4, True, True, 3)
    assert packed_tile_for(16, 768, True) == t                     # many blocks (T = 16 on Qwen3-30B-A3B)
    assert packed_tile_for(16, 768, True, 128) == t
    assert packed_tile_for(16, 4096, False).block_n == 64
    tiny = packed_tile_for(16, 16, False)
    assert tiny.block_n == 16 and tiny.num_warps == 1 and tiny.num_stages == 1
    for bm in (64, 128):                                           # swapped, scales before: refused
        t = packed_tile_for(bm, 4096, False)
        assert (t.block_n, t.num_warps, t.num_stages, t.swap_ab, t.scale_after) == (128, 8, 3, True, True)
    assert packed_tile_for(128, 4096, True).num_warps == 4
    for bm in (16, 64, 128):
        for n, silu in ((16, False), (768, True), (4096, False)):
            assert tile_refusal(packed_tile_for(bm, n, silu), bm, silu) is None


def test_packed_copy_is_the_only_copy_and_edits_reach_the_next_call(gen):
    dtype, E, N, K, T, k = torch.float16, 3, 64, 128, 4, 2
    ex = _experts(gen, E, N, K, 32, False, dtype)
    ids, w = _ids(gen, T, k, E)
    x = torch.randn(T, K, generator=gen).to(DEVICE, dtype)
    grouped_gemm(x, ex, ids, backend="triton")
    assert ex.weight._codes is None                       # the layout-2 copy holds the codes alone
    q = ex.qweight                                        # rebuilt from it
    q[1].bitwise_xor_(0x35)                               # in place, through the rebuilt view
    ex.scales.data[2].mul_(-0.5)                          # through .data
    plain = QuantizedExperts(q.clone(), ex.scales.clone(), None, 32)
    y = grouped_gemm(x, ex, ids, backend="triton").float()
    _assert_every_element(y, reference.grouped_gemm(x, plain, ids).float(), dtype)


def test_module_state_dict_after_a_call_round_trips(gen):
    dtype, E, I, H, T, k = torch.float16, 4, 32, 64, 5, 2
    m = W4A16Experts(_experts(gen, E, 2 * I, H, 32, True, dtype), _experts(gen, E, H, I, 32, True, dtype))
    x = torch.randn(T, H, generator=gen).to(DEVICE, dtype)
    ids, w = _ids(gen, T, k, E)
    y = m(x, ids, w)
    sd = m.state_dict()
    assert sorted(sd) == sorted(f"{p}_{part}" for p in ("gate_up", "down") for part in ("qweight", "scales", "zeros"))
    assert sd["gate_up_qweight"].shape == (E, 2 * I, H // 2) and sd["gate_up_qweight"].dtype == torch.uint8
    other = W4A16Experts(_experts(gen, E, 2 * I, H, 32, True, dtype), _experts(gen, E, H, I, 32, True, dtype))
    other.load_state_dict(sd)
    assert torch.equal(other(x, ids, w), y)


def test_fused_layer_with_a_split_down_projection(gen):
    """One token, two experts, a long down projection (I = 2048: 16 chunks): the layer's down
    GEMM runs split over K (the grid is tiny) and the layer still matches the reference."""
    from w4a16.backends.triton.moe_packed import launch_plan

    dtype, E, I, H, T, k = torch.float16, 2, 2048, 32, 1, 2
    gu, dn = _experts(gen, E, 2 * I, H, 32, False, dtype), _experts(gen, E, H, I, 128, False, dtype)
    x = torch.randn(T, H, generator=gen).to(DEVICE, dtype)
    ids, w = _ids(gen, T, k, E)
    assert launch_plan(direct(ids), H, I // 128, E, x.device, False, may_split=True)[1] == 2
    y = fused_moe(x, gu, dn, ids, w, backend="triton")
    _assert_every_element(y, reference.fused_moe(x, gu, dn, ids, w).float(), dtype)


def test_concurrent_calls_are_correct(gen):
    """Four threads calling the layer at once (on the CPU the interpreter runs one launch at a time;
    the first calls of a weight pack it once)."""
    import threading

    dtype, E, I, H, T, k = torch.float16, 4, 32, 64, 3, 2
    gu, dn = _experts(gen, E, 2 * I, H, 32, False, dtype), _experts(gen, E, H, I, 32, False, dtype)
    calls = [(torch.randn(T, H, generator=gen).to(DEVICE, dtype), *_ids(gen, T, k, E)) for _ in range(4)]
    got = [None] * len(calls)

    def run(i):
        x, ids, w = calls[i]
        got[i] = fused_moe(x, gu, dn, ids, w, backend="triton")

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for (x, ids, w), y in zip(calls, got):
        _assert_every_element(y, reference.fused_moe(x, gu, dn, ids, w).float(), dtype)


@pytest.mark.parametrize("T,H,I,g", [(1, 40, 64, -1), (5, 40, 64, -1), (1, 48, 40, -1), (6, 56, 96, -1)])
def test_fused_layer_mixing_packed_and_plain_projections(gen, T, H, I, g):
    """A layer whose one projection is packed and the other plain (H or I not a multiple of 16,
    per-channel weights): each kernel writes its rows where the next one reads them."""
    dtype, E, k = torch.float16, 3, 2
    gu, dn = _experts(gen, E, 2 * I, H, g, True, dtype), _experts(gen, E, H, I, g, False, dtype)
    assert 0 in {kernel_tensors(gu, True)[0], kernel_tensors(dn, False)[0]}      # a plain projection
    x = torch.randn(T, H, generator=gen).to(DEVICE, dtype)
    ids, w = _ids(gen, T, k, E)
    y = fused_moe(x, gu, dn, ids, w, backend="triton")
    _assert_every_element(y, reference.fused_moe(x, gu, dn, ids, w).float(), dtype)
