"""The C library (libw4a16_sm90_kernel.so) on an sm_90 GPU, driven through ctypes.

Every kernel choice, group sizes 32 / 64 / 128 / 256 / per-channel, symmetric and with integer or
float zero points, bias or not, ragged and unaligned shapes; each output poisoned with NaN first
and compared element by element with ``w4a16.reference.gemm`` (relative Frobenius error within
2e-3 for fp16, 1e-2 for bf16). Also: the explicit prepare path, one stream and one workspace
reused across many calls, two streams in parallel, CUDA graph capture, errors, occupancy.

The library comes from $W4A16_CAPI_DIR (a ``w4a16 build-lib`` output) or is built into a
temporary directory first.
"""
import os

import pytest
import torch

pytestmark = pytest.mark.gpu   # selected by: pytest -m gpu tests

if not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0):
    pytest.skip("needs an sm_90 CUDA GPU (the library holds sm_90a kernels)", allow_module_level=True)

import sys  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kernel_cases import make_weight, rel_err  # noqa: E402

import w4a16  # noqa: E402
from w4a16.capi import loader  # noqa: E402
from w4a16.measure import TOLERANCE  # noqa: E402

DTYPES = [torch.float16, torch.bfloat16]
KERNELS = ["auto128", "auto64", "tile256", "tile128", "splitk64", "decode"]
SHAPES = [(1, 72, 576), (3, 200, 1376), (16, 256, 4096), (17, 72, 4096), (64, 512, 2048), (100, 200, 576),
          (300, 256, 1024), (40, 1024, 768), (1100, 1024, 512)]   # the last: more prefill tiles than SMs
WS_BYTES = 4 << 20


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    d = os.environ.get("W4A16_CAPI_DIR")
    if d:
        path = Path(d) / "libw4a16_sm90_kernel.so"
    else:
        from w4a16.capi import build_lib
        path = build_lib(tmp_path_factory.mktemp("capi"), test_program=False).library
    return loader.load(path)


@pytest.fixture(autouse=True)
def fresh_cache(lib):
    """The library caches repacked weights by pointer; torch reuses freed addresses between tests."""
    yield
    torch.cuda.synchronize()
    lib.w4a16_sm90_cache_clear()


@pytest.fixture(scope="module")
def workspace():
    return torch.empty(WS_BYTES, dtype=torch.uint8, device="cuda")


def _ptr(t):
    return None if t is None else t.data_ptr()


def call(lib, x, qw, bias=None, alpha=1.0, kernel="auto128", split_k=0, ws=None, out=None, stream=None, flags=0):
    """y = alpha * x @ W^T + bias through the plain-layout entry point; returns (status, y)."""
    M, K = x.shape
    N = qw.shape[0]
    y = torch.full((M, N), float("nan"), dtype=x.dtype, device="cuda") if out is None else out
    entry64 = kernel == "auto64"
    cfg = loader.config("auto" if kernel.startswith("auto") else kernel, split_k, flags)
    bf16 = x.dtype == torch.bfloat16
    fn = {(False, False): lib.w4a16_sm90_gemm_128_ex, (False, True): lib.w4a16_sm90_gemm_64_ex,
          (True, False): lib.w4a16_sm90_gemm_128_bf16, (True, True): lib.w4a16_sm90_gemm_64_bf16}[bf16, entry64]
    s = torch.cuda.current_stream() if stream is None else stream
    status = fn(x.data_ptr(), qw.qweight.data_ptr(), qw.scales.data_ptr(), _ptr(qw.zeros), _ptr(bias), alpha,
                y.data_ptr(), M, N, K, qw.group_size, cfg, _ptr(ws), 0 if ws is None else ws.numel(), s.cuda_stream,
                None)
    return status, y


