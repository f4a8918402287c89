"""A QuantizedWeight's tensors can be edited any way torch allows without a stale result: edits
through ``.data`` are seen, numpy views are read-only, assignments are validated (the constructor
too), and the module's buffers are the weight's tensors."""
import copy
import pickle

import numpy as np
import pytest
import torch

from conftest import DEVICE, KERNEL_DTYPES
from kernel_cases import make_weight

import w4a16
from w4a16 import QuantizedWeight, W4A16Linear, reference
from w4a16.errors import W4A16Error
from w4a16.measure import TOLERANCE, rel_error
from w4a16.weight import Watched

DTYPE = KERNEL_DTYPES[0]


def _x(M, K, seed=0):
    return torch.randn(M, K, generator=torch.Generator().manual_seed(seed)).to(DTYPE).to(DEVICE)


def _check(w, x):
    """gemm (the kernel of this machine) equals the reference of the weight as it stands now."""
    y = w4a16.gemm(x, w)
    assert rel_error(y, reference.gemm(x, w)) <= TOLERANCE[DTYPE]


@pytest.mark.parametrize("edit", ["scales", "zeros", "qweight", "perm"])
def test_edits_through_data_are_seen(edit):
    w = make_weight(64, 256, 64, "int", DTYPE, DEVICE)
    w.perm = torch.randperm(256, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    x = _x(3, 256)
    _check(w, x)                                    # prepared: the kernels hold their own copies
    if edit == "scales":
        w.scales.data.mul_(2)
    elif edit == "zeros":
        w.zeros.data.add_(1)
    elif edit == "qweight":
        w.qweight.data.bitwise_xor_(0x5A)
    else:
        w.perm.data.copy_(w.perm.data.flip(0))
    _check(w, x)


def test_module_buffer_edits_through_data_are_seen():
    lin = W4A16Linear.from_quantized(make_weight(64, 256, 64, "int", DTYPE, DEVICE))
    x = _x(2, 256)
    before = lin(x)
    lin.scales.data.mul_(2)
    lin.zeros.data.sub_(1)
    after = lin(x)
    assert rel_error(after, reference.gemm(x, lin.weight_q)) <= TOLERANCE[DTYPE]
    assert not torch.equal(after, before)
    assert isinstance(lin.scales, Watched) and lin.scales.data_ptr() == lin.weight_q.scales.data_ptr()


def test_numpy_views_are_read_only():
    w = make_weight(8, 64, 32, "int", torch.float16, "cpu")
    for t in (w.scales, w.zeros, w.qweight):
        with pytest.raises(ValueError, match="read-only"):
            t.numpy()[0, 0] = 1
        with pytest.raises(ValueError, match="read-only"):
            np.asarray(t)[0, 0] = 1
    assert np.array_equal(w.scales.numpy(), w.scales.float().numpy().astype(np.float16))


def test_assigning_data_is_refused():
    w = make_weight(8, 64, 32, "int", torch.float16, "cpu")
    with pytest.raises(W4A16Error, match="data: expected no assignment"):
        w.scales.data = torch.ones(8, 2, dtype=torch.float16)


@pytest.mark.parametrize("attr,value,message", [
    ("scales", torch.ones(8, 4, dtype=torch.float16), r"scales.shape: expected \(8, 2\)"),
    ("scales", torch.ones(8, 2, dtype=torch.float32), "scales.dtype: expected torch.float16 or torch.bfloat16"),
    ("scales", torch.ones(8, 2, dtype=torch.bfloat16), "zeros.dtype: expected torch.bfloat16"),
    ("zeros", torch.ones(8, 2, dtype=torch.int32), "zeros.dtype: expected torch.float16"),
    ("zeros", torch.ones(2, 8, dtype=torch.float16), r"zeros.shape: expected \(8, 2\)"),
    ("perm", torch.arange(32), r"perm.shape: expected \(64,\)"),
    ("perm", torch.zeros(64, dtype=torch.int64), "perm: expected a permutation of 0..63"),
    ("perm", torch.arange(64, dtype=torch.int32), "perm.dtype: expected torch.int64"),
    ("group_size", 64, "scales.shape: expected"),
    ("group_size", 100, "group_size: expected one of"),
    ("qweight", torch.zeros(8, 16, dtype=torch.uint8), r"qweight.shape: expected \(8, 32\)"),
])
def test_assignments_are_validated(attr, value, message):
    w = make_weight(8, 64, 32, "int", torch.float16, "cpu")
    before = (w.scales.clone(), w.zeros.clone(), w.group_size)
    with pytest.raises(W4A16Error, match=message):
        setattr(w, attr, value)
    assert torch.equal(w.scales, before[0]) and torch.equal(w.zeros, before[1]) and w.group_size == before[2]


def test_set_params_changes_dtype_together():
    w = make_weight(8, 64, 32, "int", torch.float16, "cpu")
    w.set_params(w.scales.to(torch.bfloat16), w.zeros.to(torch.bfloat16))
    assert w.dtype == torch.bfloat16 and w.zeros.dtype == torch.bfloat16


@pytest.mark.parametrize("args,message", [
    ((torch.zeros(8, 32, dtype=torch.uint8), torch.ones(8, 4, dtype=torch.float16)), r"scales.shape: expected \(8, 2\)"),
    ((torch.zeros(8, 32, dtype=torch.uint8), torch.ones(8, 2)), "scales.dtype"),
    ((torch.zeros(8, 32, dtype=torch.int8), torch.ones(8, 2, dtype=torch.float16)), "qweight.dtype"),
    ((torch.zeros(8, 32, dtype=torch.uint8), torch.ones(8, 2, dtype=torch.float16), torch.ones(8, 2)), "zeros.dtype"),
])
def test_the_plain_constructor_validates(args, message):
    with pytest.raises(W4A16Error, match=message):
        QuantizedWeight(*args, group_size=32)


def test_integer_zeros_that_do_not_fit_are_refused():
    q, s = torch.zeros(8, 32, dtype=torch.uint8), torch.ones(8, 2, dtype=torch.float16)
    with pytest.raises(W4A16Error, match="zeros: expected integers of magnitude <= 2048"):
        QuantizedWeight.from_plain(q, s, torch.full((8, 2), 70000, dtype=torch.int32), 32)
    w = QuantizedWeight.from_plain(q, s, torch.full((8, 2), 9, dtype=torch.int32), 32)
    assert w.zeros.dtype == torch.float16 and bool((w.zeros == 9).all())


def test_copies_and_pickles_are_plain_and_independent():
    w = make_weight(8, 64, 32, "int", torch.float16, "cpu")
    for w2 in (copy.deepcopy(w), pickle.loads(pickle.dumps(w))):
        assert torch.equal(w2.scales, w.scales) and w2.scales.data_ptr() != w.scales.data_ptr()
        assert isinstance(w2.scales, Watched)
    t = copy.deepcopy(w.scales)
    assert isinstance(t, Watched) and torch.equal(t, w.scales)
    state = pickle.loads(pickle.dumps(w.scales))
    assert type(state) is torch.Tensor and torch.equal(state, w.scales)


def test_operations_return_plain_tensors():
    w = make_weight(8, 64, 32, "int", torch.float16, "cpu")
    assert type(w.scales * 2) is torch.Tensor and type(w.scales.t()) is torch.Tensor
    assert type(w.scales.data) is torch.Tensor


def test_reference_gemm_on_a_reassigned_weight():
    w = make_weight(16, 128, 64, "int", torch.float16, "cpu")
    x = torch.randn(2, 128).half()
    w.zeros = None
    w.scales = w.scales * 2
    ref = reference.gemm(x, w)
    W = w.dequantize(torch.float32)
    assert rel_error(ref, (x.float() @ W.t()).half()) < 1e-3


def test_concurrent_calls_on_the_cpu_are_right():
    """Four threads calling gemm at once (split-K configs share the CPU's tile counters, and Triton's
    interpreter keeps global state): every result equals the reference."""
    import threading
    ws = [make_weight(48, 512, 64, "int", DTYPE, DEVICE, seed=i) for i in range(4)]
    xs = [_x(5, 512, seed=i) for i in range(4)]
    refs = [reference.gemm(x, w) for x, w in zip(xs, ws)]
    bad = []

    def work(i):
        for _ in range(5):
            y = w4a16.gemm(xs[i], ws[i], config="decode")
            if rel_error(y, refs[i]) > TOLERANCE[DTYPE]:
                bad.append(i)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not bad


def test_one_weight_saved_under_two_names(tmp_path):
    w = make_weight(8, 64, 32, "int", torch.float16, "cpu")
    w4a16.save({"a": w, "b": w}, tmp_path / "two.safetensors")
    back = w4a16.load(tmp_path / "two.safetensors")
    assert torch.equal(back["a"].qweight, w.qweight) and torch.equal(back["b"].scales, w.scales)


def test_a_truncated_checkpoint_names_its_file(tmp_path):
    from tiny_models import TinyLM, write_hf_checkpoint
    source = TinyLM(vocab=48, d=64).half()
    w4a16.quantize_model(source, group_size=64, skip=(), progress=False, fuse=False)
    write_hf_checkpoint(str(tmp_path), "gptq", source)
    f = tmp_path / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - len(data) // 3])
    with pytest.raises(W4A16Error, match="model.safetensors"):
        w4a16.load_pretrained_quantized(TinyLM(vocab=48, d=64).half(), tmp_path)
