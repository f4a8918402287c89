"""Gradients through gemm and W4A16Linear: dX = alpha * dY @ W and dbias = sum of dY (the int4
weight is frozen), against autograd through the fp32 reference, eagerly and under torch.compile."""
import pytest
import torch

from conftest import DEVICE, KERNEL_DTYPES
from kernel_cases import make_weight

import w4a16
from w4a16.measure import rel_error

DTYPE = KERNEL_DTYPES[0]
TOL = 5e-3


def _reference_grads(x, w, bias, alpha, g):
    xr = x.detach().float().requires_grad_()
    br = bias.detach().float().requires_grad_()
    y = alpha * (xr @ w.dequantize(torch.float32).T) + br
    y.backward(g.float())
    return xr.grad, br.grad


@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("act_order", [False, True])
def test_gemm_gradients(backend, act_order):
    N, K = 48, 256
    w = make_weight(N, K, 64, "int", DTYPE, DEVICE)
    if act_order:
        w = w4a16.QuantizedWeight.from_plain(w.qweight, w.scales, w.zeros, 64, torch.randperm(K).to(DEVICE))
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, K, generator=gen).to(DTYPE).to(DEVICE).requires_grad_()
    bias = torch.randn(N, generator=gen).to(DTYPE).to(DEVICE).requires_grad_()
    y = w4a16.gemm(x, w, bias, alpha=0.75, backend=backend)
    g = torch.randn(y.shape, generator=gen).to(DTYPE).to(DEVICE)
    y.backward(g)
    gx, gb = _reference_grads(x, w, bias, 0.75, g)
    assert x.grad.shape == x.shape and x.grad.dtype == DTYPE
    assert rel_error(x.grad, gx) <= TOL
    assert rel_error(bias.grad, gb) <= TOL


def test_module_gradient_to_input_and_trainable_bias():
    torch.manual_seed(0)
    mod = w4a16.W4A16Linear.from_linear(torch.nn.Linear(128, 32).to(DTYPE), group_size=32).to(DEVICE)
    mod.bias.requires_grad_(True)
    x = torch.randn(4, 128, dtype=DTYPE, device=DEVICE, requires_grad=True)
    mod(x).float().pow(2).sum().backward()
    xr = x.detach().float().requires_grad_()
    br = mod.bias.detach().float().requires_grad_()
    (xr @ mod.weight_q.dequantize(torch.float32).T + br).pow(2).sum().backward()
    assert rel_error(x.grad, xr.grad) <= TOL and rel_error(mod.bias.grad, br.grad) <= TOL


def test_no_grad_inputs_give_no_graph():
    w = make_weight(16, 64, 32, None, DTYPE, DEVICE)
    y = w4a16.gemm(torch.randn(2, 64, dtype=DTYPE, device=DEVICE), w)
    assert y.grad_fn is None and not y.requires_grad


def test_gradients_under_torch_compile():
    """aot_eager traces the custom op and its registered backward (no C++ compiler needed)."""
    w = make_weight(40, 128, 32, "float", DTYPE, DEVICE)
    x = torch.randn(3, 128, dtype=DTYPE, device=DEVICE, requires_grad=True)
    bias = torch.randn(40, dtype=DTYPE, device=DEVICE, requires_grad=True)
    w4a16.gemm(x.detach(), w, bias.detach())  # an eager call prepares the weight
    f = torch.compile(lambda x, b: w4a16.gemm(x, w, b, alpha=2.0), backend="aot_eager", fullgraph=True)
    y = f(x, bias)
    g = torch.randn_like(y)
    y.backward(g)
    gx, gb = _reference_grads(x, w, bias, 2.0, g)
    assert rel_error(x.grad, gx) <= TOL and rel_error(bias.grad, gb) <= TOL