def check(lib, y, status, x, qw, bias, alpha, what=""):
    assert status == 0, f"{what}: status {status}: {lib.w4a16_last_error_message().decode()}"
    assert not torch.isnan(y).any(), f"{what}: {int(torch.isnan(y).sum())} outputs NaN/unwritten"
    ref = w4a16.reference.gemm(x, qw, bias, alpha)
    err = rel_err(y, ref)
    assert err <= TOLERANCE[x.dtype], f"{what}: rel err {err:.2e} ({lib.w4a16_sm90_last_kernel().decode()})"


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
@pytest.mark.parametrize("zeros", [None, "int", "float"])
@pytest.mark.parametrize("group_size", [32, 64, 128, 256, -1])
def test_matrix(lib, workspace, dtype, zeros, group_size):
    for i, (M, N, K) in enumerate(SHAPES):
        if group_size != -1 and K % group_size:
            continue
        qw = make_weight(N, K, group_size, zeros, dtype, "cuda", seed=i)
        gen = torch.Generator().manual_seed(i + 100)
        x = torch.randn(M, K, generator=gen).to(dtype).cuda()
        bias = (torch.randn(N, generator=gen) * 0.1).to(dtype).cuda() if i % 2 == 0 else None
        alpha = 1.0 if i % 3 else 0.5
        gluon = loader.gluon_applies(M, N, K, group_size)
        forced = ["gluon_decode" if M <= 64 else "gluon_prefill"] if gluon else []
        for kernel in KERNELS + forced:
            status, y = call(lib, x, qw, bias, alpha, kernel, ws=workspace)
            check(lib, y, status, x, qw, bias, alpha, f"{kernel} M={M} N={N} K={K}")
            if kernel.startswith("auto"):   # the automatic choice runs the Gluon kernels wherever they apply
                assert lib.w4a16_sm90_last_kernel().decode().startswith("gluon_") == gluon, kernel
        lib.w4a16_sm90_cache_forget(qw.qweight.data_ptr())


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
def test_unaligned_pointers_and_split_k(lib, workspace, dtype):
    """A, C and bias one element past 16-byte alignment run the generic kernels; explicit split_k."""
    M, N, K = 33, 256, 1024
    qw = make_weight(N, K, 128, "int", dtype, "cuda")
    xb = torch.randn(M * K + 1, device="cuda").to(dtype)
    x = xb[1:].view(M, K)
    bb = torch.randn(N + 1, device="cuda").to(dtype) * 0.1
    bias = bb[1:]
    yb = torch.full((M * N + 1,), float("nan"), dtype=dtype, device="cuda")
    y = yb[1:].view(M, N)
    for kernel, split in (("auto128", 0), ("decode", 3), ("splitk64", 5), ("tile128", 0)):
        y.fill_(float("nan"))
        status, _ = call(lib, x, qw, bias, 1.0, kernel, split, ws=workspace, out=y)
        assert "generic" in lib.w4a16_sm90_last_kernel().decode()
        check(lib, y, status, x, qw, bias, 1.0, f"unaligned {kernel}")


def test_prepared_path_matches_plain(lib, workspace):
    M, N, K = 16, 1024, 2048
    qw = make_weight(N, K, 64, "float", torch.float16, "cuda")
    x = torch.randn(M, K, device="cuda").half()
    size = lib.w4a16_sm90_prepared_size(N, K, 64, 1)
    buf = torch.empty(size, dtype=torch.uint8, device="cuda")
    pw = loader.PreparedWeight(buf.data_ptr(), size)
    stream = torch.cuda.current_stream().cuda_stream
    assert lib.w4a16_sm90_prepare(qw.qweight.data_ptr(), qw.scales.data_ptr(), qw.zeros.data_ptr(), N, K, 64, 0,
                                  stream, pw) == 0
    y = torch.full((M, N), float("nan"), dtype=torch.float16, device="cuda")
    assert lib.w4a16_sm90_gemm_prepared(x.data_ptr(), pw, None, 1.0, y.data_ptr(), M, None, workspace.data_ptr(),
                                        workspace.numel(), stream, None) == 0
    _, y_plain = call(lib, x, qw, ws=workspace)
    assert torch.equal(y, y_plain)
    check(lib, y, 0, x, qw, None, 1.0, "prepared")
    small = loader.PreparedWeight(buf.data_ptr(), size - 1)
    assert lib.w4a16_sm90_prepare(qw.qweight.data_ptr(), qw.scales.data_ptr(), None, N, K, 64, 0, stream,
                                  small) == 0  # symmetric needs less
    small = loader.PreparedWeight(buf.data_ptr(), 1024)
    assert lib.w4a16_sm90_prepare(qw.qweight.data_ptr(), qw.scales.data_ptr(), None, N, K, 64, 0, stream,
                                  small) == 6


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
def test_gluon_splits_workspace_and_refusals(lib, dtype):
    """The Gluon decode kernel over explicit K splits and shrinking workspaces (fewer splits, then
    none); a Gluon kernel forced where it cannot run is refused with a status, not run wrong."""
    M, N, K = 5, 1024, 4096
    qw = make_weight(N, K, 128, "int", dtype, "cuda")
    x = torch.randn(M, K, device="cuda").to(dtype)
    for split, nbytes in ((1, 4 << 20), (3, 4 << 20), (16, 4 << 20), (0, 0), (0, 70_000), (8, 100_000)):
        ws = torch.empty(max(nbytes, 1), dtype=torch.uint8, device="cuda") if nbytes else None
        status, y = call(lib, x, qw, None, 0.5, "gluon_decode", split, ws=ws)
        check(lib, y, status, x, qw, None, 0.5, f"split {split}, workspace {nbytes}")
        assert lib.w4a16_sm90_last_kernel().decode().startswith("gluon_decode8")
    status, _ = call(lib, x, qw, kernel="gluon_prefill")
    assert status == 1 and b"m:" in lib.w4a16_last_error_message()
    odd = make_weight(72, 576, 64, None, dtype, "cuda")   # N % 16 != 0: not for the Gluon kernels
    status, _ = call(lib, x[:, :576].contiguous(), odd, kernel="gluon_decode")
    assert status == 7 and b"Gluon" in lib.w4a16_last_error_message()


