"""Checkpoints of other tools: GPTQ v1 zero points as GPTQModel writes them (word-wise - 0x11111111)
and as AutoGPTQ's packer writes them (nibble-wise, a zero point of 0 spilling into the higher
nibbles), and HQQ per-channel layers (``group_size`` recorded as in_features).

The checkpoints are built here from the format description, independently of the package's
packing code: plain Python integers, nibble j of an int32 word at bits 4j..4j+3.
"""
import numpy as np
import pytest
import torch

import w4a16
from w4a16 import formats

V1_WORD = 0x11111111


def word(nibbles) -> int:
    v = sum((int(x) & 0xF) << (4 * j) for j, x in enumerate(nibbles))
    return v - (1 << 32) if v >= (1 << 31) else v  # as a signed int32


def to_i32(rows) -> torch.Tensor:
    return torch.tensor(np.array(rows, dtype=np.int64).astype(np.int32))


def gptqmodel_v1_qzeros(z):
    """What GPTQModel's v1 writer stores for true zero points z [G, N] (N a multiple of 8): each
    packed word of z, minus 0x11111111, modulo 2**32 (a zero nibble borrows from the next)."""
    G, N = z.shape
    out = []
    for r in range(G):
        row = []
        for c in range(N // 8):
            packed = sum(int(z[r, 8 * c + j]) << (4 * j) for j in range(8))
            row.append(word_from_unsigned((packed - V1_WORD) % 2 ** 32))
        out.append(row)
    return to_i32(out)


def word_from_unsigned(u: int) -> int:
    return u - (1 << 32) if u >= (1 << 31) else u


def autogptq_v1_qzeros(z):
    """A nibble-wise v1 writer: nibble j holds z - 1 (valid for z in 1..15, no borrows)."""
    G, N = z.shape
    return to_i32([[word([z[r, 8 * c + j] - 1 for j in range(8)]) for c in range(N // 8)] for r in range(G)])


def gptq_tensors(rng, K, N, g, z):
    q = rng.integers(0, 16, size=(K, N))
    G = K // g
    scales = torch.tensor(rng.uniform(1e-3, 3e-2, size=(G, N)), dtype=torch.float16)
    qweight = to_i32([[word([q[8 * r + j, n] for j in range(8)]) for n in range(N)] for r in range(K // 8)])
    gi = torch.arange(K) // g
    W = ((torch.tensor(q, dtype=torch.float32) - torch.tensor(z, dtype=torch.float32)[gi])
         * scales.float()[gi]).T.contiguous()
    return qweight, scales, W


def test_gptqmodel_v1_zero_point_zero_borrows():
    """True zeros (0, 15) as GPTQModel stores them read back as (0, 15), not (16, 14)."""
    rng = np.random.default_rng(0)
    K, N, g = 64, 16, 32
    z = rng.integers(0, 16, size=(K // g, N))
    z[0, :8] = [0, 15, 0, 0, 7, 0, 15, 0]     # borrows chained through the word
    z[1, 8:] = 0                               # a whole word of zeros: 0xEEEEEEEF
    qzeros = gptqmodel_v1_qzeros(z)
    assert int(qzeros[1, 1]) == word_from_unsigned(0xEEEEEEEF)
    qweight, scales, W = gptq_tensors(rng, K, N, g, z)
    w = formats.from_gptq(qweight, qzeros, scales, checkpoint_format="gptq")
    assert torch.equal(w.zeros.float().t(), torch.tensor(z, dtype=torch.float32))
    assert torch.equal(w.dequantize(torch.float32), W)
    back = formats.to_gptq(w, checkpoint_format="gptq")     # written the way GPTQModel writes
    assert torch.equal(back["qzeros"], qzeros) and torch.equal(back["qweight"], qweight)


def test_v1_nibble_wise_and_word_wise_agree_for_zeros_1_to_15():
    """For zero points in 1..15 no nibble borrows: an AutoGPTQ-style file reads the same."""
    rng = np.random.default_rng(1)
    K, N, g = 128, 24, 32
    z = rng.integers(1, 16, size=(K // g, N))
    assert torch.equal(autogptq_v1_qzeros(z), gptqmodel_v1_qzeros(z))
    qweight, scales, W = gptq_tensors(rng, K, N, g, z)
    w = formats.from_gptq(qweight, autogptq_v1_qzeros(z), scales, checkpoint_format="gptq")
    assert torch.equal(w.dequantize(torch.float32), W)


def autogptq_packer_qzeros(z):
    """AutoGPTQ's packer: z - 1 as unsigned 32-bit values, each OR-ed into its word shifted by 4j;
    a zero point of 0 (z - 1 = -1: every bit set) spills into all higher nibbles of its word."""
    G, N = z.shape
    out = []
    for r in range(G):
        row = []
        for c in range(N // 8):
            v = 0
            for j in range(8):
                v |= (((int(z[r, 8 * c + j]) - 1) & 0xFFFFFFFF) << (4 * j)) & 0xFFFFFFFF
            row.append(word_from_unsigned(v))
        out.append(row)
    return to_i32(out)


def autogptq_kernel_zeros(qzeros, N):
    """The zero points AutoGPTQ's kernels use: nibble j of the word, masked, plus one."""
    u = qzeros.to(torch.int64) % 2 ** 32
    nib = torch.stack([(u >> (4 * j)) & 0xF for j in range(8)], dim=-1).reshape(qzeros.shape[0], -1)
    return (nib + 1)[:, :N]


def test_autogptq_v1_zero_point_zero_reads_as_its_kernels_do():
    """AutoGPTQ's spilled words (a zero point of 0 sets every higher nibble): the dequantized
    weight equals what AutoGPTQ's kernels compute from the same file (zero points of 16 from the
    spilled nibble up); words without a 0 read exactly."""
    rng = np.random.default_rng(3)
    K, N, g = 64, 24, 32
    z = rng.integers(1, 16, size=(K // g, N))
    z[0, 2] = 0                    # spills into nibbles 2..7 of word 0
    z[1, 13] = 0                   # nibbles 5..7 of word 1
    qzeros = autogptq_packer_qzeros(z)
    used = autogptq_kernel_zeros(qzeros, N)
    assert bool((used[0, 2:8] == 16).all()) and bool((used[1, 13:16] == 16).all())
    qweight, scales, _ = gptq_tensors(rng, K, N, g, z)
    q = w4a16.formats._int32.unpack_int32(qweight, dim=0).float()            # [K, N]
    gi = torch.arange(K) // g
    W = ((q - used.float()[gi]) * scales.float()[gi]).T
    w = formats.from_gptq(qweight, qzeros, scales, checkpoint_format="gptq")
    assert torch.equal(w.dequantize(torch.float32), W)
    assert torch.equal(w.zeros.float().t()[:, 16:], torch.tensor(z[:, 16:], dtype=torch.float32))


def test_v1_symmetric_is_0x77777777():
    w = w4a16.quantize(torch.randn(16, 64), group_size=32)
    qz = formats.to_gptq(w, "gptq")["qzeros"]
    assert bool((qz == 0x77777777).all())
    assert formats.from_gptq(**formats.to_gptq(w, "gptq"), checkpoint_format="gptq").zeros is None


@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2"])
def test_any_zero_point_round_trips(fmt):
    gen = torch.Generator().manual_seed(2)
    codes = torch.randint(0, 16, (16, 64), generator=gen, dtype=torch.uint8)
    zeros = torch.arange(32).reshape(16, 2).remainder(16).half()   # every value 0..15
    w = w4a16.QuantizedWeight.from_plain(w4a16.pack.pack_nibbles(codes), torch.rand(16, 2).half(), zeros, 32)
    back = formats.from_gptq(**formats.to_gptq(w, fmt), checkpoint_format=fmt)
    assert torch.equal(back.dequantize(), w.dequantize())


# ---------------------------------------------------------------------------------------- HQQ
def hqq_per_channel(N, K, rng):
    """HQQLinear(group_size=None) on an [N, K] weight: one group per row, recorded group_size = K."""
    q = rng.integers(0, 16, size=(N, K)).astype(np.uint8)   # [R = N, g = K]
    W_q = torch.from_numpy((q[: N // 2] << 4) | q[N // 2:])
    scale = torch.tensor(rng.uniform(1e-3, 1e-2, size=(N, 1)), dtype=torch.float16)
    zero = torch.tensor(rng.uniform(0, 15, size=(N, 1)), dtype=torch.float16)
    W = (torch.tensor(q, dtype=torch.float32) - zero.float()) * scale.float()
    return W_q, scale, zero, W


@pytest.mark.parametrize("K", [512, 96, 256])
def test_hqq_group_size_equal_to_k_is_per_channel(K):
    W_q, scale, zero, W = hqq_per_channel(8, K, np.random.default_rng(K))
    w = formats.from_hqq(W_q, scale, zero, shape=(8, K), group_size=K)
    assert torch.equal(w.dequantize(torch.float32), W)
    assert w.group_size == (-1 if K not in (32, 64, 128, 256) else K)
    assert torch.equal(formats.from_hqq(W_q, scale, zero, shape=(8, K), group_size=None).dequantize(), w.dequantize())
