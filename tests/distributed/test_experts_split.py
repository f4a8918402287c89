"""The experts' split (w4a16.distributed.experts) without processes: each rank's slices of gate,
up and down put back together give the whole weights, and impossible splits are refused by name."""
import pytest
import torch

from w4a16.distributed.experts import check_split, take
from w4a16.errors import W4A16Error
from w4a16.moe import QuantizedExperts, W4A16Experts


def _module(I=64, g=32, zeros=True):
    gen = torch.Generator().manual_seed(0)
    gu = QuantizedExperts.quantize(torch.randn(3, 2 * I, 64, generator=gen), g, not zeros, torch.float16)
    dn = QuantizedExperts.quantize(torch.randn(3, 64, I, generator=gen), g, not zeros, torch.float16)
    return W4A16Experts(gu, dn)


@pytest.mark.parametrize("tp", [1, 2])
def test_rank_slices_make_the_whole(tp):
    m = _module()
    gu, dn = (w.dequantize() for w in m.weights())
    parts = [take(m, r, tp) for r in range(tp)]
    I, i = 64, 64 // tp
    for r, p in enumerate(parts):
        g = QuantizedExperts(p["gate_up_qweight"], p["gate_up_scales"], p["gate_up_zeros"], 32).dequantize()
        d = QuantizedExperts(p["down_qweight"], p["down_scales"], p["down_zeros"], 32).dequantize()
        assert torch.equal(g[:, :i], gu[:, r * i:(r + 1) * i]) and torch.equal(g[:, i:], gu[:, I + r * i:I + (r + 1) * i])
        assert torch.equal(d, dn[:, :, r * i:(r + 1) * i])


def test_impossible_splits_are_refused():
    with pytest.raises(W4A16Error, match="experts: tp: expected a divisor of the experts' intermediate size 64, got 3"):
        check_split(_module(), 3)
    with pytest.raises(W4A16Error, match="multiples of down's group size 32"):
        check_split(_module(), 4)
    with pytest.raises(W4A16Error, match="down projection: expected group-wise scales"):
        check_split(_module(g=-1), 2)