def test_gluon_prepared_weight(lib, workspace):
    """A weight prepared in the Gluon layout runs the Gluon kernels at every M; it refuses unaligned
    pointers and the Triton kernels with a status."""
    N, K = 512, 1024
    qw = make_weight(N, K, 128, None, torch.bfloat16, "cuda")
    size = lib.w4a16_sm90_prepared_size(N, K, 128, 0)
    buf = torch.empty(size, dtype=torch.uint8, device="cuda")
    pw = loader.PreparedWeight(buf.data_ptr(), size)
    stream = torch.cuda.current_stream().cuda_stream
    assert lib.w4a16_sm90_prepare(qw.qweight.data_ptr(), qw.scales.data_ptr(), None, N, K, 128, 1, stream, pw) == 0
    assert pw.layout == loader.LAYOUT_GLUON
    for M in (1, 64, 65, 700):
        x = torch.randn(M, K, device="cuda").bfloat16()
        y = torch.full((M, N), float("nan"), dtype=torch.bfloat16, device="cuda")
        st = lib.w4a16_sm90_gemm_prepared(x.data_ptr(), pw, None, 1.0, y.data_ptr(), M, None, workspace.data_ptr(),
                                          workspace.numel(), stream, None)
        check(lib, y, st, x, qw, None, 1.0, f"Gluon-prepared M={M}")
        assert lib.w4a16_sm90_last_kernel().decode().startswith("gluon_")
    xb = torch.randn(4 * K + 8, device="cuda").bfloat16()
    st = lib.w4a16_sm90_gemm_prepared(xb.data_ptr() + 2, pw, None, 1.0, y.data_ptr(), 4, None, None, 0, stream, None)
    assert st == 1 and b"aligned" in lib.w4a16_last_error_message()
    st = lib.w4a16_sm90_gemm_prepared(x.data_ptr(), pw, None, 1.0, y.data_ptr(), 4, loader.config("tile128"), None, 0,
                                      stream, None)
    assert st == 7


def test_one_stream_one_workspace_many_calls(lib):
    """50 calls of mixed M (decode, split-K, tiles) and weights share one stream and one workspace."""
    ws = torch.empty(WS_BYTES, dtype=torch.uint8, device="cuda")
    stream = torch.cuda.Stream()
    weights = [make_weight(N, K, g, z, torch.float16, "cuda", seed=j)
               for j, (N, K, g, z) in enumerate([(4096, 4096, 128, None), (1024, 4096, 64, "int"),
                                                 (2048, 1024, 32, "float")])]
    jobs = []
    with torch.cuda.stream(stream):
        for i in range(50):
            qw = weights[i % 3]
            M = (1, 16, 64, 300, 5)[i % 5]
            x = torch.randn(M, qw.shape[1], device="cuda").half()
            status, y = call(lib, x, qw, None, 1.0, "auto128", ws=ws, stream=stream)
            assert status == 0
            jobs.append((x, qw, y))
    stream.synchronize()
    for x, qw, y in jobs:
        check(lib, y, 0, x, qw, None, 1.0, "reused stream/workspace")


def test_zeroed_workspace_many_calls(lib):
    """W4A16_FLAG_ZEROED_WORKSPACE: the workspace zeroed once, then 40 split-K calls of different
    shapes and weights without a memset: every result right (the kernels leave the counters at 0)."""
    ws = torch.zeros(WS_BYTES, dtype=torch.uint8, device="cuda")
    weights = [make_weight(N, K, g, z, torch.float16, "cuda", seed=j)
               for j, (N, K, g, z) in enumerate([(4096, 4096, 128, None), (1024, 4096, 64, "int"),
                                                 (6144, 1024, 32, "float")])]
    for i in range(40):
        qw = weights[i % 3]
        M = (1, 16, 64, 3)[i % 4]
        x = torch.randn(M, qw.shape[1], device="cuda").half()
        status, y = call(lib, x, qw, None, 1.0, "auto64" if i % 2 else "auto128", ws=ws,
                         flags=loader.FLAG_ZEROED_WORKSPACE)
        check(lib, y, status, x, qw, None, 1.0, f"zeroed workspace, call {i}")
        assert "decode" in lib.w4a16_sm90_last_kernel().decode() or "splitk" in lib.w4a16_sm90_last_kernel().decode()
    torch.cuda.synchronize()
    start = (-ws.data_ptr()) % 256   # the library aligns the workspace to 256 bytes
    counters = ws[start:start + loader.COUNTER_REGION_BYTES].view(torch.int32)
    assert int(counters.abs().sum()) == 0, "the kernels left split-K counters non-zero"


