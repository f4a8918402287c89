"""Launching a Triton kernel with less host time.

``JITFunction.__getitem__(grid)(...)`` binds every argument, computes Triton's specialization key
and looks the compiled kernel up on each call. :class:`CachedLaunch` keeps the compiled kernel in
a dict keyed by what Triton specializes on (constexprs, launch options, argument dtypes, 16-byte
pointer alignment, integer divisibility by 16, integers equal to 1, 64-bit integers), and calls
its launcher directly. The first call of each key, the interpreter, other CUDA devices than the
current one and active Triton launch hooks (profilers) go through Triton's normal path.
"""
from __future__ import annotations

import threading

import torch
import triton

from ..triton_compat import COMPILE_OPTIONS, hooks_active
from .env import interpreting

INTERPRETER_LOCK = threading.Lock()   # kernels in Triton's CPU interpreter run one at a time


def arg_key(a, _tensor=torch.Tensor, _int=int):
    """The properties of one runtime argument that Triton's specialization depends on."""
    cls = a.__class__
    if cls is _tensor or isinstance(a, _tensor):
        return a.dtype, not a.data_ptr() & 15
    if cls is _int:
        return a == 1, not a & 15, -2**31 <= a < 2**31
    if a is None or cls is bool:
        return a
    return cls


class CachedLaunch:
    """``CachedLaunch(jit_fn)(grid, args, constexprs, num_warps, num_stages)`` launches ``jit_fn``
    like ``jit_fn[grid](*args, **constexprs, num_warps=..., num_stages=...)`` on torch's current
    stream; ``args`` are the runtime arguments in signature order, and the constexprs must be the
    kernel's trailing parameters, passed in signature order.

    A caller that knows which arguments stay fixed may pass ``key``: any hashable value that
    differs whenever constexprs, launch options or an argument's specialization properties
    (see :func:`arg_key`) differ, and ``cx = tuple(constexprs.values())``."""

    def __init__(self, fn: triton.JITFunction):
        self.fn = fn
        self._compiled: dict = {}
        # Triton picks the interpreter when the kernel is defined (TRITON_INTERPRET at import).
        self._interpreted = interpreting() or not isinstance(fn, triton.runtime.JITFunction)

    def _slow(self, grid, args, constexprs, num_warps, num_stages):
        return self.fn[grid](*args, **constexprs, num_warps=num_warps, num_stages=num_stages, **COMPILE_OPTIONS)

    def __call__(self, grid: tuple, args: tuple, constexprs: dict, num_warps: int, num_stages: int,
                 key=None, cx: tuple = None):
        x = args[0]
        if self._interpreted:
            # Triton's interpreter keeps global state, and every CPU launch shares one set of split-K
            # tile counters (they are per stream, and a CPU has one): one launch at a time.
            with INTERPRETER_LOCK:
                return self._slow(grid, args, constexprs, num_warps, num_stages)
        if not x.is_cuda or hooks_active():
            return self._slow(grid, args, constexprs, num_warps, num_stages)
        index = x.get_device()
        if index != torch._C._cuda_getDevice():
            return self._slow(grid, args, constexprs, num_warps, num_stages)
        if key is None:
            cx = tuple(constexprs.values())
            key = (cx, num_warps, num_stages, tuple(map(arg_key, args)))
        key = (index, key)
        kernel = self._compiled.get(key)
        if kernel is None:
            kernel = self._slow(grid, args, constexprs, num_warps, num_stages)
            if hasattr(kernel, "result"):
                kernel = kernel.result()
            self._compiled[key] = kernel
            return kernel
        stream = torch._C._cuda_getCurrentRawStream(index)
        kernel.run(grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1, stream,
                   kernel.function, kernel.packed_metadata, None, None, None, *args, *cx)
        return kernel
