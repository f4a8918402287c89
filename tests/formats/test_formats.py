"""Checkpoint importers and exporters against checkpoints packed here, straight from the layouts
in the format docs (element by element), and each format's own dequantization formula in fp32."""
import re

import numpy as np
import pytest
import torch

import w4a16
from w4a16 import formats
from w4a16.errors import W4A16Error

DTYPES = [torch.float16, torch.bfloat16]
AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]


# ----------------------------------------------------------------------------- independent packers
def word(nibbles):
    """Eight 4-bit values -> one signed int32 (nibble j at bits 4j)."""
    v = 0
    for j, x in enumerate(nibbles):
        v |= (int(x) & 0xF) << (4 * j)
    return v - (1 << 32) if v >= (1 << 31) else v


def int32_tensor(rows):
    return torch.tensor(np.array(rows, dtype=np.int64).astype(np.int32))


def pack_gptq_qweight(q_kn):
    """qweight[r, n]: nibble j is q[8r + j, n]."""
    K, N = q_kn.shape
    return int32_tensor([[word([q_kn[8 * r + j, n] for j in range(8)]) for n in range(N)] for r in range(K // 8)])


def pack_along_cols(m, order=range(8)):
    """[R, C] -> [R, ceil(C/8)]: nibble j of word (r, c) holds m[r, 8c + order[j]] (0 past the end)."""
    R, C = m.shape
    at = lambda r, c: m[r, c] if c < C else 0  # noqa: E731
    return int32_tensor([[word([at(r, 8 * c + order[j]) for j in range(8)]) for c in range(-(-C // 8))]
                         for r in range(R)])


def pack_along_rows(m):
    """[R, C] -> [ceil(R/8), C]: nibble j of word (r, c) holds m[8r + j, c] (0 past the end)."""
    R, C = m.shape
    at = lambda r, c: m[r, c] if r < R else 0  # noqa: E731
    return int32_tensor([[word([at(8 * r + j, c) for j in range(8)]) for c in range(C)] for r in range(-(-R // 8))])


def rand_scales(rng, shape, dtype):
    s = rng.uniform(1e-3, 3e-2, size=shape) * rng.choice([-1.0, 1.0], size=shape)
    return torch.tensor(s, dtype=torch.float32).to(dtype)


def shuffled_g_idx(rng, K, g):
    return rng.permutation(np.arange(K) // g)


def expect_equal(actual, expected):
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    assert torch.equal(actual, expected), f"max diff {(actual - expected).abs().max()}"


# ----------------------------------------------------------------------------- GPTQ
def gptq_checkpoint(rng, K, N, g, dtype, checkpoint_format, act_order=False, stored_zero=None):
    """Random GPTQ tensors plus the formula's W [N, K] in fp32."""
    G = 1 if g == -1 else K // g
    ge = K if g == -1 else g
    q = rng.integers(0, 16, size=(K, N))
    # v1 stores z - 1 for z in 1..15 here (no nibble borrows: see test_hardening_formats for z = 0)
    top = 15 if checkpoint_format == "gptq" else 16
    stored = rng.integers(0, top, size=(G, N)) if stored_zero is None else np.full((G, N), stored_zero)
    g_idx = shuffled_g_idx(rng, K, ge) if act_order else np.arange(K) // ge
    scales = rand_scales(rng, (G, N), dtype)
    true_z = stored + (1 if checkpoint_format == "gptq" else 0)
    qf, zf, sf = torch.tensor(q, dtype=torch.float32), torch.tensor(true_z, dtype=torch.float32), scales.float()
    gi = torch.tensor(g_idx)
    W = ((qf - zf[gi]) * sf[gi]).T.contiguous()
    ckpt = {"qweight": pack_gptq_qweight(q), "qzeros": pack_along_cols(stored), "scales": scales,
            "g_idx": torch.tensor(g_idx, dtype=torch.int32)}
    return ckpt, W


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("checkpoint_format", ["gptq", "gptq_v2"])
@pytest.mark.parametrize("K,N,g", [(256, 24, 32), (256, 16, 128), (128, 40, -1), (512, 8, 256)])
def test_gptq_asymmetric_bit_exact(K, N, g, checkpoint_format, dtype):
    rng = np.random.default_rng(K + N + g)
    ckpt, W = gptq_checkpoint(rng, K, N, g, dtype, checkpoint_format)
    w = formats.from_gptq(**ckpt, checkpoint_format=checkpoint_format)
    assert w.shape == (N, K) and w.group_size == g and w.zeros is not None and w.perm is None
    assert w.dtype == dtype
    expect_equal(w.dequantize(torch.float32), W)
    back = formats.to_gptq(w, checkpoint_format=checkpoint_format)
    for key in ckpt:
        expect_equal(back[key], ckpt[key])


@pytest.mark.parametrize("checkpoint_format,stored", [("gptq", 7), ("gptq_v2", 8)])
def test_gptq_symmetric_becomes_zeros_none(checkpoint_format, stored):
    rng = np.random.default_rng(1)
    ckpt, W = gptq_checkpoint(rng, 128, 16, 64, torch.float16, checkpoint_format, stored_zero=stored)
    if checkpoint_format == "gptq":
        assert int(ckpt["qzeros"][0, 0]) == 0x77777777
    w = formats.from_gptq(**ckpt, checkpoint_format=checkpoint_format)
    assert w.symmetric
    expect_equal(w.dequantize(torch.float32), W)
    expect_equal(formats.to_gptq(w, checkpoint_format)["qzeros"], ckpt["qzeros"])


def test_gptq_default_g_idx_is_ignored():
    rng = np.random.default_rng(2)
    ckpt, W = gptq_checkpoint(rng, 128, 8, 32, torch.float16, "gptq")
    a = formats.from_gptq(**ckpt)
    ckpt.pop("g_idx")
    b = formats.from_gptq(**ckpt)
    assert a.perm is None and b.perm is None
    expect_equal(a.qweight, b.qweight)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("g", [32, 64])
def test_gptq_act_order_round_trip(g, dtype):
    K, N, M = 256, 24, 5
    rng = np.random.default_rng(g)
    ckpt, W = gptq_checkpoint(rng, K, N, g, dtype, "gptq", act_order=True)
    w = formats.from_gptq(**ckpt)
    assert w.perm is not None and w.perm.dtype == torch.int64
    expect_equal(w.perm, torch.argsort(ckpt["g_idx"].long(), stable=True))
    # groups are contiguous in stored order
    expect_equal(ckpt["g_idx"].long()[w.perm], torch.arange(K) // g)
    expect_equal(w.dequantize(torch.float32), W)

    x = torch.randn(M, K, generator=torch.Generator().manual_seed(g)).to(dtype)
    y = w4a16.reference.gemm(x, w)
    assert y.dtype == dtype and y.shape == (M, N)
    ref = x.float() @ W.T
    torch.testing.assert_close(y.float(), ref, rtol=8e-3 if dtype == torch.bfloat16 else 1e-3, atol=1e-3)

    back = formats.to_gptq(w)
    for key in ckpt:
        expect_equal(back[key], ckpt[key])


# ----------------------------------------------------------------------------- AWQ
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("K,N,g", [(256, 32, 64), (128, 16, 128), (64, 8, -1)])
def test_awq_bit_exact(K, N, g, dtype):
    rng = np.random.default_rng(K * N)
    G = 1 if g == -1 else K // g
    ge = K if g == -1 else g
    q = rng.integers(0, 16, size=(K, N))
    z = rng.integers(0, 16, size=(G, N))
    scales = rand_scales(rng, (G, N), dtype)
    ckpt = {"qweight": pack_along_cols(q, AWQ_ORDER), "qzeros": pack_along_cols(z, AWQ_ORDER), "scales": scales}
    gi = torch.arange(K) // ge
    W = ((torch.tensor(q, dtype=torch.float32) - torch.tensor(z, dtype=torch.float32)[gi]) * scales.float()[gi]).T

    w = formats.from_awq(**ckpt)
    # a single group row reads as per-channel (-1), which is the same weight as g == K
    assert w.shape == (N, K) and w.group_size == (-1 if G == 1 else g) and w.perm is None
    expect_equal(w.dequantize(torch.float32), W.contiguous())
    back = formats.to_awq(w)
    for key in ckpt:
        expect_equal(back[key], ckpt[key])


def test_awq_interleave_single_word():
    # one word, codes 0..7 in output columns 0..7: nibble i must hold column AWQ_ORDER[i]
    q = np.arange(8).reshape(1, 8).repeat(2, axis=0)
    qweight = torch.tensor([[word(AWQ_ORDER)]] * 2, dtype=torch.int32)
    assert torch.equal(qweight, pack_along_cols(q, AWQ_ORDER))
    w = formats.from_awq(qweight, pack_along_cols(np.full((1, 8), 3), AWQ_ORDER),
                         torch.ones(1, 8, dtype=torch.float16))
    expect_equal(w.unpack(), torch.arange(8, dtype=torch.uint8).reshape(8, 1).repeat(1, 2))


# ----------------------------------------------------------------------------- compressed-tensors
def ct_checkpoint(rng, K, N, g, dtype, asymmetric, act_order=False):
    G = 1 if g == -1 else K // g
    ge = K if g == -1 else g
    v = rng.integers(-8, 8, size=(N, K))                     # signed int4 values
    zp = rng.integers(-8, 8, size=(N, G)) if asymmetric else np.zeros((N, G), dtype=np.int64)
    g_idx = shuffled_g_idx(rng, K, ge) if act_order else np.arange(K) // ge
    scales = rand_scales(rng, (N, G), dtype)
    gi = torch.tensor(g_idx)
    W = (torch.tensor(v, dtype=torch.float32) - torch.tensor(zp, dtype=torch.float32)[:, gi]) * scales.float()[:, gi]
    ckpt = {"weight_packed": pack_along_cols(v + 8), "weight_scale": scales,
            "weight_shape": torch.tensor([N, K], dtype=torch.int64)}
    if asymmetric:
        ckpt["weight_zero_point"] = pack_along_rows(zp + 8)
    if act_order:
        ckpt["weight_g_idx"] = torch.tensor(g_idx, dtype=torch.int32)
    return ckpt, W


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("asymmetric", [False, True])
@pytest.mark.parametrize("K,N,g,act_order", [(256, 24, 32, False), (128, 20, 64, True), (100, 12, -1, False),
                                              (512, 9, 256, True)])
def test_compressed_tensors_bit_exact(K, N, g, act_order, asymmetric, dtype):
    rng = np.random.default_rng(K + N)
    ckpt, W = ct_checkpoint(rng, K, N, g, dtype, asymmetric, act_order)
    w = formats.from_compressed_tensors(**ckpt)
    assert w.shape == (N, K) and w.group_size == g
    assert w.symmetric == (not asymmetric)
    assert (w.perm is not None) == act_order
    expect_equal(w.dequantize(torch.float32), W)
    back = formats.to_compressed_tensors(w)
    assert set(back) == set(ckpt)
    for key in ckpt:
        expect_equal(back[key], ckpt[key])


def test_compressed_tensors_all_zero_points_eight_is_symmetric():
    rng = np.random.default_rng(3)
    ckpt, W = ct_checkpoint(rng, 64, 16, 32, torch.float16, asymmetric=False)
    w = formats.from_compressed_tensors(**ckpt, weight_zero_point=pack_along_rows(np.full((16, 2), 8)))
    assert w.symmetric
    expect_equal(w.dequantize(torch.float32), W)


def test_compressed_tensors_shape_as_ints():
    rng = np.random.default_rng(4)
    ckpt, W = ct_checkpoint(rng, 64, 8, 32, torch.bfloat16, asymmetric=True)
    ckpt["weight_shape"] = (8, 64)
    expect_equal(formats.from_compressed_tensors(**ckpt).dequantize(torch.float32), W)


# ----------------------------------------------------------------------------- HQQ
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("K,N,g", [(256, 12, 64), (128, 6, 128), (64, 4, -1)])
def test_hqq_bit_exact(K, N, g, dtype):
    rng = np.random.default_rng(K - N)
    ge = K if g == -1 else g
    R = N * K // ge
    Q = rng.integers(0, 16, size=(R, ge))                  # the weight reshaped to [-1, g]
    W_q = np.zeros((R // 2, ge), dtype=np.uint8)
    for r in range(R // 2):
        for c in range(ge):
            W_q[r, c] = (Q[r, c] << 4) | Q[r + R // 2, c]
    scale = rand_scales(rng, (R, 1), dtype)
    zero = torch.tensor(rng.uniform(0, 15, size=(R, 1)), dtype=torch.float32).to(dtype)
    W = ((torch.tensor(Q, dtype=torch.float32) - zero.float()) * scale.float()).reshape(N, K)

    w = formats.from_hqq(torch.from_numpy(W_q), scale, zero, (N, K), None if g == -1 else g)
    assert w.shape == (N, K) and w.group_size == g and not w.symmetric
    expect_equal(w.dequantize(torch.float32), W)
    back = formats.to_hqq(w)
    expect_equal(back["W_q"], torch.from_numpy(W_q))
    expect_equal(back["scale"], scale)
    expect_equal(back["zero"], zero)
    assert back["shape"] == (N, K)


# ----------------------------------------------------------------------------- exporters from quantize()
@pytest.mark.parametrize("symmetric", [True, False])
def test_exporters_round_trip_quantized_weight(symmetric):
    torch.manual_seed(0)
    w = w4a16.quantize(torch.randn(32, 128), group_size=32, symmetric=symmetric)
    ref = w.dequantize(torch.float32)
    expect_equal(formats.from_gptq(**formats.to_gptq(w, "gptq_v2"), checkpoint_format="gptq_v2")
                 .dequantize(torch.float32), ref)
    expect_equal(formats.from_awq(**formats.to_awq(w)).dequantize(torch.float32), ref)
    expect_equal(formats.from_compressed_tensors(**formats.to_compressed_tensors(w)).dequantize(torch.float32), ref)
    expect_equal(formats.from_hqq(**formats.to_hqq(w)).dequantize(torch.float32), ref)


# ----------------------------------------------------------------------------- validation errors
def _gptq():
    ckpt, _ = gptq_checkpoint(np.random.default_rng(5), 128, 16, 32, torch.float16, "gptq")
    return ckpt


def _awq():
    rng = np.random.default_rng(6)
    return {"qweight": pack_along_cols(rng.integers(0, 16, (64, 16)), AWQ_ORDER),
            "qzeros": pack_along_cols(rng.integers(0, 16, (2, 16)), AWQ_ORDER),
            "scales": rand_scales(rng, (2, 16), torch.float16)}


def _ct():
    ckpt, _ = ct_checkpoint(np.random.default_rng(7), 64, 16, 32, torch.float16, asymmetric=True)
    return ckpt


def _hqq():
    return formats.to_hqq(w4a16.quantize(torch.randn(8, 64, generator=torch.Generator().manual_seed(8)), 32, False))


def _with(make, **changes):
    d = make()
    d.update(changes)
    return d


def _act_order_weight():
    ckpt, _ = gptq_checkpoint(np.random.default_rng(9), 64, 8, 32, torch.float16, "gptq", act_order=True)
    return formats.from_gptq(**ckpt)


def _weight(zeros):
    w = w4a16.quantize(torch.randn(8, 64, generator=torch.Generator().manual_seed(10)), 32, symmetric=False)
    return w4a16.QuantizedWeight.from_plain(w.qweight, w.scales, torch.full_like(w.scales, zeros), 32)


def _unbalanced_g_idx(K, g):
    gi = torch.arange(K, dtype=torch.int32) // g
    gi[0] = 1
    return gi


CASES = {
    "bits": lambda: formats.from_gptq(**_gptq(), bits=8),
    "checkpoint_format": lambda: formats.from_gptq(**_gptq(), checkpoint_format="gptq_v3"),
    "qweight.dtype": lambda: formats.from_gptq(**_with(_gptq, qweight=_gptq()["qweight"].float())),
    "qweight": lambda: formats.from_gptq(**_with(_gptq, qweight=_gptq()["qweight"].flatten())),
    "qzeros.shape": lambda: formats.from_gptq(**_with(_gptq, qzeros=_gptq()["qzeros"][:, :1])),
    "scales.dtype": lambda: formats.from_gptq(**_with(_gptq, scales=_gptq()["scales"].float())),
    "scales.shape[1]": lambda: formats.from_gptq(**_with(_gptq, scales=_gptq()["scales"][:, :8])),
    "scales.shape[0]": lambda: formats.from_gptq(**_with(_gptq, scales=_gptq()["scales"][:3])),
    "g_idx.shape": lambda: formats.from_gptq(**_with(_gptq, g_idx=torch.zeros(64, dtype=torch.int32))),
    "g_idx.dtype": lambda: formats.from_gptq(**_with(_gptq, g_idx=torch.zeros(128))),
    "g_idx": lambda: formats.from_gptq(**_with(_gptq, g_idx=_unbalanced_g_idx(128, 32))),
    "awq qweight.dtype": lambda: formats.from_awq(**_with(_awq, qweight=_awq()["qweight"].long())),
    "awq qzeros.shape": lambda: formats.from_awq(**_with(_awq, qzeros=_awq()["qzeros"][:1])),
    "awq scales.shape[1]": lambda: formats.from_awq(**_with(_awq, scales=_awq()["scales"][:, :8])),
    "weight_shape": lambda: formats.from_compressed_tensors(**_with(_ct, weight_shape=(16, 64, 1))),
    "weight_packed.shape": lambda: formats.from_compressed_tensors(**_with(_ct, weight_shape=(16, 128))),
    "weight_scale.shape[0]": lambda: formats.from_compressed_tensors(
        **_with(_ct, weight_scale=_ct()["weight_scale"][:8])),
    "weight_zero_point.shape": lambda: formats.from_compressed_tensors(
        **_with(_ct, weight_zero_point=_ct()["weight_zero_point"][:, :1])),
    "weight_g_idx": lambda: formats.from_compressed_tensors(**_with(_ct, weight_g_idx=_unbalanced_g_idx(64, 32))),
    "W_q.dtype": lambda: formats.from_hqq(**_with(_hqq, W_q=_hqq()["W_q"].to(torch.int32))),
    "W_q.shape": lambda: formats.from_hqq(**_with(_hqq, W_q=_hqq()["W_q"][:4])),
    "scale.shape": lambda: formats.from_hqq(**_with(_hqq, scale=_hqq()["scale"].reshape(8, 2))),
    "zero.dtype": lambda: formats.from_hqq(**_with(_hqq, zero=_hqq()["zero"].bfloat16())),
    "group_size": lambda: formats.from_hqq(**_with(_hqq, group_size=48)),
    "w.perm": lambda: formats.to_awq(_act_order_weight()),
    "w.zeros": lambda: formats.to_gptq(_weight(2.5)),
    "w.zeros (v1 zero 16)": lambda: formats.to_gptq(_weight(16.0), "gptq"),  # v1 zeros are 0..15
    "w.shape[0] (N)": lambda: formats.to_awq(w4a16.quantize(torch.randn(12, 64), 32)),
    "w": lambda: formats.to_compressed_tensors(torch.zeros(4, 4)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_validation_error_names_argument(case):
    arg = case.split(" ")[-1] if case.startswith("awq ") else case.split(" (v1")[0]
    with pytest.raises(W4A16Error, match="^" + re.escape(arg + ": expected")):
        CASES[case]()


def test_g_idx_error_message_names_the_group():
    msg = "g_idx: expected exactly 32 columns in every group, got 31 columns in group 0"
    with pytest.raises(W4A16Error, match=re.escape(msg)):
        formats.from_gptq(**_with(_gptq, g_idx=_unbalanced_g_idx(128, 32)))
