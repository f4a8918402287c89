"""QuantizedWeight: an int4 weight with group-wise scales and optional zero points."""
from __future__ import annotations

import threading
import weakref
from typing import Any, NamedTuple, Optional

import torch

from . import spec
from .errors import expect
from .backends.workspace import remember
from .pack import unpack_nibbles

MAX_LAYOUTS = 2  # prepared copies kept per weight (one per backend layout in use)


def dequantize_codes(codes: torch.Tensor, scales: torch.Tensor, zeros: Optional[torch.Tensor], group: int,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The contract's W = (q - z) * s in fp32, cast to ``dtype``: codes uint8 [N, K] (0..15),
    scales and zeros (None: z = 8) [N, ceil(K / group)], group the effective group size."""
    K = codes.shape[1]
    q = codes.float()
    s = scales.float().repeat_interleave(group, dim=1)[:, :K]
    z = spec.SYMMETRIC_ZERO if zeros is None else zeros.float().repeat_interleave(group, dim=1)[:, :K]
    return ((q - z) * s).to(dtype)


class _Prepared(NamedTuple):
    prepared: Any  # the backend's object
    gen: int       # the codes generation it was built from
    params: tuple  # the scales' and zeros' identity and version it was built from


def _version(t: Optional[torch.Tensor]):
    """What changes when ``t`` is replaced or edited in place (inference tensors: identity only)."""
    if t is None:
        return None
    return id(t), (-1 if t.is_inference() else t._version)


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

    One copy of the codes. A kernel backend repacks the codes into its private layout on first
    use (``w4a16.prepare``) and the weight then keeps that copy only: ``qweight`` is rebuilt from
    it when asked for (``save``, exporters, ``dequantize``), and the plain tensor the weight was
    built from is only watched (weakly) from then on. Scales, zeros and perm stay as given.

    Never stale: every kernel call checks (by identity and version counter) ``scales``, ``zeros``
    and the codes tensor that ``qweight`` last handed out (or was built from, while someone holds
    it), and re-prepares what changed: in-place edits, reassignment, ``load_state_dict``.
    Edits of an inference tensor (``torch.inference_mode``) cannot be seen: replace it instead.
    """

    def __init__(self, qweight, scales, zeros=None, group_size=128, perm=None):
        self._shape = (qweight.shape[0], qweight.shape[1] * 2)
        self._codes: Optional[torch.Tensor] = qweight     # plain codes held strongly, or None
        self._codes_ver = _version(qweight)
        self._watch: Optional[weakref.ref] = None        # plain codes handed out, held weakly
        self._watch_ver = None
        self._gen = 0                                    # bumped whenever the codes change
        self._layouts: dict = {}                         # (backend, layout) -> _Prepared
        self._calls: dict = {}                           # w4a16.gemm's bound eager calls
        self._finite: Optional[tuple] = None             # (params version, scales/zeros finite)
        self._lock = threading.Lock()
        self.scales = scales
        self.zeros = zeros
        self.group_size = int(group_size)
        self.perm = perm

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
        # Unpacked [N, K] codes: the scales then fit K = qweight.shape[1], not 2 * qweight.shape[1].
        unpacked = (group_size != -1 and tuple(scales.shape) != (N, K // g) and (K // 2) % g == 0
                    and tuple(scales.shape) == (N, K // 2 // g))
        expect(not unpacked, "qweight", "packed uint8 [N, K/2] (two codes per byte)",
               f"[N, K]-shaped {tuple(qweight.shape)} whose columns match scales {tuple(scales.shape)} "
               f"for K = {K // 2}: did you pass unpacked codes? (w4a16.pack.pack_nibbles packs them)")
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
            expect(not perm.is_meta and not qweight.is_meta, "perm.device",
                   "a device holding data (not meta): perm's values are checked",
                   "meta" if perm.is_meta else "qweight on meta")
            perm = perm.to(device=qweight.device, dtype=torch.int64).contiguous()
            expect(bool(torch.equal(torch.sort(perm).values.cpu(), torch.arange(K))), "perm",
                   f"a permutation of 0..{K - 1}", "repeated or out-of-range indices")
        return cls(qweight.contiguous(), scales.contiguous(), zeros, group_size, perm)

    # ------------------------------------------------------------------ the codes
    @property
    def qweight(self) -> torch.Tensor:
        """uint8 [N, K // 2] plain codes. After a kernel repacked them this is rebuilt from the
        packed copy and held until the next kernel call (which applies in-place edits made to it)."""
        t = self._codes
        if t is None:
            t = self._watched()
        if t is None:
            t = self._rebuild()
            self._codes, self._codes_ver = t, _version(t)
        return t

    @qweight.setter
    def qweight(self, value: torch.Tensor) -> None:
        expect(isinstance(value, torch.Tensor) and value.dtype == torch.uint8, "qweight",
               "a uint8 tensor", getattr(value, "dtype", type(value).__name__))
        expect(tuple(value.shape) == (self._shape[0], self._shape[1] // 2), "qweight.shape",
               (self._shape[0], self._shape[1] // 2), tuple(value.shape))
        with self._lock:
            self._codes, self._codes_ver = value, _version(value)
            self._watch = None
            self._gen += 1
            self._layouts = {}
            self._calls = {}

    def plain_codes(self) -> torch.Tensor:
        """The plain codes without holding a rebuilt copy (for ``save`` and exporters)."""
        t = self._codes if self._codes is not None else self._watched()
        if t is None:
            t = self._rebuild()
            self._watch, self._watch_ver = weakref.ref(t), _version(t)
        return t

    def _watched(self) -> Optional[torch.Tensor]:
        return None if self._watch is None else self._watch()

    def _rebuild(self) -> torch.Tensor:
        from .backends.selection import get

        for (name, _), entry in self._layouts.items():
            if entry.gen == self._gen and get(name).owns_codes:
                return get(name).unpack_codes(entry.prepared)
        raise RuntimeError("QuantizedWeight lost its codes")  # pragma: no cover - invariant

    def _sync_codes(self) -> None:
        """Take in-place edits of handed-out codes into account (bumps the generation)."""
        t = self._codes
        if t is not None:
            if _version(t) != self._codes_ver:
                self._codes_ver = _version(t)
                self._gen += 1
            return
        w = self._watched()
        if w is not None and _version(w) != self._watch_ver:
            self._codes, self._codes_ver, self._watch = w, _version(w), None
            self._gen += 1

    def _params_version(self) -> tuple:
        return _version(self.scales), _version(self.zeros)

    def params_finite(self) -> bool:
        """Whether ``scales`` (and ``zeros``) hold only finite values: checked once per change of
        them (a device sync on a GPU). A weight on the meta device, or one first asked during
        CUDA-graph capture (where a sync is not allowed), counts as finite unchecked."""
        v = self._params_version()
        hit = self._finite
        if hit is not None and hit[0] == v:
            return hit[1]
        if self.scales.is_meta or (self.scales.is_cuda and torch.cuda.is_current_stream_capturing()):
            return True
        ok = bool(torch.isfinite(self.scales).all()) and (self.zeros is None or bool(torch.isfinite(self.zeros).all()))
        self._finite = (v, ok)
        return ok

    def prepared(self, backend):
        """This weight in ``backend``'s layout: built on first use, rebuilt when the codes, scales
        or zeros changed since. Thread-safe: concurrent first calls prepare once."""
        key = (backend.name, backend.layout_version)
        entry = self._layouts.get(key)
        if entry is not None and entry.gen == self._gen and self._codes is None \
                and entry.params == self._params_version():
            w = self._watch
            if w is None or (t := w()) is None or _version(t) == self._watch_ver:
                return entry.prepared  # the common case: nothing handed out or changed
        with self._lock:
            self._sync_codes()
            params = self._params_version()
            entry = self._layouts.get(key)
            self._calls = {}  # bound calls hold prepared copies: never keep a stale one alive
            if entry is not None and entry.gen == self._gen:
                if entry.params != params:
                    entry = self._layouts[key] = _Prepared(backend.prepare_params(entry.prepared, self),
                                                           self._gen, params)
            else:
                codes = self._codes if self._codes is not None else (self._watched() or self._rebuild())
                fresh = {k: e for k, e in self._layouts.items() if e.gen == self._gen}
                while len(fresh) >= MAX_LAYOUTS:
                    fresh.pop(next(iter(fresh)))
                entry = fresh[key] = _Prepared(backend.prepare(codes, self), self._gen, params)
                self._layouts = fresh
            remember(backend, entry.prepared)
            if backend.owns_codes and self._codes is not None:
                # The packed copy is the codes now; watch the plain tensor while someone holds it.
                self._watch, self._watch_ver = weakref.ref(self._codes), self._codes_ver
                self._codes = None
            return entry.prepared

    def traced_prepared(self, backend):
        """:meth:`prepared` for code that torch.compile traces: the prepared copy as it stands
        (version counters cannot be traced; a compiled graph reads the tensors it captured).
        A weight that no eager call has prepared yet is prepared here (a graph break)."""
        entry = self._layouts.get((backend.name, backend.layout_version))
        if entry is not None:
            return entry.prepared
        return self.prepared(backend)

    # ------------------------------------------------------------------ properties
    @property
    def shape(self) -> tuple:
        return self._shape

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
        return self.scales.device

    @property
    def symmetric(self) -> bool:
        return self.zeros is None

    def nbytes(self) -> int:
        """Bytes of the plain storage: codes, scales and zeros."""
        total = self._shape[0] * self._shape[1] // 2 + self.scales.numel() * self.scales.element_size()
        if self.zeros is not None:
            total += self.zeros.numel() * self.zeros.element_size()
        return total

    # ------------------------------------------------------------------ conversions
    def unpack(self) -> torch.Tensor:
        """Codes uint8 [N, K] in 0..15, in stored K order."""
        return unpack_nibbles(self.plain_codes())

    def dequantize_stored(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """W in stored K order (before undoing ``perm``), [N, K], computed in fp32 then cast."""
        return dequantize_codes(self.unpack(), self.scales, self.zeros, self.group_size_effective, dtype)

    def dequantize(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The weight W [N, K] such that ``gemm(x, w) == x @ W.T``; dtype defaults to scales'."""
        w = self.dequantize_stored(torch.float32)
        if self.perm is not None:
            w = torch.empty_like(w).index_copy_(1, self.perm, w)
        return w.to(dtype or self.dtype)

    def to(self, device) -> "QuantizedWeight":
        """A copy on ``device`` (prepared layouts are rebuilt there on first use)."""
        mv = lambda t: None if t is None else t.to(device)  # noqa: E731
        return QuantizedWeight(mv(self.plain_codes()), mv(self.scales), mv(self.zeros), self.group_size,
                               mv(self.perm))

    def __getstate__(self) -> dict:
        """Copies and pickles carry the plain form (no prepared layouts, no lock)."""
        return dict(qweight=self.plain_codes(), scales=self.scales, zeros=self.zeros, group_size=self.group_size,
                    perm=self.perm)

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state)

    def __repr__(self) -> str:
        N, K = self.shape
        kind = "symmetric" if self.zeros is None else "asymmetric"
        order = ", act-order" if self.perm is not None else ""
        return (f"QuantizedWeight(N={N}, K={K}, group_size={self.group_size}, {kind}{order}, "
                f"dtype={spec.dtype_name(self.dtype)}, device={self.device})")
