"""Every bad input ends in a W4A16Error naming the right argument, never in an error from deep
inside Python or torch, and never in silent inf/NaN: quantize, from_plain, save/load, gemm's alpha."""
import json
import re

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import w4a16
from w4a16 import spec
from w4a16.errors import W4A16Error
from w4a16.pack import pack_nibbles

pytestmark = pytest.mark.usefixtures("reference_gemm")  # CPU tensors take the reference path


def raises_named(arg: str, *parts: str):
    """pytest.raises for a W4A16Error that starts with ``arg: expected`` and contains ``parts`` in order."""
    pattern = rf"^{re.escape(arg)}: expected " + "".join(rf".*{re.escape(p)}" for p in parts)
    return pytest.raises(W4A16Error, match=pattern)


# ---------------------------------------------------------------------------- quantize
@pytest.mark.parametrize("symmetric", [True, False])
def test_scales_overflowing_fp16_are_refused(symmetric, gen):
    weight = torch.randn(64, 256, generator=gen) * 1e6
    big = f"{float(weight.abs().max()):.5g}"
    with raises_named("weight", "(q - z) * scale fits torch.float16", "65504", f"got max |weight| = {big}"):
        w4a16.quantize(weight, symmetric=symmetric, dtype=torch.float16)


def test_large_weight_within_range_quantizes_finite(gen):
    weight = torch.randn(64, 256, generator=gen) * 1e6
    w = w4a16.quantize(weight, dtype=torch.bfloat16)  # bf16 has fp32's range
    assert bool(torch.isfinite(w.scales).all())
    x = torch.randn(3, 256, generator=gen).bfloat16()
    assert bool(torch.isfinite(w4a16.reference.gemm(x, w)).all())


@pytest.mark.parametrize("symmetric,limit", [(True, 65504 * 15 / 16), (False, 65504)])
def test_the_fp16_limit_is_where_the_kernels_overflow(symmetric, limit):
    """The kernels form (q - z) * s in fp16: the largest |value| of the grid must stay finite
    there, which is max |w| <= 15/16 of 65504 for symmetric weights (8 s, s = 2 max|w| / 15) and
    max - min <= 65504 for asymmetric ones. Just inside: every dequantized value is finite in fp16."""
    row = torch.linspace(-1.0, 1.0, 256) if symmetric else torch.linspace(0.0, 1.0, 256)
    inside = (row * limit * 0.999).repeat(4, 1)
    w = w4a16.quantize(inside, symmetric=symmetric, dtype=torch.float16)
    assert bool(torch.isfinite(w.dequantize(torch.float16)).all())
    with raises_named("weight", "fits torch.float16"):
        w4a16.quantize(row.repeat(4, 1) * limit * 1.01, symmetric=symmetric, dtype=torch.float16)


def test_tiny_weight_is_refused_in_fp16_and_kept_in_bf16():
    """Scales below fp16's range would round to 0: the group would quantize to all zeros."""
    with raises_named("weight", "representable in torch.float16", "torch.bfloat16", "would quantize to all zeros"):
        w4a16.quantize(torch.full((4, 256), 1e-9), dtype=torch.float16)
    w = w4a16.quantize(torch.full((4, 256), 1e-9), dtype=torch.bfloat16)
    assert abs(float(w.dequantize(torch.float32).mean()) - 1e-9) < 1e-10
    zero = w4a16.quantize(torch.zeros(4, 256), dtype=torch.float16)   # an all-zero weight is fine
    assert bool((zero.dequantize(torch.float32) == 0).all())


@pytest.mark.parametrize("group_size", [128.0, True, "128", None, np.float32(128)])
def test_group_size_must_be_an_int(group_size):
    with raises_named("group_size", "an int", type(group_size).__name__):
        w4a16.quantize(torch.randn(8, 256), group_size=group_size)


def test_numpy_int_group_size_is_accepted():
    assert w4a16.quantize(torch.randn(8, 256), group_size=np.int64(64)).group_size == 64


def test_per_channel_k0_names_the_weight():
    with raises_named("weight.shape", "non-empty", "(8, 0)"):
        w4a16.quantize(torch.randn(8, 0), group_size=-1)
    with raises_named("K", "at least 1", "0"):
        spec.check_group_size(-1, 0)


@pytest.mark.parametrize("shape", [(0, 256), (64, 0)])
def test_empty_weight_names_weight_not_qweight(shape):
    with raises_named("weight.shape", "non-empty", str(shape)):
        w4a16.quantize(torch.randn(*shape))


def test_meta_weight_is_refused_by_quantize():
    with raises_named("weight.device", "not meta", "meta"):
        w4a16.quantize(torch.randn(64, 256, device="meta"))


