"""The one place that knows how the Triton releases the package supports differ (3.6 to 3.9).

Kernels and launchers import their version-dependent spellings from here; nothing else in the
package compares a Triton version or probes for a Triton name. Each API difference is detected by
the feature itself (the name exists or not), never by a version string, so a release that keeps an
API keeps working (the one code-generation difference, ``NARROW_TILES_COSTLY``, has no name to
probe); ``SUPPORTED`` only bounds what the Gluon backend promises (every release in it is compiled
in CI, ``w4a16 sass``).

| what                          | 3.6                              | 3.7            | 3.8                | 3.9              |
| ----------------------------- | -------------------------------- | -------------- | ------------------ | ---------------- |
| CTA-wide barrier (Gluon)      | ``gl.thread_barrier``            | ``gl.barrier`` | ``gl.barrier``     | ``gl.barrier``   |
| TMA global -> shared (Gluon)  | ``tma.async_copy_global_to_shared`` | same        | ``tma.async_load`` | same (old name deprecated) |
| view smem under a new layout  | ``._reinterpret`` (private)      | same           | same               | ``.reinterpret`` |
| FP fusion default             | on                               | on             | on                 | on, with a warning (off from 3.10) |
| C launcher of a compiled kernel | one module per kernel, args spread | ``utils.launch``, args in a list with their annotations | same | same |
| ``make_tensordesc_arg``       | ``(desc, meta)``                 | same           | ``(desc, meta, base_args)`` | same |
| ptxas for sm_90               | 12.8                             | 12.8           | 12.9               | 13.4 (``ptxas-blackwell``; the wheel's 12.9 ``ptxas`` serves older GPUs) |
| narrow pipelined MMA tiles (code generation, ``NARROW_TILES_COSTLY``) | as wide ones | same | +27-35% instructions per weight (shuffles) | as 3.6 |

With ``W4A16_SM90_PTXAS=legacy`` in the environment, a Triton that compiles sm_90 with a newer
ptxas than the one it ships for older GPUs (3.9) compiles it with the older one instead (its
``TRITON_PTXAS_BLACKWELL_PATH``, unless already set, for the whole process): 3.9's prefill loop
then builds within 3% of 3.6's SASS instead of up to 20% over it, and no config spills
(docs/triton_versions.md). The package's kernels are then compiled with ``ptx_options="-O3"``
(ptxas' default) so that their cache entries stay apart from the default toolchain's.

Importing this module imports Triton (and Gluon): the backends import it when they launch or
compile, not when the package loads.
"""
from __future__ import annotations

import inspect
import os
from typing import Callable, List, Optional, Tuple

import triton

SUPPORTED = ((3, 6), (3, 9))   # oldest and newest (major, minor) the Gluon kernels are built and tested on

# Options every kernel is compiled with. FP fusion (a * b + c as one FMA) is on by default up to
# 3.9 and off from 3.10 (``TRITON_DEFAULT_FP_FUSION``); naming it keeps results the same on every
# release and whatever that variable says.
COMPILE_OPTIONS = {"enable_fp_fusion": True}
SM90_PTXAS_ENV = "W4A16_SM90_PTXAS"


def _ptxas_tools():
    """(the ptxas Triton runs for sm_90, the one it ships for older GPUs), each a knobs.NvidiaTool
    (``.path``, ``.version``) or None where this Triton does not say."""
    nv = getattr(getattr(triton, "knobs", None), "nvidia", None)
    older = getattr(nv, "ptxas", None) if nv is not None else None
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        sm90 = get_ptxas(90)
    except (ImportError, AttributeError, TypeError):
        sm90 = older
    return sm90, older


def legacy_sm90_ptxas() -> Optional[str]:
    """The path of the ptxas this Triton ships for older GPUs when it is a 12.x release and Triton
    compiles sm_90 with another (3.9: 12.9 beside ptxas-blackwell 13.4); else None."""
    try:
        sm90, older = _ptxas_tools()
    except Exception:   # a Triton without a usable ptxas here: nothing to choose
        return None
    if sm90 is None or older is None or sm90.path == older.path or not str(older.version).startswith("12."):
        return None
    return older.path


def sm90_ptxas() -> str:
    """Which ptxas compiles the kernels for sm_90 in this process, e.g. "13.4 (Triton's default)"."""
    try:
        sm90, _ = _ptxas_tools()
    except Exception as e:
        return f"unknown ({type(e).__name__})"
    if sm90 is None:
        return "unknown"
    return f"{sm90.version} ({SM90_PTXAS_ENV}=legacy)" if LEGACY_PTXAS_APPLIED[0] else f"{sm90.version} (Triton's default)"


LEGACY_PTXAS_APPLIED = [False]   # whether this import pointed sm_90 compiles at the older ptxas
if os.environ.get(SM90_PTXAS_ENV) == "legacy":
    _legacy = legacy_sm90_ptxas()
    if _legacy is not None and "TRITON_PTXAS_BLACKWELL_PATH" not in os.environ:
        os.environ["TRITON_PTXAS_BLACKWELL_PATH"] = _legacy
        COMPILE_OPTIONS["ptx_options"] = "-O3"
        LEGACY_PTXAS_APPLIED[0] = True

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import tma
except (ImportError, AssertionError) as e:
    # A Triton without Gluon, or Gluon imported after Triton's interpreter was switched off in a
    # process that imported Triton under it (Gluon asserts then): the Triton backend still works.
    GLUON_IMPORT_ERROR: Optional[str] = f"triton {triton.__version__}: Gluon is not usable here ({type(e).__name__} {e})"
