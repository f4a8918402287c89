"""W4A16Linear: a drop-in ``nn.Linear`` replacement that stores an int4 weight.

    y = x @ W^T + bias,   W[n, k] = (q[n, k] - z[n, k // g]) * s[n, k // g]

The module holds its weight as one :class:`QuantizedWeight`: scales, zeros and perm are
registered buffers (the same tensors as the weight's), the codes live in the weight, once, in
the layout of the backend that runs them. ``state_dict`` still carries the plain ``qweight``
(rebuilt when saved), ``load_state_dict``, ``.to()`` and ``.cuda()`` behave like any module's,
and every change of codes, scales or zeros reaches the next forward.
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


def codes_from_state_dict(state_dict, key: str, shape: tuple, device, strict: bool, missing_keys: list,
                          unexpected_keys: list, error_msgs: list) -> Optional[torch.Tensor]:
    """The plain uint8 codes of ``shape`` under ``key`` (which a module keeps out of its buffers), as
    a copy on ``device``, for a module's ``_load_from_state_dict``: the key is taken off
    ``unexpected_keys``; a missing key (with ``strict``) or a wrong tensor is reported in
    ``missing_keys`` / ``error_msgs`` and gives None."""
    if key in unexpected_keys:
        unexpected_keys.remove(key)
    if key not in state_dict:
        if strict:
            missing_keys.append(key)
        return None
    value = state_dict[key]
    if not isinstance(value, torch.Tensor) or value.dtype != torch.uint8 or tuple(value.shape) != tuple(shape):
        error_msgs.append(f"{key}: expected a uint8 tensor of shape {tuple(shape)}, got "
                          f"{getattr(value, 'dtype', type(value).__name__)} {tuple(getattr(value, 'shape', ()))}")
        return None
    return value.detach().to(device, copy=True)


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

    Forward takes ``x [..., K]`` in the module's dtype (fp16 or bf16) and returns ``[..., N]``,
    through ``w4a16.gemm(..., backend=module.backend)``: "auto" (default) or a backend name from
    ``w4a16.backends.registry()`` ("gluon", "triton", "reference"); settable at any time.
    ``module.to(dtype)`` with fp16/bf16 converts scales, zeros and bias (the module then serves
    that dtype); fp32 is not a serving dtype and ``forward`` rejects it.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, group_size: int = 128,
                 symmetric: bool = True, dtype: torch.dtype = torch.float16, device=None,
                 act_order: bool = False, backend: str = "auto"):
        super().__init__()
        self.backend = backend
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
        codes = torch.full((N, K // 2), _INIT_CODE_BYTE, dtype=torch.uint8, device=device)
        self.register_buffer("scales", torch.ones(N, groups, dtype=dtype, device=device))
        zeros = None if symmetric else torch.full((N, groups), float(spec.SYMMETRIC_ZERO), dtype=dtype, device=device)
        self.register_buffer("zeros", zeros)
        perm = torch.arange(K, dtype=torch.int64, device=device) if act_order else None
        self.register_buffer("perm", perm)
        if bias:
            self.bias = nn.Parameter(torch.zeros(N, dtype=dtype, device=device), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        self.__dict__["_w"] = QuantizedWeight(codes, self.scales, self.zeros, self.group_size, self.perm)
        self._share_params()

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_quantized(cls, w: QuantizedWeight, bias: Optional[torch.Tensor] = None,
                       backend: str = "auto") -> "W4A16Linear":
        """Wrap a QuantizedWeight (its tensors become the buffers, not copied when contiguous).

        Args:
            w: QuantizedWeight of shape (N, K) (its tensors are taken as they are: a weight was
                validated when it was built).
            bias: None or [N], any float dtype; converted to w's dtype and device.
            backend: the module's ``backend`` ("auto" or a backend name).
        """
        expect(isinstance(w, QuantizedWeight), "w", "a w4a16.QuantizedWeight", type(w).__name__)
        w = QuantizedWeight(w.plain_codes().contiguous(), *(None if t is None else t.contiguous() for t in w.params[:2]),
                            w.group_size, w.params.perm)
        N, K = w.shape
        if bias is not None:
            expect(isinstance(bias, torch.Tensor), "bias", "a torch.Tensor or None", type(bias).__name__)
            expect(tuple(bias.shape) == (N,), "bias.shape", (N,), tuple(bias.shape))
            expect(bias.dtype.is_floating_point, "bias.dtype", "a floating-point dtype", bias.dtype)
        mod = cls(K, N, bias=bias is not None, group_size=w.group_size, symmetric=w.zeros is None,
                  dtype=w.dtype, device="meta", act_order=w.perm is not None, backend=backend)
        mod.__dict__["_w"] = w
        mod._buffers.update(scales=w.scales, zeros=w.zeros, perm=w.perm)
        if bias is not None:
            mod.bias = nn.Parameter(bias.detach().to(device=w.device, dtype=w.dtype).contiguous(),
                                    requires_grad=False)
        return mod

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = 128, symmetric: bool = True,
                    dtype: Optional[torch.dtype] = None, backend: str = "auto") -> "W4A16Linear":
        """Quantize ``linear.weight`` [N, K] with :func:`w4a16.quantize` (round to nearest).

        ``dtype`` (scales, zeros, bias, activations) defaults to the linear's dtype when that is
        fp16/bf16, else fp16. The bias is copied. The result lives on the linear's device.
        ``backend``: the module's ``backend`` ("auto" or a backend name).
        """
        expect(isinstance(linear, nn.Linear), "linear", "a torch.nn.Linear", type(linear).__name__)
        w = quantize(linear.weight.detach(), group_size=group_size, symmetric=symmetric, dtype=dtype)
        return cls.from_quantized(w, linear.bias, backend=backend)

    # ------------------------------------------------------------------ the weight
    @property
    def weight_q(self) -> QuantizedWeight:
        """The module's weight (the object ``forward`` hands to :func:`w4a16.gemm`)."""
        return self._w

    @property
    def qweight(self) -> torch.Tensor:
        """uint8 [N, K // 2] plain codes (see ``QuantizedWeight.qweight``: once a kernel has
        repacked them, a copy rebuilt on access, whose in-place edits the next forward applies)."""
        return self._w.qweight

    @qweight.setter
    def qweight(self, value: torch.Tensor) -> None:
        self._w.qweight = value

    def __setattr__(self, name, value):
        if name == "backend":
            from .backends.selection import ORDER
            expect(value == "auto" or value in ORDER, "backend", f"'auto' or one of {ORDER}", repr(value))
        if name in ("scales", "zeros", "perm") and "_w" in self.__dict__:
            setattr(self._w, name, value)       # validated there; the buffer is the weight's alias
            value = getattr(self._w, name)
        super().__setattr__(name, value)

    def _share_params(self) -> None:
        """Hand the buffers to the weight (validated together) and take back its Watched aliases."""
        w = self._w
        w.set_params(self._buffers["scales"], self._buffers["zeros"], self._buffers["perm"])
        self._buffers.update(scales=w.scales, zeros=w.zeros, perm=w.perm)

    def _apply(self, fn, *args, **kwargs):
        out = super()._apply(fn, *args, **kwargs)
        codes = self._w.plain_codes()
        moved = fn(codes)
        if moved is not codes:  # a device move: the codes go along, layouts are rebuilt there
            self.__dict__["_w"] = QuantizedWeight(moved, self.scales, self.zeros, self.group_size, self.perm)
        self._share_params()
        return out

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        destination[prefix + "qweight"] = self._w.plain_codes() if keep_vars else self._w.plain_codes().detach()
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        key = prefix + "qweight"
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        codes = codes_from_state_dict(state_dict, key, (self.out_features, self.in_features // 2), self.scales.device,
                                      strict, missing_keys, unexpected_keys, error_msgs)
        if codes is None:
            return
        self._w.qweight = codes
        # scales, zeros and perm were copied into the registered buffers in place (or assigned)
        self._share_params()

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
    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None,
                epilogue: Optional[str] = None, norm_weight: Optional[torch.Tensor] = None,
                norm_eps: float = 1e-6, input_norm: Optional[tuple] = None):
        """x: [..., in_features] in the module's dtype (fp16/bf16) -> [..., out_features]
        (+ residual [..., out_features], added in fp32 before the cast); epilogue="silu_mul" for
        a paired gate/up weight: [..., out_features / 2]; "residual_rmsnorm" (with the residual and
        the norm's weight [out_features] and epsilon): the pair (h, RMSNorm(h)); input_norm
        (weight [in_features], eps): x RMS-normalized first (``w4a16.epilogue``, ``w4a16.gemm``)."""
        if residual is None and epilogue is None and input_norm is None:
            return gemm(x, self._w, self.bias, backend=self.backend)
        return gemm(x, self._w, self.bias, backend=self.backend, epilogue=epilogue, residual=residual,
                    norm_weight=norm_weight, norm_eps=norm_eps, input_norm=input_norm)

    def extra_repr(self) -> str:
        s = (f"in_features={self.in_features}, out_features={self.out_features}, "
             f"bias={self.bias is not None}, group_size={self.group_size}, symmetric={self.symmetric}, "
             f"dtype={spec.dtype_name(self.dtype)}")
        s += ", act_order=True" if self.act_order else ""
        return s + (f", backend={self.backend!r}" if self.backend != "auto" else "")