def test_meta_perm_is_refused_by_from_plain():
    q = torch.zeros(4, 128, dtype=torch.uint8, device="meta")
    s = torch.ones(4, 2, dtype=torch.float16, device="meta")
    with raises_named("perm.device", "not meta", "meta"):
        w4a16.QuantizedWeight.from_plain(q, s, perm=torch.arange(256, device="meta"))
    # Without values to check, a meta weight is still a valid placeholder.
    assert w4a16.QuantizedWeight.from_plain(q, s).shape == (4, 256)


def test_dtype_message_names_dtype():
    with pytest.raises(W4A16Error, match=r"^dtype: expected torch.float16 or torch.bfloat16, got torch.float32$"):
        w4a16.quantize(torch.randn(64, 256), dtype=torch.float32)


# ---------------------------------------------------------------------------- from_plain
def test_unpacked_codes_blame_qweight(gen):
    codes = torch.randint(0, 16, (64, 256), generator=gen, dtype=torch.uint8)
    scales = torch.ones(64, 256 // 128, dtype=torch.float16)
    with raises_named("qweight", "packed uint8 [N, K/2] (two codes per byte)", "(64, 256)",
                      "did you pass unpacked codes?"):
        w4a16.QuantizedWeight.from_plain(codes, scales, group_size=128)
    # Packed codes with wrong scales still blame the scales.
    with raises_named("scales.shape", "(64, 2)", "(64, 4)"):
        w4a16.QuantizedWeight.from_plain(pack_nibbles(codes), torch.ones(64, 4, dtype=torch.float16), group_size=128)


# ---------------------------------------------------------------------------- gemm alpha
def test_alpha_as_a_cpu_scalar_tensor(gen):
    w = w4a16.quantize(torch.randn(64, 256, generator=gen))
    x = torch.randn(3, 256, generator=gen).half()
    for alpha in (torch.tensor(0.5), torch.tensor(0.5, dtype=torch.float64), torch.tensor(2)):
        assert torch.equal(w4a16.gemm(x, w, alpha=alpha), w4a16.gemm(x, w, alpha=float(alpha)))
        assert torch.equal(w4a16.reference.gemm(x, w, alpha=alpha), w4a16.gemm(x, w, alpha=float(alpha)))


@pytest.mark.parametrize("alpha,got", [(torch.tensor([0.5]), "shape (1,)"), (torch.tensor(float("nan")), "nan"),
                                       (torch.tensor(True), "torch.bool")])
def test_bad_alpha_tensor(alpha, got, gen):
    w = w4a16.quantize(torch.randn(64, 256, generator=gen))
    with raises_named("alpha", "0-d tensor on the CPU", got):
        w4a16.gemm(torch.randn(3, 256).half(), w, alpha=alpha)


# ---------------------------------------------------------------------------- save / load
@pytest.fixture
def weight(gen):
    return w4a16.quantize(torch.randn(64, 256, generator=gen), group_size=64)


def test_load_a_directory(tmp_path):
    with raises_named("path", "a safetensors file", "a directory"):
        w4a16.load(tmp_path)
    with raises_named("path", "a safetensors file", "no such file"):
        w4a16.load(tmp_path / "missing.safetensors")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message without CUDA")
def test_load_to_cuda_without_cuda(tmp_path, weight):
    w4a16.save(weight, tmp_path / "w.safetensors")
    with raises_named("device", "a device torch can use", "'cuda'"):
        w4a16.load(tmp_path / "w.safetensors", device="cuda")


def test_save_creates_missing_folders(tmp_path, weight):
    path = tmp_path / "a" / "b" / "w.safetensors"
    w4a16.save(weight, path)
    assert torch.equal(w4a16.load(path).dequantize(), weight.dequantize())
    assert sorted(p.name for p in path.parent.iterdir()) == ["w.safetensors"]  # no temporary left
    with raises_named("path", "a file to write", "a directory"):
        w4a16.save(weight, tmp_path)


def test_load_wrong_qweight_shape_names_qweight(tmp_path, weight):
    tensors = {"weight.qweight": weight.qweight[:, :64].contiguous(), "weight.scales": weight.scales}
    meta = {"format": "w4a16", "format_version": "1", "content": "weight",
            "weights": json.dumps({"weight": {"group_size": 64, "shape": [64, 256], "symmetric": True,
                                              "has_perm": False}})}
    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata=meta)
    with raises_named("weight.qweight.shape", "(64, 128)", "(N, K) = (64, 256)", "got (64, 64)"):
        w4a16.load(tmp_path / "bad.safetensors")
