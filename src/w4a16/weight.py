"""QuantizedWeight: an int4 weight with group-wise scales and optional zero points."""
from __future__ import annotations

from typing import Optional

import torch

from . import spec
from .errors import expect
from .pack import unpack_nibbles


class QuantizedWeight:
    """A 4-bit weight in the plain interchange format.

    Attributes:
        qweight:    uint8 [N, K // 2]; element k in byte k // 2, even k in the low nibble.
        scales:     fp16/bf16 [N, K // g].
        zeros:      None (symmetric, z = 8) or [N, K // g] in scales' dtype, integer-valued or not.
        group_size: 32, 64, 128, 256 or -1 (one group over all of K), as given.
        perm:       None, or int64 [K]: the stored K order is ``perm`` of the input features
                    (GPTQ act-order); ``gemm`` gathers ``x[..., perm]`` first.
        shape:      (N, K).

    Kernel-private repacks of the same weight are cached in ``_prepared`` (see ``w4a16.prepare``).
    """

    def __init__(self, qweight, scales, zeros=None, group_size=128, perm=None):
        self.qweight = qweight
        self.scales = scales
        self.zeros = zeros
        self.group_size = int(group_size)
        self.perm = perm
        self._prepared: dict = {}

    @classmethod
    def from_plain(cls, qweight: torch.Tensor, scales: torch.Tensor, zeros: Optional[torch.Tensor] = None,
                   group_size: int = 128, perm: Optional[torch.Tensor] = None) -> "QuantizedWeight":
        """Wrap raw tensors after validating them (the B / scales / zero points of the C API).

        ``zeros`` may be an integer tensor; it is converted to scales' dtype.
        """
        expect(isinstance(qweight, torch.Tensor), "qweight", "a torch.Tensor", type(qweight).__name__)
        expect(isinstance(scales, torch.Tensor), "scales", "a torch.Tensor", type(scales).__name__)
        expect(qweight.dtype == torch.uint8, "qweight.dtype", torch.uint8, qweight.dtype)
        expect(qweight.dim() == 2, "qweight", "a 2-D tensor [N, K // 2]", f"{qweight.dim()}-D")
        N, K = qweight.shape[0], qweight.shape[1] * 2
        expect(N >= 1 and K >= 2, "qweight.shape", "[N >= 1, K // 2 >= 1]", tuple(qweight.shape))
        g = spec.check_group_size(group_size, K)
        spec.check_activation_dtype(scales.dtype, "scales")
        expect(tuple(scales.shape) == (N, K // g), "scales.shape", (N, K // g), tuple(scales.shape))
        expect(scales.device == qweight.device, "scales.device", qweight.device, scales.device)
        if zeros is not None:
            expect(isinstance(zeros, torch.Tensor), "zeros", "a torch.Tensor or None", type(zeros).__name__)
            expect(tuple(zeros.shape) == (N, K // g), "zeros.shape", (N, K // g), tuple(zeros.shape))
            expect(zeros.device == qweight.device, "zeros.device", qweight.device, zeros.device)
            if zeros.dtype.is_floating_point:
                expect(zeros.dtype == scales.dtype, "zeros.dtype", f"{scales.dtype} (scales' dtype)", zeros.dtype)
            zeros = zeros.to(scales.dtype).contiguous()
        if perm is not None:
            expect(tuple(perm.shape) == (K,), "perm.shape", (K,), tuple(perm.shape))
            expect(not perm.dtype.is_floating_point, "perm.dtype", "an integer dtype", perm.dtype)
            perm = perm.to(device=qweight.device, dtype=torch.int64).contiguous()
            expect(bool(torch.equal(torch.sort(perm).values.cpu(), torch.arange(K))), "perm",
                   f"a permutation of 0..{K - 1}", "repeated or out-of-range indices")
        return cls(qweight.contiguous(), scales.contiguous(), zeros, group_size, perm)

    # ------------------------------------------------------------------ properties
    @property
    def shape(self) -> tuple:
        return (self.qweight.shape[0], self.qweight.shape[1] * 2)

    @property
    def group_size_effective(self) -> int:
        """The group size in elements of K (K itself for per-channel)."""
        return self.shape[1] if self.group_size == -1 else self.group_size

    @property
    def dtype(self) -> torch.dtype:
        """The activation dtype this weight serves (its scales' dtype)."""
        return self.scales.dtype

    @property
    def device(self) -> torch.device:
        return self.qweight.device

    @property
    def symmetric(self) -> bool:
        return self.zeros is None

    def nbytes(self) -> int:
        """Bytes of the plain storage: codes, scales and zeros."""
        total = self.qweight.numel() + self.scales.numel() * self.scales.element_size()
        if self.zeros is not None:
            total += self.zeros.numel() * self.zeros.element_size()
        return total

    # ------------------------------------------------------------------ conversions
    def unpack(self) -> torch.Tensor:
        """Codes uint8 [N, K] in 0..15, in stored K order."""
        return unpack_nibbles(self.qweight)

    def dequantize_stored(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """W in stored K order (before undoing ``perm``), [N, K], computed in fp32 then cast."""
        g = self.group_size_effective
        q = self.unpack().float()
        s = self.scales.float().repeat_interleave(g, dim=1)
        z = spec.SYMMETRIC_ZERO if self.zeros is None else self.zeros.float().repeat_interleave(g, dim=1)
        return ((q - z) * s).to(dtype)

    def dequantize(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The weight W [N, K] such that ``gemm(x, w) == x @ W.T``; dtype defaults to scales'."""
        w = self.dequantize_stored(torch.float32)
        if self.perm is not None:
            w = torch.empty_like(w).index_copy_(1, self.perm, w)
        return w.to(dtype or self.dtype)

    def to(self, device) -> "QuantizedWeight":
        """A copy on ``device`` (prepared layouts are rebuilt there on first use)."""
        mv = lambda t: None if t is None else t.to(device)  # noqa: E731
        return QuantizedWeight(mv(self.qweight), mv(self.scales), mv(self.zeros), self.group_size, mv(self.perm))

    def __repr__(self) -> str:
        N, K = self.shape
        kind = "symmetric" if self.zeros is None else "asymmetric"
        order = ", act-order" if self.perm is not None else ""
        return (f"QuantizedWeight(N={N}, K={K}, group_size={self.group_size}, {kind}{order}, "
                f"dtype={spec.dtype_name(self.dtype)}, device={self.device})")