else:
    GLUON_IMPORT_ERROR = None

    # A CTA-wide barrier (bar.sync 0): ``gl.barrier`` from 3.7, ``gl.thread_barrier`` before.
    barrier = gl.barrier if hasattr(gl, "barrier") else gl.thread_barrier

    # A TMA tile load completing on an mbarrier: ``tma.async_load`` from 3.8 (3.9 keeps the old
    # name as a deprecated alias), ``tma.async_copy_global_to_shared`` before.
    tma_load = tma.async_load if hasattr(tma, "async_load") else tma.async_copy_global_to_shared

    _PUBLIC_REINTERPRET = gl.constexpr(hasattr(gl.shared_memory_descriptor, "reinterpret"))

    @gluon.jit
    def reinterpret(smem, dtype: gl.constexpr, shape: gl.constexpr, layout: gl.constexpr):
        """``smem`` (a shared_memory_descriptor) viewed as ``shape`` of ``dtype`` under ``layout``:
        the same bytes, no copy."""
        if _PUBLIC_REINTERPRET:
            return smem.reinterpret(dtype, shape, layout)
        else:
            # private before 3.9, and there the only way to view a buffer under another layout
            return smem._reinterpret(dtype, shape, layout)


def release(version: str) -> Tuple[int, int]:
    """(major, minor) of a Triton version string such as "3.9.0" or "3.7.0+git1234"."""
    major, minor = version.split("+")[0].split(".")[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


# Code generation rather than an API, so the one version test outside ``SUPPORTED``: Triton 3.8
# builds the MMA operand fragments of the grouped MoE kernel's narrow pipelined tiles (16 and 32
# columns, one and two warps) with shuffles, +27-35% SASS instructions per weight, where 3.6, 3.7
# and 3.9 build them within 1.2% of each other (``w4a16 sass``, bf16, sm_90a). The tile rule
# (``moe_packed.packed_tile_for``) keeps 64-column tiles there.
NARROW_TILES_COSTLY = release(triton.__version__) == (3, 8)


def gluon_unsupported(version: Optional[str] = None) -> Optional[str]:
    """None when the Gluon kernels support this Triton (default: the one imported), else why not."""
    version = version or triton.__version__
    lo, hi = SUPPORTED
    if not lo <= release(version) <= hi:
        return (f"triton {version}: the Gluon kernels support triton {lo[0]}.{lo[1]} to {hi[0]}.{hi[1]} "
                f"(install a torch whose triton is in that range)")
    if version == triton.__version__:
        return GLUON_IMPORT_ERROR
    return None


def hooks_active() -> bool:
    """Whether Triton launch hooks (profilers) are set: launches must then go through Triton's own
    launcher, which calls them."""
    rt = triton.knobs.runtime
    return bool(getattr(rt.launch_enter_hook, "calls", rt.launch_enter_hook)) or bool(
        getattr(rt.launch_exit_hook, "calls", rt.launch_exit_hook))


class DirectLauncher:
    """Triton's C launcher behind a compiled kernel whose leading arguments are TMA descriptors,
    called with those descriptors already encoded (``gluon/bound.py`` keeps a weight's encoded
    descriptors instead of re-encoding them every call, as Triton's Python wrapper does).

    ``encode(desc, i)``: the launcher arguments of descriptor argument ``i``; ``launch(gx, gy,
    stream, function, packed_metadata, args)``: one launch with ``args`` the kernel's arguments in
    signature order, descriptors expanded, constexprs last. Built by :func:`direct_launcher`."""

    def __init__(self, launcher: Callable, meta: list, run, encode: Callable, listed: bool):
        self.meta = meta
        self._launcher, self._run, self._encode, self._listed = launcher, run, encode, listed
        self._two = len(inspect.signature(encode).parameters) == 2

    def encode(self, desc, i: int) -> list:
        return self._encode(desc, self.meta[i]) if self._two else self._encode(desc, self.meta[i], None)

    def launch(self, gx: int, gy: int, stream: int, function, packed_metadata, args: List) -> None:
        run = self._run
        if self._listed:   # 3.7 on: the generic utils.launch, kernel arguments as one list
            self._launcher(gx, gy, 1, stream, function, run.launch_cooperative_grid, run.launch_pdl, packed_metadata,
                           None, None, None, None, None, run.arg_annotations, run.kernel_signature, args)
        else:              # 3.6: the kernel's own launcher module, arguments spread
            self._launcher(gx, gy, 1, stream, function, run.launch_cooperative_grid, run.launch_pdl, None, None,
                           packed_metadata, None, None, None, *args)


def direct_launcher(compiled, n_descriptors: int) -> Optional[DirectLauncher]:
    """The :class:`DirectLauncher` of ``compiled`` (its first ``n_descriptors`` arguments TMA
    descriptors), or None where Triton's launcher is not one of the shapes this knows (scratch
    memory, instrumentation, another release's wrapper): the caller then launches generically."""
    from triton.backends.nvidia import driver
    run = compiled.run
    if (getattr(run, "global_scratch_size", 1) or getattr(run, "profile_scratch_size", 1)
            or getattr(run, "gsan_enabled", False)):
        return None
    inner = getattr(run, "launch", None)
    code = getattr(inner, "__code__", None)
    if code is None or inner.__closure__ is None:
        return None
    cells = dict(zip(code.co_freevars, (c.cell_contents for c in inner.__closure__)))
    launcher, meta = cells.get("launcher"), cells.get("tensordesc_meta")
    if launcher is None or not meta or len(meta) != n_descriptors or any(m is None for m in meta):
        return None
    listed = hasattr(run, "arg_annotations") and hasattr(run, "kernel_signature")
    return DirectLauncher(launcher, list(meta), run, driver.make_tensordesc_arg, listed)
