"""Bit-exact probes of the plain storage (uint8 [N, K // 2], even k in the low nibble).

* pack -> unpack and unpack -> pack are identities (``torch.equal``);
* ``QuantizedWeight.from_plain`` keeps codes, scales and zeros as given;
* an identity activation (x = eye(K)) makes the GEMM return the dequantized weight exactly,
  through ``w4a16.gemm`` (every config name) and through ``reference.gemm``.
"""
import pytest
import torch

import w4a16
from w4a16 import QuantizedWeight, config, reference
from w4a16.errors import W4A16Error
from w4a16.pack import pack_nibbles, unpack_nibbles

HAS_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
# The CPU interpreter computes bf16 dots wrongly: bf16 through the kernels on a GPU only.
KERNEL_DTYPES = [torch.float16, torch.bfloat16] if HAS_CUDA else [torch.float16]


def test_nibble_order_is_low_first():
    codes = torch.tensor([[1, 2, 3, 4, 15, 0], [0, 15, 7, 8, 9, 10]], dtype=torch.uint8)
    expected = torch.tensor([[0x21, 0x43, 0x0F], [0xF0, 0x87, 0xA9]], dtype=torch.uint8)
    assert torch.equal(pack_nibbles(codes), expected)
    assert torch.equal(unpack_nibbles(expected), codes)


@pytest.mark.parametrize("N,K", [(1, 2), (3, 10), (64, 256), (17, 4096)])
def test_pack_unpack_round_trip(N, K, gen):
    codes = torch.randint(0, 16, (N, K), generator=gen, dtype=torch.uint8)
    packed = pack_nibbles(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (N, K // 2) and packed.is_contiguous()
    assert torch.equal(unpack_nibbles(packed), codes)


def test_unpack_pack_round_trip_every_byte():
    every = torch.arange(256, dtype=torch.int32).to(torch.uint8).reshape(4, 64)
    codes = unpack_nibbles(every)
    assert int(codes.max()) == 15 and codes.shape == (4, 128)
    assert torch.equal(pack_nibbles(codes), every)


def test_pack_rejects_odd_k():
    with pytest.raises(W4A16Error, match=r"codes\.shape\[1\] \(K\): expected an even number, got 5"):
        pack_nibbles(torch.zeros(2, 5, dtype=torch.uint8))


@pytest.mark.parametrize("group_size", [32, 64, 128, 256, -1])
@pytest.mark.parametrize("zeros", ["sym", "int", "float"])
def test_from_plain_keeps_what_it_is_given(group_size, zeros, gen):
    N, K = 48, 512
    G = 1 if group_size == -1 else K // group_size
    codes = torch.randint(0, 16, (N, K), generator=gen, dtype=torch.uint8)
    scales = torch.rand(N, G, generator=gen).to(torch.float16)
    z = {"sym": None, "int": torch.randint(0, 16, (N, G), generator=gen).to(torch.float16),
         "float": (torch.rand(N, G, generator=gen) * 15).to(torch.float16)}[zeros]
    w = QuantizedWeight.from_plain(pack_nibbles(codes), scales, z, group_size)
    assert w.shape == (N, K) and w.group_size == group_size and w.dtype == torch.float16
    assert torch.equal(w.unpack(), codes)
    assert torch.equal(w.scales, scales)
    assert (w.zeros is None) if z is None else torch.equal(w.zeros, z)
    again = QuantizedWeight.from_plain(w.qweight, w.scales, w.zeros, w.group_size)
    assert torch.equal(again.dequantize(), w.dequantize())
    moved = w.to("cpu")
    assert torch.equal(moved.qweight, w.qweight) and moved.group_size == group_size


@pytest.mark.parametrize("symmetric", [True, False])
def test_quantize_round_trips_through_from_plain(symmetric, gen):
    W = torch.randn(64, 256, generator=gen) * 0.02
    w = reference.quantize(W, 64, symmetric=symmetric)
    w2 = QuantizedWeight.from_plain(w.qweight.clone(), w.scales.clone(),
                                    None if w.zeros is None else w.zeros.clone(), 64)
    assert torch.equal(w2.dequantize(torch.float32), w.dequantize(torch.float32))
    assert int(w.unpack().max()) <= 15


def exact_weight(N, K, group_size, zeros, dtype, gen):
    """A QuantizedWeight whose dequantized values are exact in ``dtype`` (power-of-two scales,
    zeros integer or k + 0.5), so x @ W^T with one non-zero term per output is exact."""
    G = 1 if group_size == -1 else K // group_size
    codes = torch.randint(0, 16, (N, K), generator=gen, dtype=torch.uint8)
    scales = torch.pow(2.0, -torch.randint(3, 9, (N, G), generator=gen).double()).to(dtype)
    z = None
    if zeros == "int":
        z = torch.randint(0, 16, (N, G), generator=gen).to(dtype)
    elif zeros == "half":
        z = (torch.randint(0, 15, (N, G), generator=gen) + 0.5).to(dtype)
    w = QuantizedWeight.from_plain(pack_nibbles(codes), scales, z, group_size)
    W = w.dequantize(torch.float64)
    assert torch.equal(W.to(dtype).double(), W), "the test weight must be exact in dtype"
    return w


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("group_size,zeros", [(32, "sym"), (64, "int"), (128, "half"), (256, "int"), (-1, "sym")])
def test_identity_activation_reference(dtype, group_size, zeros, gen):
    N, K = 40, 256
    w = exact_weight(N, K, group_size, zeros, dtype, gen)
    y = reference.gemm(torch.eye(K, dtype=dtype), w)
    assert torch.equal(y.T, w.dequantize(dtype))


@pytest.mark.parametrize("cfg", config.config_names())
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("group_size,zeros", [(32, "sym"), (128, "half"), (-1, "int")])
def test_identity_activation_gemm(cfg, dtype, group_size, zeros, gen):
    N, K = 72, 128
    w = exact_weight(N, K, group_size, zeros, dtype, gen).to(DEVICE)
    y = w4a16.gemm(torch.eye(K, dtype=dtype, device=DEVICE), w, config=cfg)
    assert y.shape == (K, N) and y.dtype == dtype
    assert torch.equal(y.T, w.dequantize(dtype))
