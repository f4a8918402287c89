"""QuantizedWeight: an int4 weight with group-wise scales and optional zero points."""
from __future__ import annotations

import copy
import threading
import weakref
from typing import Any, NamedTuple, Optional

import torch

from . import spec
from .errors import expect, fail
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


def join_parts(ws, combine) -> tuple:
    """(codes, scales, zeros) of the QuantizedWeights ``ws`` put together by ``combine``
    (``torch.cat``: their rows one after another; ``torch.stack``: a new leading dimension), in the
    plain layout. Zeros are None when no weight has zero points; otherwise a weight without them
    gets z = 8 (what symmetric means)."""
    params = [w.params for w in ws]
    zeros = None
    if any(p.zeros is not None for p in params):
        zeros = combine([p.zeros if p.zeros is not None else torch.full_like(p.scales, 8.0) for p in params])
    return combine([w.plain_codes() for w in ws]), combine([p.scales for p in params]), zeros


class Watched(torch.Tensor):
    """A tensor of a :class:`QuantizedWeight` as the weight hands it out (codes, scales, zeros,
    perm): an alias of the tensor it was given, the same storage and version counter, with two
    escape hatches closed so that no in-place edit goes unseen:

    * ``.data`` returns ``detach()`` (an alias that shares the version counter; torch's own
      ``.data`` starts a counter of its own, so edits through it would not reach the weight);
      assigning ``.data`` is refused (assign the attribute of the weight or module instead);
    * ``.numpy()`` (and ``numpy.asarray``) give a read-only array (numpy writes bump no counter).

    Every other operation returns a plain tensor (``__torch_function__`` disabled, as for
    ``nn.Parameter``)."""

    __torch_function__ = torch._C._disabled_torch_function_impl

    @staticmethod
    def wrap(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """``t`` as a Watched alias (itself when it already is one; None stays None)."""
        return t if t is None or type(t) is Watched else t.as_subclass(Watched)

    @property
    def data(self) -> torch.Tensor:
        return self.detach()

    @data.setter
    def data(self, value) -> None:
        fail("data", "no assignment: set the weight's (or module's) attribute instead, e.g. w.scales = t",
             "an assignment to .data of a QuantizedWeight tensor")

    def numpy(self, *, force: bool = False):
        a = torch.Tensor.numpy(self.as_subclass(torch.Tensor), force=force)
        a.flags.writeable = False
        return a

    def __deepcopy__(self, memo):
        return Watched.wrap(copy.deepcopy(self.as_subclass(torch.Tensor), memo))

    def __reduce_ex__(self, proto):
        # pickles and state dicts hold plain tensors; a weight wraps them again when it takes them
        return self.as_subclass(torch.Tensor).__reduce_ex__(proto)


def _check_parts(qweight, scales, zeros, group_size, perm) -> None:
    """The constructor's checks (no device sync): types, dtypes, shapes and devices."""
    expect(isinstance(qweight, torch.Tensor), "qweight", "a torch.Tensor", type(qweight).__name__)
    expect(qweight.dtype == torch.uint8, "qweight.dtype", torch.uint8, qweight.dtype)
    expect(qweight.dim() == 2, "qweight", "a 2-D tensor [N, K // 2]", f"{qweight.dim()}-D")
    N, K = qweight.shape[0], qweight.shape[1] * 2
    expect(N >= 1 and K >= 2, "qweight.shape", "[N >= 1, K // 2 >= 1]", tuple(qweight.shape))
    g = spec.check_group_size(group_size, K)
    expect(isinstance(scales, torch.Tensor), "scales", "a torch.Tensor", type(scales).__name__)
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
        expect(zeros.dtype == scales.dtype, "zeros.dtype", f"{scales.dtype} (scales' dtype)", zeros.dtype)
    if perm is not None:
        expect(isinstance(perm, torch.Tensor), "perm", "a torch.Tensor or None", type(perm).__name__)
        expect(tuple(perm.shape) == (K,), "perm.shape", (K,), tuple(perm.shape))
        expect(perm.dtype == torch.int64, "perm.dtype", torch.int64, perm.dtype)
        expect(perm.device == qweight.device, "perm.device", qweight.device, perm.device)


def _check_permutation(perm: torch.Tensor, K: int) -> None:
    """``perm`` holds each of 0..K-1 once (a device sync)."""
    expect(not perm.is_meta, "perm.device", "a device holding data (not meta): perm's values are checked", "meta")
    expect(bool(torch.equal(torch.sort(perm).values.cpu(), torch.arange(K))), "perm",
           f"a permutation of 0..{K - 1}", "repeated or out-of-range indices")


def _aliases(a: torch.Tensor, b: Optional[torch.Tensor]) -> bool:
    """Whether ``a`` and ``b`` view the same elements (e.g. a tensor and its Watched alias)."""
    return (b is not None and a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()
            and a.dtype == b.dtype and a.device == b.device)


def _integer_zeros_as(zeros: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Integer zero points converted to ``dtype``, refused where a value would not be exact there
    (fp16 holds every integer up to 2048 exactly and none above 65504; a device sync)."""
    if zeros.numel() and not zeros.is_meta:
        exact = 2 ** (11 if dtype == torch.float16 else 8)   # 2^(mantissa bits + 1)
        worst = int(zeros.abs().max())
        expect(worst <= exact, "zeros", f"integers of magnitude <= {exact} (exact in {dtype})", f"max |z| = {worst}")
    return zeros.to(dtype)


class _Prepared(NamedTuple):
    prepared: Any  # the backend's object
    gen: int       # the codes generation it was built from
    params: tuple  # the scales' and zeros' identity and version it was built from


def _version(t: Optional[torch.Tensor]):
    """What changes when ``t`` is edited in place, the same for every alias of it (a Watched
    alias and the tensor it aliases share storage and version counter); inference tensors have
    no counter (their edits cannot be seen). Replacements go through setters, which count them."""
    if t is None:
        return None
    return t.data_ptr(), t.dtype, tuple(t.shape), (-1 if t.is_inference() else t._version)


def _plain(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """``t`` as a plain tensor: a Watched alias becomes a plain alias (same storage and counter)."""
    return t.as_subclass(torch.Tensor) if isinstance(t, Watched) else t


class Params(NamedTuple):
    """A weight's scales, zeros and perm as plain tensors (what kernels and traced code read)."""
    scales: torch.Tensor
    zeros: Optional[torch.Tensor]
    perm: Optional[torch.Tensor]


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
    it), and re-prepares what changed: in-place edits, reassignment, ``load_state_dict``. The
    weight hands its tensors out as :class:`Watched` aliases, whose ``.data`` shares the version
    counter and whose numpy views are read-only, so no in-place edit slips past; assignments are
    validated like the constructor's arguments (``set_params`` replaces several at once). Edits
    of an inference tensor (``torch.inference_mode``) cannot be seen: replace it instead.

    The constructor checks types, dtypes, shapes and devices (no device sync);
    :meth:`from_plain` also converts and checks values.
    """

    def __init__(self, qweight, scales, zeros=None, group_size=128, perm=None):
        _check_parts(qweight, scales, zeros, group_size, perm)
        qweight = _plain(qweight)
        self._shape = (qweight.shape[0], qweight.shape[1] * 2)
        self._codes: Optional[torch.Tensor] = qweight     # plain codes held strongly, or None
        self._codes_ver = _version(qweight)
        self._codes_out: Optional[Watched] = None         # the alias of _codes that qweight hands out
        self._watch: tuple = ()                          # weakrefs to codes handed out, once dropped
        self._watch_ver = None
        self._gen = 0                                    # bumped whenever the codes change
        self._layouts: dict = {}                         # (backend, layout) -> _Prepared
        self._epoch = 0                                  # bumped whenever a prepared copy changes
        self._finite: Optional[tuple] = None             # (params version, scales/zeros finite)
        self._lock = threading.Lock()
        self._group_size = int(group_size)
        self._params_gen = 0                             # bumped by every assignment of them
        self._params = Params(_plain(scales), _plain(zeros), _plain(perm))
        self._out = Params(*(Watched.wrap(t) for t in self._params))

    @classmethod
    def from_plain(cls, qweight: torch.Tensor, scales: torch.Tensor, zeros: Optional[torch.Tensor] = None,
                   group_size: int = 128, perm: Optional[torch.Tensor] = None) -> "QuantizedWeight":
        """Wrap raw tensors after validating them (the B / scales / zero points of the C API):
        what the constructor checks, and the values: integer ``zeros`` must fit scales' dtype
        (they are converted to it), ``perm`` must be a permutation. Makes the tensors contiguous."""
        expect(isinstance(qweight, torch.Tensor), "qweight", "a torch.Tensor", type(qweight).__name__)
        expect(isinstance(scales, torch.Tensor), "scales", "a torch.Tensor", type(scales).__name__)
        if zeros is not None:
            expect(isinstance(zeros, torch.Tensor), "zeros", "a torch.Tensor or None", type(zeros).__name__)
            if not zeros.dtype.is_floating_point:
                zeros = _integer_zeros_as(zeros, scales.dtype)
            zeros = zeros.contiguous()
        if perm is not None:
            expect(isinstance(perm, torch.Tensor), "perm", "a torch.Tensor or None", type(perm).__name__)
            expect(not perm.dtype.is_floating_point, "perm.dtype", "an integer dtype", perm.dtype)
            perm = perm.to(device=qweight.device, dtype=torch.int64).contiguous()
        w = cls(qweight.contiguous(), scales.contiguous(), zeros, group_size, perm)
        if perm is not None:
            _check_permutation(perm, w.shape[1])
        return w

    # ------------------------------------------------------------------ the parameters
    @property
    def scales(self) -> torch.Tensor:
        """[N, K // g] fp16/bf16 (a :class:`Watched` alias of the tensor given)."""
        return self._out.scales

    @scales.setter
    def scales(self, value: torch.Tensor) -> None:
        self.set_params(value, self._params.zeros, self._params.perm)

    @property
    def zeros(self) -> Optional[torch.Tensor]:
        """None (z = 8) or [N, K // g] in scales' dtype (a :class:`Watched` alias)."""
        return self._out.zeros

    @zeros.setter
    def zeros(self, value: Optional[torch.Tensor]) -> None:
        self.set_params(self._params.scales, value, self._params.perm)

    @property
    def perm(self) -> Optional[torch.Tensor]:
        """None or int64 [K] (act-order; a :class:`Watched` alias)."""
        return self._out.perm

    @perm.setter
    def perm(self, value: Optional[torch.Tensor]) -> None:
        self.set_params(self._params.scales, self._params.zeros, value)

    @property
    def params(self) -> Params:
        """Scales, zeros and perm as plain tensors (for kernels, the reference and traced code;
        users read and edit ``scales``, ``zeros`` and ``perm``)."""
        return self._params

    @property
    def epoch(self) -> int:
        """A counter that moves whenever a prepared copy of this weight is built or replaced (or
        its parameters are): what callers caching launches bound to a prepared copy compare."""
        return self._epoch

    @property
    def group_size(self) -> int:
        """32, 64, 128, 256 or -1 (one group over all of K), as given."""
        return self._group_size

    @group_size.setter
    def group_size(self, value: int) -> None:
        _check_parts(self._codes_shape(), *self._params[:2], value, self._params.perm)
        with self._lock:
            if int(value) != self._group_size:
                self._group_size = int(value)
                self._gen += 1          # the layouts depend on the group size
                self._layouts = {}
                self._epoch += 1

    def set_params(self, scales: torch.Tensor, zeros: Optional[torch.Tensor] = None,
                   perm: Optional[torch.Tensor] = None) -> None:
        """Replace scales, zeros and perm together (one of them alone: assign the attribute), after
        the constructor's checks and, for a new ``perm``, that it is a permutation."""
        _check_parts(self._codes_shape(), scales, zeros, self._group_size, perm)
        if perm is not None and not perm.is_meta and not _aliases(perm, self._params.perm):
            _check_permutation(perm, self._shape[1])
        with self._lock:
            self._params = Params(_plain(scales), _plain(zeros), _plain(perm))
            self._out = Params(*(Watched.wrap(t) for t in self._params))
            self._params_gen += 1
            self._epoch += 1

    def _codes_shape(self) -> torch.Tensor:
        """A stand-in of the plain codes for the constructor's checks: uint8 [N, K // 2] on the
        weight's device, one byte expanded (the real codes may live only in a packed layout, and
        rebuilding them to check shapes would unpack the whole weight)."""
        N, K = self._shape
        return torch.empty(1, dtype=torch.uint8, device=self._params.scales.device).expand(N, K // 2)

    # ------------------------------------------------------------------ the codes
    @property
    def qweight(self) -> torch.Tensor:
        """uint8 [N, K // 2] plain codes (a :class:`Watched` alias). After a kernel repacked them
        this is rebuilt from the packed copy and held until the next kernel call (which applies
        in-place edits made to it)."""
        if self._codes is None:
            t = self._watched()
            if t is not None:
                return Watched.wrap(t)
            t = self._rebuild()
            self._codes, self._codes_ver = t, _version(t)
        out = self._codes_out
        if out is None or not _aliases(out, self._codes):
            out = self._codes_out = Watched.wrap(self._codes)
        return out

    @qweight.setter
    def qweight(self, value: torch.Tensor) -> None:
        expect(isinstance(value, torch.Tensor) and value.dtype == torch.uint8, "qweight",
               "a uint8 tensor", getattr(value, "dtype", type(value).__name__))
        expect(tuple(value.shape) == (self._shape[0], self._shape[1] // 2), "qweight.shape",
               (self._shape[0], self._shape[1] // 2), tuple(value.shape))
        expect(value.device == self._params.scales.device, "qweight.device", self._params.scales.device, value.device)
        value = _plain(value)
        with self._lock:
            self._codes, self._codes_ver, self._codes_out = value, _version(value), None
            self._watch = ()
            self._gen += 1
            self._layouts = {}
            self._epoch += 1

    def plain_codes(self) -> torch.Tensor:
        """The plain codes (a plain tensor) without holding a rebuilt copy (for ``save`` and
        exporters)."""
        t = self._codes if self._codes is not None else _plain(self._watched())
        if t is None:
            t = self._rebuild()
            self._watch, self._watch_ver = (weakref.ref(t),), _version(t)
        return t

    def _watched(self) -> Optional[torch.Tensor]:
        """A codes tensor handed out before the codes were dropped, if someone still holds one."""
        for ref in self._watch:
            t = ref()
            if t is not None:
                return t
        return None

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
            self._codes, self._codes_ver, self._watch = _plain(w), _version(w), ()
            self._gen += 1

    def _params_version(self) -> tuple:
        return self._params_gen, _version(self._params.scales), _version(self._params.zeros)

    def params_finite(self) -> bool:
        """Whether ``scales`` (and ``zeros``) hold only finite values: checked once per change of
        them (a device sync on a GPU). A weight on the meta device, or one first asked during
        CUDA-graph capture (where a sync is not allowed), counts as finite unchecked."""
        v = self._params_version()
        hit = self._finite
        if hit is not None and hit[0] == v:
            return hit[1]
        scales, zeros, _ = self._params
        if scales.is_meta or (scales.is_cuda and torch.cuda.is_current_stream_capturing()):
            return True
        ok = bool(torch.isfinite(scales).all()) and (zeros is None or bool(torch.isfinite(zeros).all()))
        self._finite = (v, ok)
        return ok

    def prepared(self, backend):
        """This weight in ``backend``'s layout: built on first use, rebuilt when the codes, scales
        or zeros changed since. Thread-safe: concurrent first calls prepare once."""
        key = (backend.name, backend.layout_version)
        entry = self._layouts.get(key)
        if entry is not None and entry.gen == self._gen and self._codes is None \
                and entry.params == self._params_version():
            t = self._watched() if self._watch else None
            if t is None or _version(t) == self._watch_ver:
                return entry.prepared  # the common case: nothing handed out or changed
        with self._lock:
            self._sync_codes()
            params = self._params_version()
            entry = self._layouts.get(key)
            if entry is not None and entry.gen == self._gen:
                if entry.params != params:
                    entry = self._layouts[key] = _Prepared(backend.prepare_params(entry.prepared, self),
                                                           self._gen, params)
                    self._epoch += 1
            else:
                codes = self._codes if self._codes is not None else (self._watched() or self._rebuild())
                fresh = {k: e for k, e in self._layouts.items() if e.gen == self._gen}
                while len(fresh) >= MAX_LAYOUTS:
                    fresh.pop(next(iter(fresh)))
                entry = fresh[key] = _Prepared(backend.prepare(codes, self), self._gen, params)
                self._layouts = fresh
                self._epoch += 1
            remember(backend, entry.prepared)
            if backend.owns_codes and self._codes is not None:
                # The packed copy is the codes now; watch the codes handed out (the tensor given
                # and the alias qweight returned) while someone holds them.
                held = (self._codes,) + ((self._codes_out,) if self._codes_out is not None else ())
                self._watch, self._watch_ver = tuple(weakref.ref(t) for t in held), self._codes_ver
                self._codes = self._codes_out = None
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
        return self._params.scales.dtype

    @property
    def device(self) -> torch.device:
        return self._params.scales.device

    @property
    def symmetric(self) -> bool:
        return self._params.zeros is None

    def nbytes(self) -> int:
        """Bytes of the plain storage: codes, scales and zeros."""
        scales, zeros, _ = self._params
        total = self._shape[0] * self._shape[1] // 2 + scales.numel() * scales.element_size()
        if zeros is not None:
            total += zeros.numel() * zeros.element_size()
        return total

    # ------------------------------------------------------------------ conversions
    def unpack(self) -> torch.Tensor:
        """Codes uint8 [N, K] in 0..15, in stored K order."""
        return unpack_nibbles(self.plain_codes())

    def dequantize_stored(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """W in stored K order (before undoing ``perm``), [N, K], computed in fp32 then cast."""
        return dequantize_codes(self.unpack(), self._params.scales, self._params.zeros, self.group_size_effective, dtype)

    def dequantize(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The weight W [N, K] such that ``gemm(x, w) == x @ W.T``; dtype defaults to scales'."""
        w = self.dequantize_stored(torch.float32)
        if self._params.perm is not None:
            w = torch.empty_like(w).index_copy_(1, self._params.perm, w)
        return w.to(dtype or self.dtype)

    def to(self, device) -> "QuantizedWeight":
        """A copy on ``device`` (prepared layouts are rebuilt there on first use)."""
        mv = lambda t: None if t is None else t.to(device)  # noqa: E731
        return QuantizedWeight(mv(self.plain_codes()), *(mv(t) for t in self._params[:2]), self.group_size,
                               mv(self._params.perm))

    def __getstate__(self) -> dict:
        """Copies and pickles carry the plain form (no prepared layouts, no lock)."""
        return dict(qweight=self.plain_codes(), scales=self._params.scales, zeros=self._params.zeros,
                    group_size=self.group_size, perm=self._params.perm)

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state)

    def __repr__(self) -> str:
        N, K = self.shape
        kind = "symmetric" if self._params.zeros is None else "asymmetric"
        order = ", act-order" if self._params.perm is not None else ""
        return (f"QuantizedWeight(N={N}, K={K}, group_size={self.group_size}, {kind}{order}, "
                f"dtype={spec.dtype_name(self.dtype)}, device={self.device})")