def test_two_streams_in_parallel(lib):
    """Two streams, each with its own workspace, interleaved split-K calls on shared weights."""
    qw = make_weight(4096, 4096, 128, "int", torch.float16, "cuda")
    streams = [torch.cuda.Stream(), torch.cuda.Stream()]
    wss = [torch.empty(WS_BYTES, dtype=torch.uint8, device="cuda") for _ in streams]
    xs = [torch.randn(16, 4096, device="cuda").half() for _ in range(8)]
    torch.cuda.synchronize()
    outs = []
    for i, x in enumerate(xs):
        s = streams[i % 2]
        with torch.cuda.stream(s):
            outs.append(call(lib, x, qw, None, 1.0, "decode", ws=wss[i % 2], stream=s))
    torch.cuda.synchronize()
    for x, (status, y) in zip(xs, outs):
        check(lib, y, status, x, qw, None, 1.0, "two streams")


def test_cuda_graph_capture(lib, workspace):
    """After a warm-up call (kernel load, weight repack), the calls can be captured in a graph."""
    qw = make_weight(4096, 4096, 128, None, torch.float16, "cuda")
    x = torch.randn(16, 4096, device="cuda").half()
    y = torch.full((16, 4096), float("nan"), dtype=torch.float16, device="cuda")
    assert call(lib, x, qw, ws=workspace, out=y)[0] == 0
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        call(lib, x, qw, ws=workspace, out=y)
    x.copy_(torch.randn_like(x))
    y.fill_(float("nan"))
    g.replay()
    torch.cuda.synchronize()
    check(lib, y, 0, x, qw, None, 1.0, "graph replay")


def test_errors_occupancy_version(lib, workspace):
    qw = make_weight(256, 512, 128, None, torch.float16, "cuda")
    x = torch.randn(4, 512, device="cuda").half()
    y = torch.full((4, 256), float("nan"), dtype=torch.float16, device="cuda")
    st = lib.w4a16_sm90_gemm_128_ex(x.data_ptr(), qw.qweight.data_ptr(), qw.scales.data_ptr(), None, None, 1.0,
                                    y.data_ptr(), 4, 256, 512, 48, None, None, 0, None, None)
    assert st == 1 and b"group_size" in lib.w4a16_last_error_message()
    occ = ctypes_int()
    st = lib.w4a16_sm90_gemm_128_ex(x.data_ptr(), qw.qweight.data_ptr(), qw.scales.data_ptr(), None, None, 1.0,
                                    y.data_ptr(), 4, 256, 512, 128, None, None, 0, None, occ)
    assert st == 0 and occ.value >= 1
    torch.cuda.synchronize()
    assert torch.isnan(y).all()  # an occupancy query launches nothing
    assert lib.w4a16_capi_version() == 3 and lib.w4a16_version() >= 100
    assert b"sm_90a" in lib.w4a16_version_string()
    assert lib.w4a16_sm90_workspace_size(16, 4096, 4096, 128, None) > 0
    assert lib.w4a16_sm90_workspace_size(4096, 4096, 4096, 128, None) >= 0
    assert lib.w4a16_sm90_cache_bytes() > 0
    lib.w4a16_sm90_cache_clear()
    assert lib.w4a16_sm90_cache_bytes() == 0


def test_small_workspace_and_m_zero(lib):
    """Too little workspace for the split: fewer splits or the tile kernel, still correct; M = 0 is a no-op."""
    qw = make_weight(4096, 4096, 128, None, torch.float16, "cuda")
    x = torch.randn(16, 4096, device="cuda").half()
    for nbytes in (0, 300_000, 1 << 20):
        ws = torch.empty(max(nbytes, 1), dtype=torch.uint8, device="cuda") if nbytes else None
        status, y = call(lib, x, qw, ws=ws)
        check(lib, y, status, x, qw, None, 1.0, f"workspace {nbytes}")
    empty = torch.empty(0, 4096, device="cuda").half()
    assert call(lib, empty, qw)[0] == 0


def ctypes_int():
    import ctypes
    return ctypes.c_int(0)
