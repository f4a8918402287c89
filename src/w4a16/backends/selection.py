"""Which backends exist, in which order they are preferred, and which one runs a call.

``backend="auto"`` takes, among the backends that are available on the device and support the
problem: the fastest tuned entry for this GPU and problem (``w4a16.tune``'s cache, then the
shipped table), else the first in :data:`ORDER` whose heuristic claims the problem, else the
reference. A forced ``backend=`` or a config object runs that backend or fails with the reason.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

import torch

from .. import tuning_cache
from ..errors import BackendRefused, W4A16Error, expect
from .base import Backend, Problem
from .device import card_id, index_of

# name -> (module, class): a new backend is a folder under backends/ and a line here. Earlier
# entries are preferred where their heuristic claims a problem and no measurement says otherwise.
ENTRIES = {
    "gluon": ("w4a16.backends.gluon.backend", "GluonBackend"),
    "triton": ("w4a16.backends.triton.backend", "TritonBackend"),
    "reference": ("w4a16.backends.reference", "ReferenceBackend"),
}
ORDER = tuple(ENTRIES)
_BACKENDS: Dict[str, Backend] = {}
_MISSING: Dict[str, str] = {}


def _load(name: str) -> Optional[Backend]:
    if name not in _BACKENDS and name not in _MISSING:
        module, cls = ENTRIES[name]
        try:
            _BACKENDS[name] = getattr(importlib.import_module(module), cls)()
        except ImportError as e:  # a backend whose module is not shipped in this build
            _MISSING[name] = f"not importable: {e}"
    return _BACKENDS.get(name)


def registry() -> Dict[str, Backend]:
    """Every importable backend by name, in order of preference."""
    return {n: b for n in ORDER if (b := _load(n)) is not None}


def get(name: str) -> Backend:
    """The backend called ``name`` (W4A16Error naming the known ones otherwise)."""
    expect(isinstance(name, str) and name in ENTRIES, "backend", f"'auto' or one of {ORDER}", name)
    b = _load(name)
    expect(b is not None, "backend", f"an importable backend ({name}: {_MISSING.get(name)})", name)
    return b


@dataclass(frozen=True)
class Choice:
    """The backend and config a call runs, and why (for ``describe``, ``kernel_info``, tables)."""

    backend: Backend
    config: Any
    reason: str
    config_key: str = field(init=False, compare=False)  # the config as the custom op takes it

    def __post_init__(self):
        object.__setattr__(self, "config_key", self.backend.config_key(self.config))

    @property
    def label(self) -> str:
        """'backend: config', e.g. 'triton: splitk 16x64 k8 w4 s1 sa', or just 'reference'."""
        cfg = self.backend.config_label(self.config)
        return cfg if cfg == self.backend.name else f"{self.backend.name}: {cfg}"


def why_not(b: Backend, p: Problem) -> Optional[str]:
    """None when ``b`` can run ``p`` here, else the reason."""
    if p.epilogue not in b.epilogues:
        return f"no {p.epilogue!r} epilogue"
    return b.available(p.device) or b.supports(p)


def _gpu(p: Problem) -> Optional[str]:
    return card_id(index_of(p.device)) if p.device.type == "cuda" else None


TIE_MARGIN = 0.03   # tuned times this close are a tie (timing noise between runs is about that size)


def pick_tuned(timed: list) -> tuple:
    """The entry to run from ``timed``, [(time_us, backend, config, ...)] in order of preference: the
    first within TIE_MARGIN of the fastest. A tie goes to the preferred backend, so a weight used
    at several M keeps to one backend, and one prepared layout, where the times do not tell them
    apart."""
    best = min(e[0] for e in timed)
    return next(e for e in timed if e[0] <= best * (1 + TIE_MARGIN))


def _auto(p: Problem) -> Choice:
    usable, skipped = [], []
    for b in registry().values():
        reason = why_not(b, p)
        if reason is None:
            usable.append(b)
        else:
            skipped.append(f"{b.name}: {reason}")
    gpu = _gpu(p)
    if gpu is not None:
        timed = []
        for b in usable:
            if b.config_type is None:
                continue
            hit = tuning_cache.lookup(b, b.layout_version, gpu, p, accept=lambda c, b=b: b.config_supports(c, p) is None)
            if hit is not None:
                timed.append((hit.time_us, b, hit.config, hit.shape))
        if timed:
            t, b, cfg, shape = pick_tuned(timed)
            best = min(e[0] for e in timed)
            note = "" if t == best else f" (within {TIE_MARGIN:.0%} of the fastest backend's {best:.1f} us)"
            lent = "" if shape == (p.N, p.K) else f" for the nearest tuned shape N={shape[0]}, K={shape[1]}"
            return Choice(b, cfg, f"tuned on {gpu}{lent}: {t:.1f} us{note}")
    for b in usable:
        cfg = b.default_config(p)
        if cfg is not None:
            note = f" (not usable: {'; '.join(skipped)})" if skipped else ""
            return Choice(b, cfg, f"{b.name} heuristic for M={p.M}, N={p.N}, K={p.K}{note}")
    raise W4A16Error(f"backend: no backend runs this problem ({'; '.join(skipped)})")  # pragma: no cover


def _named(name: str, backend: str) -> tuple:
    names = [backend] if backend != "auto" else list(ORDER)
    for n in names:
        b = _load(n)
        if b is not None and name in b.named_configs():
            return b, b.named_configs()[name]
    known = sorted({k for n in names if (b := _load(n)) is not None for k in b.named_configs()})
    raise W4A16Error(f"config: expected a config object, 'auto' or one of {tuple(known)}"
                     f"{'' if backend == 'auto' else f' (backend {backend!r})'}, got {name!r}")


def _force(b: Backend, cfg: Any, p: Problem, what: str, fallback: bool) -> Choice:
    reason = why_not(b, p)
    if reason is None and cfg is not None:
        reason = b.config_supports(cfg, p)
    if reason is None:
        return Choice(b, cfg if cfg is not None else b.default_config(p) or _first_config(b, p), what)
    if fallback:
        ref = get("reference")
        return Choice(ref, "reference", f"{what}, but {b.name} cannot run here ({reason}): reference")
    raise BackendRefused(f"backend: expected a backend that runs this call, got {b.name!r} ({reason})")


def _first_config(b: Backend, p: Problem) -> Any:
    cands = b.candidates(p)
    expect(bool(cands), "config", f"a config object or name for backend {b.name!r} at M = {p.M} "
           f"(it chooses none by itself there)", "'auto'")
    return cands[0]


def choose(p: Problem, backend: str = "auto", config: Any = "auto") -> Choice:
    """The backend and config for problem ``p`` under the user's ``backend=`` and ``config=``.

    config: "auto", a named config ("128", "64", "decode", "reference", ...) or a config object
    of some backend (which then must match ``backend`` unless that is "auto"). A named config on
    a device where its backend cannot run falls back to the reference (the reason says so); a
    forced ``backend=`` fails with the reason instead.
    """
    if isinstance(config, str):
        if config == "auto":
            choice = _auto(p) if backend == "auto" else _force(get(backend), None, p, f"backend={backend!r}", False)
        else:
            b, cfg = _named(config, backend)
            choice = _force(b, cfg, p, f"config={config!r}", backend == "auto")
    else:
        owners = [b for b in registry().values() if b.config_type is not None and isinstance(config, b.config_type)]
        expect(bool(owners), "config", "'auto', a config name or a backend's config object",
               type(config).__name__)
        b = owners[0]
        expect(backend in ("auto", b.name), "backend", f"{b.name!r} or 'auto' for a {type(config).__name__}",
               backend)
        choice = _force(b, config, p, f"config {b.config_label(config)}", False)
    return choice


def choose_nonfinite(p: Problem) -> Choice:
    """For a weight whose scales or zeros hold NaN or an infinity: the first backend, in order of
    preference, that runs ``p`` with a config following the contract's non-finite rule."""
    for b in registry().values():
        if why_not(b, p) is None:
            cfg = b.nonfinite_config(p)
            if cfg is not None and b.config_supports(cfg, p) is None:
                return Choice(b, cfg, f"non-finite scales or zeros: {b.name} {b.config_label(cfg)} follows the "
                                      f"IEEE rule term by term")
    raise W4A16Error("backend: no backend computes a weight with non-finite scales here")  # pragma: no cover


def availability_key(device: torch.device) -> tuple:
    """What the backends' availability on ``device`` depends on within this process (cache key)."""
    return tuple(b.availability_key(device) for b in registry().values())


def config_names() -> tuple:
    """Every name ``gemm(config=...)`` accepts: "auto" and each backend's named configs."""
    names = ["auto"]
    for b in registry().values():
        names += [n for n in b.named_configs() if n not in names]
    return tuple(names)


def problem_of(x: torch.Tensor, w, epilogue: Optional[str] = None) -> Problem:
    """The Problem of ``gemm(x, w, epilogue=epilogue)``."""
    K = x.shape[-1]
    M = x.numel() // K if K else 0
    return Problem(M, w.shape[0], w.shape[1], w.group_size_effective, x.dtype, w.params.zeros is not None, x.device,
                   epilogue)
