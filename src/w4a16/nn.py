"""W4A16Linear: a drop-in ``nn.Linear`` replacement that stores an int4 weight.

    y = x @ W^T + bias,   W[n, k] = (q[n, k] - z[n, k // g]) * s[n, k // g]

The module holds the plain interchange format as buffers (so ``state_dict``, ``.to()`` and
``.cuda()`` behave like any module's) and hands :func:`w4a16.gemm` a :class:`QuantizedWeight`
view over them. The view is cached while the buffers stay the same tensors with the same
contents, so layouts the kernels prepare from it (kept on the view) are built once, not per call.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from . import spec
from .errors import expect
from .ops import gemm
from .reference import quantize
from .weight import QuantizedWeight

_INIT_CODE_BYTE = 0x88  # two codes of 8: with z = 8 the initial weight is exactly 0


class W4A16Linear(nn.Module):
    """Linear layer with a 4-bit weight and fp16/bf16 activations.

    Buffers (N = out_features, K = in_features, g = group size, K if ``group_size == -1``):
        qweight: uint8 [N, K // 2], element k in byte k // 2, even k in the low nibble.
        scales:  ``dtype`` [N, K // g].
        zeros:   ``dtype`` [N, K // g] (asymmetric), or None (symmetric, z = 8).
        perm:    int64 [K] (act-order: stored K order is ``perm`` of the input features) or None.
        bias:    ``dtype`` [N] (a Parameter without grad, as in ``nn.Linear``) or None.

    A freshly constructed module computes ``y = bias`` (codes 8, zero points 8, scales 1,
    bias 0) until a state dict is loaded; use :meth:`from_linear` or :meth:`from_quantized`
    to build one from real weights.

    Forward takes ``x [..., K]`` in the module's dtype (fp16 or bf16) and returns ``[..., N]``.
    ``module.to(dtype)`` with fp16/bf16 converts scales, zeros and bias (the module then serves
    that dtype); fp32 is not a serving dtype and ``forward`` rejects it.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, group_size: int = 128,
                 symmetric: bool = True, dtype: torch.dtype = torch.float16, device=None,
                 act_order: bool = False):
        super().__init__()
        expect(isinstance(in_features, int) and in_features >= 2 and in_features % 2 == 0,
               "in_features", "an even int >= 2", in_features)
        expect(isinstance(out_features, int) and out_features >= 1, "out_features", "an int >= 1", out_features)
        g = spec.check_group_size(group_size, in_features)
        expect(dtype in spec.ACTIVATION_DTYPES, "dtype", "torch.float16 or torch.bfloat16", dtype)
        N, K = out_features, in_features
        self.in_features = K
        self.out_features = N
        self.group_size = int(group_size)
        groups = K // g
        self.register_buffer("qweight", torch.full((N, K // 2), _INIT_CODE_BYTE, dtype=torch.uint8, device=device))
        self.register_buffer("scales", torch.ones(N, groups, dtype=dtype, device=device))
        zeros = None if symmetric else torch.full((N, groups), float(spec.SYMMETRIC_ZERO), dtype=dtype, device=device)
        self.register_buffer("zeros", zeros)
        perm = torch.arange(K, dtype=torch.int64, device=device) if act_order else None
        self.register_buffer("perm", perm)
        if bias:
            self.bias = nn.Parameter(torch.zeros(N, dtype=dtype, device=device), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        self._view: Optional[QuantizedWeight] = None
        self._view_key: Optional[tuple] = None

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_quantized(cls, w: QuantizedWeight, bias: Optional[torch.Tensor] = None) -> "W4A16Linear":
        """Wrap a QuantizedWeight (its tensors become the buffers, not copied when contiguous).

        Args:
            w: QuantizedWeight of shape (N, K); validated again here.
            bias: None or [N], any float dtype; converted to w's dtype and device.
        """
        expect(isinstance(w, QuantizedWeight), "w", "a w4a16.QuantizedWeight", type(w).__name__)
        w = QuantizedWeight.from_plain(w.qweight, w.scales, w.zeros, w.group_size, w.perm)
        N, K = w.shape
        if bias is not None:
            expect(isinstance(bias, torch.Tensor), "bias", "a torch.Tensor or None", type(bias).__name__)
            expect(tuple(bias.shape) == (N,), "bias.shape", (N,), tuple(bias.shape))
            expect(bias.dtype.is_floating_point, "bias.dtype", "a floating-point dtype", bias.dtype)
        mod = cls(K, N, bias=bias is not None, group_size=w.group_size, symmetric=w.zeros is None,
                  dtype=w.dtype, device="meta", act_order=w.perm is not None)
        mod.qweight, mod.scales, mod.zeros, mod.perm = w.qweight, w.scales, w.zeros, w.perm
        if bias is not None:
            mod.bias = nn.Parameter(bias.detach().to(device=w.device, dtype=w.dtype).contiguous(),
                                    requires_grad=False)
        return mod

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = 128, symmetric: bool = True,
                    dtype: Optional[torch.dtype] = None) -> "W4A16Linear":
        """Quantize ``linear.weight`` [N, K] with :func:`w4a16.quantize` (round to nearest).

        ``dtype`` (scales, zeros, bias, activations) defaults to the linear's dtype when that is
        fp16/bf16, else fp16. The bias is copied. The result lives on the linear's device.
        """
        expect(isinstance(linear, nn.Linear), "linear", "a torch.nn.Linear", type(linear).__name__)
        w = quantize(linear.weight.detach(), group_size=group_size, symmetric=symmetric, dtype=dtype)
        return cls.from_quantized(w, linear.bias)

    # ------------------------------------------------------------------ the weight view
    def _buffers_key(self) -> tuple:
        # inference tensors have no version counter: they are identified by object and storage
        parts = (self.qweight, self.scales, self.zeros, self.perm)
        return tuple(None if t is None else (id(t), -1 if t.is_inference() else t._version, t.data_ptr())
                     for t in parts)

    @property
    def weight_q(self) -> QuantizedWeight:
        """A QuantizedWeight over the buffers (no copies), rebuilt whenever a buffer is replaced or
        changed in place (``.to()``, ``load_state_dict``, ``copy_``). Under torch.compile the view
        built by an eager call is reused as is (version counters cannot be traced)."""
        if torch.compiler.is_compiling():
            if self._view is not None:
                return self._view
            return QuantizedWeight(self.qweight, self.scales, self.zeros, self.group_size, self.perm)
        key = self._buffers_key()
        if self._view is None or key != self._view_key:
            self._view = QuantizedWeight(self.qweight, self.scales, self.zeros, self.group_size, self.perm)
            self._view_key = key
        return self._view

    def _apply(self, *args, **kwargs):
        self._view, self._view_key = None, None
        return super()._apply(*args, **kwargs)

    def _load_from_state_dict(self, *args, **kwargs):
        self._view, self._view_key = None, None
        return super()._load_from_state_dict(*args, **kwargs)

    @property
    def symmetric(self) -> bool:
        return self.zeros is None

    @property
    def act_order(self) -> bool:
        return self.perm is not None

    @property
    def dtype(self) -> torch.dtype:
        """The activation dtype the module serves (its scales' dtype)."""
        return self.scales.dtype

    # ------------------------------------------------------------------ compute
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., in_features] in the module's dtype (fp16/bf16) -> [..., out_features]."""
        return gemm(x, self.weight_q, self.bias)

    def extra_repr(self) -> str:
        s = (f"in_features={self.in_features}, out_features={self.out_features}, "
             f"bias={self.bias is not None}, group_size={self.group_size}, symmetric={self.symmetric}, "
             f"dtype={spec.dtype_name(self.dtype)}")
        return s + (", act_order=True" if self.act_order else "")
