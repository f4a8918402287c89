"""The Gluon decode kernel's programmatic dependent launch (``GluonDecodeConfig.pdl``) on an sm_90
GPU: a chain of calls where each reads the previous one's output (read after write) and writes the
buffer the previous one read (write after read), eagerly and replayed from a CUDA graph, must equal
the same chain computed one call at a time by the reference."""
import dataclasses

import pytest
import torch

pytestmark = pytest.mark.gpu   # selected by: pytest -m gpu tests

if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9:
    pytest.skip("needs an sm_90 (Hopper) GPU", allow_module_level=True)
from gluon_helpers import skip_unless_gluon  # noqa: E402

skip_unless_gluon()

from w4a16 import reference  # noqa: E402
from w4a16.backends.gluon.decode.config import GluonDecodeConfig  # noqa: E402
from w4a16.backends.gluon.decode.launch import run_decode  # noqa: E402
from gluon_helpers import prep, rel  # noqa: E402
from w4a16.measure import random_weight  # noqa: E402

K = 2048
CONFIGS = [GluonDecodeConfig(8, 4, 2, 4), GluonDecodeConfig(8, 4, 2, 4, ws=False), GluonDecodeConfig(16, 4, 2, 4, sk=True),
           GluonDecodeConfig(16, 4, 2, 4, splits=4), GluonDecodeConfig(32, 4, 2, 3, sk=True)]


def _chain(cfg, weights, alphas, x0, a, b):
    """x0 -> a -> b -> a -> ...: call i reads one buffer and writes the other (which call i - 1 read)."""
    a.copy_(x0)
    src, dst = a, b
    for pw, alpha in zip(weights, alphas):
        run_decode(src, pw, None, alpha, cfg, out=dst)
        src, dst = dst, src
    return src


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: c.short())
def test_chained_calls_eager_and_graph(cfg):
    gen = torch.Generator().manual_seed(30)
    ws = [random_weight(K, K, 128, None, torch.float16, "cpu", gen) for _ in range(6)]
    pws = [prep(w) for w in ws]
    # alpha keeps every layer's output at about unit scale (six layers of K = 2048 would overflow fp16)
    alphas = [1.0 / (K ** 0.5 * float(w.dequantize(torch.float32).std())) for w in ws]
    M = min(cfg.mt, 5)
    x0 = torch.randn(M, K, generator=gen).half()
    ref = x0
    for w, alpha in zip(ws, alphas):
        ref = reference.gemm(ref, w, None, alpha).half()
    x0c = x0.cuda()
    a = torch.empty(M, K, dtype=torch.float16, device="cuda")
    b = torch.empty_like(a)
    y = _chain(cfg, pws, alphas, x0c, a, b)
    torch.cuda.synchronize()
    assert rel(y, ref) <= 2e-2, cfg.short()
    eager = y.clone()
    for pdl in (True, False):   # the plain launch gives the same bits
        y2 = _chain(dataclasses.replace(cfg, pdl=pdl), pws, alphas, x0c, a, b)
        assert torch.equal(y2, eager), (cfg.short(), pdl)
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        _chain(cfg, pws, alphas, x0c, a, b)   # warm-up on the capture stream
        torch.cuda.synchronize()
        with torch.cuda.graph(g, stream=s):
            out = _chain(cfg, pws, alphas, x0c, a, b)
    torch.cuda.current_stream().wait_stream(s)
    for _ in range(3):
        a.fill_(float("nan"))
        b.fill_(float("nan"))
        g.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, eager), cfg.short()
