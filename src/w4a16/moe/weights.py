"""QuantizedExperts: the int4 weights of a mixture-of-experts layer's experts, stacked."""
from __future__ import annotations

from typing import Optional

import torch

from .. import spec
from ..errors import expect
from ..pack import unpack_nibbles


class QuantizedExperts:
    """E experts' int4 weights of one projection, W[e] [N, K] = (q - z) * s group-wise along K.

    qweight: uint8 [E, N, K/2] (the plain layout of FORMATS.md per expert: element k in byte k//2,
             even k in the low nibble); scales: fp16/bf16 [E, N, K/g]; zeros: None (symmetric,
             z = 8) or float [E, N, K/g] in scales' dtype; group_size: 32, 64, 128, 256 or -1 (= K).

    The experts are one :class:`w4a16.QuantizedWeight` [E * N, K] (``weight``), so they share its
    storage rules (docs/guide.md, "Memory: one copy of the codes"): once a kernel has repacked
    the codes into its layout, that copy is the only one and ``qweight`` is rebuilt from it when
    asked for; ``qweight``, ``scales`` and ``zeros`` are views of the weight's tensors (their
    in-place edits, ``.data`` included, reach the next call). The object is otherwise immutable:
    build a new one to change a part.
    """

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, zeros: Optional[torch.Tensor] = None,
                 group_size: int = 128):
        from ..weight import QuantizedWeight

        expect(isinstance(qweight, torch.Tensor) and qweight.dim() == 3, "qweight", "a 3-D tensor [E, N, K/2]",
               f"{qweight.dim()}-D" if isinstance(qweight, torch.Tensor) else type(qweight).__name__)
        expect(qweight.dtype == torch.uint8, "qweight.dtype", torch.uint8, qweight.dtype)
        E, N, K2 = qweight.shape
        expect(E >= 1 and N >= 1 and K2 >= 1, "qweight.shape", "E, N and K/2 >= 1", tuple(qweight.shape))
        K = 2 * K2
        g = spec.check_group_size(group_size, K)
        expect(isinstance(scales, torch.Tensor), "scales", "a torch.Tensor", type(scales).__name__)
        spec.check_activation_dtype(scales.dtype, "scales")
        expect(tuple(scales.shape) == (E, N, K // g), "scales.shape", (E, N, K // g), tuple(scales.shape))
        expect(scales.device == qweight.device, "scales.device", qweight.device, scales.device)
        if zeros is not None:
            expect(isinstance(zeros, torch.Tensor), "zeros", "a torch.Tensor or None", type(zeros).__name__)
            expect(zeros.dtype == scales.dtype, "zeros.dtype", scales.dtype, zeros.dtype)
            expect(tuple(zeros.shape) == tuple(scales.shape), "zeros.shape", tuple(scales.shape), tuple(zeros.shape))
            expect(zeros.device == qweight.device, "zeros.device", qweight.device, zeros.device)
        flat = lambda t: None if t is None else t.contiguous().reshape(E * N, -1)  # noqa: E731
        self._w = QuantizedWeight(flat(qweight), flat(scales), flat(zeros), group_size)
        self._E = E
        self.group_size = int(group_size)

    @property
    def weight(self):
        """The experts as one QuantizedWeight [E * N, K] (expert e: rows e*N .. e*N + N - 1)."""
        return self._w

    def _view(self, t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        from ..weight import Watched

        return None if t is None else Watched.wrap(t.view(self._E, -1, t.shape[1]))

    @property
    def qweight(self) -> torch.Tensor:
        """uint8 [E, N, K/2] plain codes (see ``QuantizedWeight.qweight``)."""
        return self._view(self._w.qweight)

    @property
    def scales(self) -> torch.Tensor:
        """[E, N, K/g] in the activation dtype."""
        return self._view(self._w.scales)

    @property
    def zeros(self) -> Optional[torch.Tensor]:
        """None or [E, N, K/g] in the activation dtype."""
        return self._view(self._w.zeros)

    def plain_parts(self) -> tuple:
        """(codes uint8 [E, N, K/2], scales [E, N, K/g], zeros or None) as plain tensors (what a
        custom op or a kernel takes); the codes as :meth:`plain_codes` gives them."""
        p = self._w.params
        E = self._E
        return (self.plain_codes(),) + tuple(None if t is None else t.view(E, -1, t.shape[1])
                                             for t in (p.scales, p.zeros))

    def plain_codes(self) -> torch.Tensor:
        """uint8 [E, N, K/2] plain codes without holding a rebuilt copy (``QuantizedWeight.plain_codes``)."""
        return self._w.plain_codes().view(self._E, -1, self._w.shape[1] // 2)

    @classmethod
    def quantize(cls, weight: torch.Tensor, group_size: int = 128, symmetric: bool = True,
                 dtype: Optional[torch.dtype] = None) -> "QuantizedExperts":
        """Round-to-nearest int4 of float expert weights [E, N, K], expert by expert as
        :func:`w4a16.quantize` does it (one expert's fp32 temporaries at a time)."""
        from ..reference import quantize

        expect(isinstance(weight, torch.Tensor) and weight.dim() == 3, "weight", "a 3-D tensor [E, N, K]",
               f"{weight.dim()}-D" if isinstance(weight, torch.Tensor) else type(weight).__name__)
        return cls.stack([quantize(weight[e], group_size, symmetric, dtype) for e in range(weight.shape[0])])

    @classmethod
    def stack(cls, weights) -> "QuantizedExperts":
        """The experts ``weights`` (QuantizedWeights [N, K] of one shape, group size and dtype, no
        act-order; an expert without zero points gets z = 8 where another has them), stacked."""
        from ..weight import join_parts

        first = weights[0]
        for i, w in enumerate(weights):
            expect(w.shape == first.shape, f"weights[{i}].shape", first.shape, w.shape)
            expect(w.group_size_effective == first.group_size_effective, f"weights[{i}] group size",
                   first.group_size_effective, w.group_size_effective)
            expect(w.params.perm is None, f"weights[{i}].perm", "None (experts without act-order)", "a permutation")
        g, K = first.group_size_effective, first.shape[1]
        return cls(*join_parts(weights, torch.stack), -1 if g == K else g)

    @property
    def shape(self) -> tuple:
        """(E, N, K)."""
        EN, K = self._w.shape
        return self._E, EN // self._E, K

    @property
    def group_size_effective(self) -> int:
        return self.shape[2] if self.group_size == -1 else self.group_size

    @property
    def dtype(self) -> torch.dtype:
        """The activation dtype the experts serve (their scales' dtype)."""
        return self._w.dtype

    @property
    def device(self) -> torch.device:
        return self._w.device

    def nbytes(self) -> int:
        """Bytes of codes (one copy), scales and zeros."""
        E, N, K = self.shape
        p = self._w.params
        return E * N * K // 2 + sum(t.numel() * t.element_size() for t in (p.scales, p.zeros) if t is not None)

    def unpack(self) -> torch.Tensor:
        """Codes uint8 [E, N, K] in 0..15."""
        E, N, K = self.shape
        return unpack_nibbles(self.plain_codes().reshape(E * N, K // 2)).reshape(E, N, K)

    def dequantize(self, dtype: torch.dtype = torch.float32, experts=None) -> torch.Tensor:
        """W [E, N, K] (or [len(experts), N, K] for the indices ``experts``), computed in fp32, cast."""
        from ..weight import dequantize_codes

        E, N, K = self.shape
        idx = slice(None) if experts is None else experts
        q, s = self.plain_codes()[idx], self.scales[idx]
        z = None if self.zeros is None else self.zeros[idx]
        n = q.shape[0]
        w = dequantize_codes(unpack_nibbles(q.reshape(n * N, K // 2)), s.reshape(n * N, -1),
                             None if z is None else z.reshape(n * N, -1), self.group_size_effective, dtype)
        return w.reshape(n, N, K)

    def to(self, device, dtype: Optional[torch.dtype] = None) -> "QuantizedExperts":
        """On ``device``, scales and zeros in ``dtype`` (default: theirs)."""
        move = lambda t: None if t is None else t.to(device, dtype or t.dtype)  # noqa: E731
        return QuantizedExperts(self.plain_codes().to(device), move(self.scales), move(self.zeros), self.group_size)

    def __repr__(self) -> str:
        E, N, K = self.shape
        return (f"QuantizedExperts(E={E}, N={N}, K={K}, group_size={self.group_size}, "
                f"{'asymmetric' if self.zeros is not None else 'symmetric'}, {spec.dtype_name(self.dtype)})")
