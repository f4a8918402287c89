"""One prepared copy per weight, never a stale result, thread-safe preparation."""
import copy
import threading

import pytest
import torch

from conftest import DEVICE, KERNEL_DTYPES
from kernel_cases import make_weight

import w4a16
from w4a16 import W4A16Linear, reference
from w4a16.backends import registry
from w4a16.measure import TOLERANCE, rel_error

KERNEL = next((n for n, b in registry().items() if n != "reference" and b.available(DEVICE) is None), None)
needs_kernel = pytest.mark.skipif(KERNEL is None, reason="no kernel backend runs on this machine")
DTYPE = KERNEL_DTYPES[0]


def _x(M, K, seed=0):
    return torch.randn(M, K, generator=torch.Generator().manual_seed(seed)).to(DTYPE).to(DEVICE)


def _close(y, ref):
    return rel_error(y, ref) <= TOLERANCE[DTYPE]


@needs_kernel
def test_codes_are_held_once_after_the_first_call():
    w = make_weight(64, 256, 64, "int", DTYPE, DEVICE)
    w4a16.gemm(_x(2, 256), w)
    assert w._codes is None and len(w._layouts) == 1
    # The plain codes are rebuilt from the packed copy, bit for bit.
    assert torch.equal(w.plain_codes(), make_weight(64, 256, 64, "int", DTYPE, DEVICE).qweight)


@needs_kernel
def test_assignments_are_checked_without_unpacking_the_codes(monkeypatch):
    """Once the codes live only in a packed layout, validating a new scales / zeros / group size
    reads their shape, not the codes (no unpack of the whole weight per assignment)."""
    w = make_weight(64, 256, 64, "int", DTYPE, DEVICE)
    w4a16.gemm(_x(2, 256), w)
    assert w._codes is None
    b = registry()[KERNEL]
    unpacks = []
    real = type(b).unpack_codes
    monkeypatch.setattr(type(b), "unpack_codes", lambda self, p: (unpacks.append(1), real(self, p))[1])
    w.scales = w.scales.clone() * 2
    w.zeros = w.zeros.clone()
    w.set_params(w.scales.clone(), w.zeros.clone(), None)
    with pytest.raises(w4a16.W4A16Error, match="scales.shape: expected"):
        w.scales = torch.ones(64, 3, dtype=DTYPE, device=DEVICE)
    assert unpacks == []


@needs_kernel
def test_bound_calls_are_dropped_when_the_weight_changes():
    """gemm's eager fast path keeps one bound launch per kind of call; an edit found by the next
    call drops it (a bound launch holds a prepared copy) and binds a new one."""
    from w4a16.ops import bound_calls

    w = make_weight(64, 256, 64, "int", DTYPE, DEVICE)
    assert bound_calls(w) == []
    for _ in range(2):
        w4a16.gemm(_x(2, 256), w)
    first = bound_calls(w)
    assert len(first) == 1
    w4a16.gemm(_x(2, 256), w)
    assert bound_calls(w)[0] is first[0]
    w.scales.mul_(2)
    y = w4a16.gemm(_x(2, 256), w)
    now = bound_calls(w)
    assert len(now) == 1 and now[0] is not first[0]
    assert _close(y, reference.gemm(_x(2, 256), w))


@needs_kernel
@pytest.mark.parametrize("edit", ["scales_inplace", "zeros_inplace", "qweight_inplace", "qweight_held_inplace",
                                  "scales_assign", "qweight_assign"])
def test_edits_after_the_first_call_change_the_next_result(edit):
    w = make_weight(48, 256, 64, "int", DTYPE, DEVICE)
    x = _x(3, 256)
    held = w.qweight  # a caller that keeps the codes tensor it built the weight from
    y0 = w4a16.gemm(x, w)
    if edit == "scales_inplace":
        w.scales.mul_(2)
    elif edit == "zeros_inplace":
        w.zeros.add_(1)
    elif edit == "qweight_inplace":
        w.qweight.bitwise_xor_(0x5A)
    elif edit == "qweight_held_inplace":
        held.bitwise_xor_(0x5A)
    elif edit == "scales_assign":
        w.scales = w.scales * 3
    elif edit == "qweight_assign":
        w.qweight = w.qweight ^ 0x33
    y1 = w4a16.gemm(x, w)
    ref = reference.gemm(x, w)
    assert not torch.equal(y0, y1)
    assert _close(y1, ref), rel_error(y1, ref)


