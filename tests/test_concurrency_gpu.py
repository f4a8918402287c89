"""Concurrency on the GPU: two streams at once (split-K counters are per stream), graph capture on
a side stream while another stream still computes, weights on a second GPU (device index
respected everywhere). Every result against ``w4a16.reference.gemm``."""
import pytest
import torch

pytestmark = pytest.mark.gpu   # selected by: pytest -m gpu tests

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

import w4a16  # noqa: E402
from w4a16.measure import TOLERANCE, random_weight, rel_error  # noqa: E402

BACKENDS = ["auto", "triton"] + (["gluon"] if torch.cuda.get_device_capability()[0] == 9 else [])


def _weights(n, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(4096, 4096, 128, None), (1024, 4096, 64, "int"), (2048, 1024, 32, "float")]
    return [random_weight(N, K, g, z, torch.float16, "cpu", gen).to(device) for N, K, g, z in shapes[:n]]


def _check(y, x, w, what, bias=None):
    assert not torch.isnan(y).any(), f"{what}: NaN / unwritten outputs"
    err = rel_error(y, w4a16.reference.gemm(x, w, bias))
    assert err <= TOLERANCE[torch.float16], f"{what}: relative error {err:.2e}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_streams_at_once(backend):
    """Decode-sized calls (split-K, the shared tile counters of each stream) on two streams that
    run at the same time, many calls each, then every result checked."""
    ws = _weights(3, "cuda")
    streams = [torch.cuda.Stream(), torch.cuda.Stream()]
    jobs = []
    for i in range(60):
        s = streams[i % 2]
        w = ws[i % 3]
        x = torch.randn((1, 16, 5)[i % 3], w.shape[1], device="cuda", dtype=torch.float16)
        s.wait_stream(torch.cuda.current_stream())   # x was made on the current stream
        with torch.cuda.stream(s):
            y = w4a16.gemm(x, w, backend=backend)
        jobs.append((x, w, y))
    torch.cuda.synchronize()
    for i, (x, w, y) in enumerate(jobs):
        _check(y, x, w, f"{backend} call {i} on stream {i % 2}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_capture_on_a_side_stream_while_another_computes(backend):
    """Work queued on stream A keeps running while a graph of gemm calls is captured on stream B;
    both the queued results and the replayed graph are right."""
    ws = _weights(2, "cuda", seed=1)
    a = torch.cuda.Stream()
    xs = [torch.randn(4, ws[0].shape[1], device="cuda", dtype=torch.float16) for _ in range(40)]
    xg = torch.randn(3, ws[1].shape[1], device="cuda", dtype=torch.float16)
    w4a16.gemm(xg, ws[1], backend=backend)    # eager first: compiled and prepared before capture
    w4a16.gemm(xs[0], ws[0], backend=backend)
    torch.cuda.synchronize()
    a.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(a):
        queued = [w4a16.gemm(x, ws[0], backend=backend) for x in xs]   # not waited for
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):                                    # its own side stream
        yg = w4a16.gemm(xg, ws[1], backend=backend)
    xg.copy_(torch.randn_like(xg))
    graph.replay()
    torch.cuda.synchronize()
    _check(yg, xg, ws[1], f"{backend} replayed graph")
    for i, (x, y) in enumerate(zip(xs, queued)):
        _check(y, x, ws[0], f"{backend} queued call {i}")


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("backend", BACKENDS)
def test_weights_on_the_second_gpu(backend):
    """A weight and its input on cuda:1 while cuda:0 is current: eager calls, a W4A16Linear and a
    graph captured on cuda:1 give the reference's results, on cuda:1."""
    assert torch.cuda.current_device() == 0
    ws = _weights(2, "cuda:1", seed=2)
    for w in ws:
        for M in (1, 16, 300):
            x = torch.randn(M, w.shape[1], device="cuda:1", dtype=torch.float16)
            y = w4a16.gemm(x, w, backend=backend)
            assert y.device == torch.device("cuda:1")
            _check(y, x, w, f"{backend} M={M} on cuda:1")
    lin = torch.nn.Linear(512, 256, dtype=torch.float16, device="cuda:1")
    mod = w4a16.W4A16Linear.from_linear(lin, group_size=64)
    x = torch.randn(2, 7, 512, device="cuda:1", dtype=torch.float16)
    with torch.no_grad():
        y = mod(x)
    assert y.device == torch.device("cuda:1")
    _check(y, x, mod.weight_q, f"{backend} W4A16Linear", mod.bias)
    assert torch.cuda.current_device() == 0
    with torch.cuda.device(1):
        xg = torch.randn(5, ws[0].shape[1], device="cuda:1", dtype=torch.float16)
        w4a16.gemm(xg, ws[0], backend=backend)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            yg = w4a16.gemm(xg, ws[0], backend=backend)
        graph.replay()
        torch.cuda.synchronize()
    _check(yg, xg, ws[0], f"{backend} graph on cuda:1")