@needs_kernel
def test_module_follows_inplace_edits_assignment_and_load_state_dict():
    torch.manual_seed(0)
    lin = torch.nn.Linear(256, 40).to(DTYPE)
    mod = W4A16Linear.from_linear(lin, group_size=64, symmetric=False).to(DEVICE)
    x = _x(2, 256)
    y0 = mod(x)
    mod.scales.mul_(0.5)
    assert _close(mod(x), reference.gemm(x, mod.weight_q, mod.bias))
    mod.qweight.bitwise_xor_(0x0F)  # edits the rebuilt copy; the next forward applies them
    y2 = mod(x)
    assert _close(y2, reference.gemm(x, mod.weight_q, mod.bias)) and not torch.equal(y0, y2)
    mod.zeros = mod.zeros + 1
    assert _close(mod(x), reference.gemm(x, mod.weight_q, mod.bias))
    other = W4A16Linear.from_linear(torch.nn.Linear(256, 40).to(DTYPE), group_size=64, symmetric=False).to(DEVICE)
    mod.load_state_dict(other.state_dict())
    assert torch.equal(mod(x), other(x))


@needs_kernel
def test_module_holds_no_second_copy_of_the_codes():
    mod = W4A16Linear.from_linear(torch.nn.Linear(512, 128).to(DTYPE), group_size=128).to(DEVICE)
    mod(_x(1, 512))
    tensors = list(mod.buffers()) + list(mod.parameters())
    assert all(t.dtype != torch.uint8 for t in tensors)  # the codes are not a module buffer
    w = mod.weight_q
    assert w._codes is None and len(w._layouts) == 1
    assert set(mod.state_dict()) == {"qweight", "scales", "bias"}
    assert torch.equal(mod.state_dict()["qweight"], w.plain_codes())


@needs_kernel
def test_two_threads_prepare_once():
    """Concurrent first uses of one weight prepare it once and see the same prepared copy."""
    w = make_weight(64, 512, 128, None, DTYPE, DEVICE)
    calls = []
    b = registry()[KERNEL]
    real = b.prepare
    start = threading.Barrier(4)

    def counting(qweight, wt):
        calls.append(1)
        return real(qweight, wt)

    b.prepare = counting
    try:
        out = [None] * 4

        def work(i):
            start.wait()
            out[i] = w.prepared(b)

        threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        del b.prepare
    assert len(calls) == 1 and all(o is out[0] for o in out)
    x = _x(2, 512)
    assert _close(w4a16.gemm(x, w), reference.gemm(x, w))


def test_copies_carry_the_plain_form():
    w = make_weight(32, 128, 32, "float", torch.float16, "cpu")
    w2 = copy.deepcopy(w)
    assert torch.equal(w2.qweight, w.qweight) and w2._layouts == {}
    assert torch.equal(w2.dequantize(), w.dequantize())


@needs_kernel
def test_out_of_memory_during_prepare_leaves_the_weight_usable():
    w = make_weight(48, 256, 64, "int", DTYPE, DEVICE)
    x = _x(2, 256)
    b = registry()[KERNEL]
    real = b.prepare

    def out_of_memory(qweight, wt):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    b.prepare = out_of_memory
    try:
        with pytest.raises(torch.OutOfMemoryError):
            w4a16.gemm(x, w)
    finally:
        del b.prepare
    assert b.prepare == real and w._codes is not None and w._layouts == {}
    assert _close(w4a16.gemm(x, w), reference.gemm(x, w))
