"""The fixed set of kernels baked into the C library, and their ahead-of-time compilation.

Constexprs are compiled in, so the library carries one cubin per combination of

* kernel: four launch shapes taken from the H200 tuning table (``w4a16/data/tuned.json``) and
  the package's shape heuristic: "tile256" (M > 256), "tile128" (the SPEC's "128"), "splitk64"
  (the SPEC's "64", 16 < M <= 64) and "decode" (M <= 16);
* group class: 128 (any group that is a multiple of 128, or one group over all of K, with its
  scales repeated per 128 values of K), 64 (other multiples of 64), 32 (other multiples of 32);
* activation dtype (fp16, bf16) and symmetric / with zero points.

Those are the "fast" variants: they assume 16-byte aligned A, C and bias, N % 16 == 0 and
K % KC == 0 (KC = 128, or 64 for group class 32), and are compiled with those hints. Every other
problem (ragged N or K, unaligned pointers, group 64 with K % 128 != 0, one group over an odd
K) runs a "generic" variant of the same group class (tile128, splitk64 or decode): no
divisibility hints on the caller's pointers and sizes, x masked past K. Bias is always a kernel
input (a zero vector stands in for NULL), so it is a run-time flag. Split-K variants are
deterministic (no atomics on the output).

The C side computes a variant's index with the same formula as :func:`variant_index`.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass

KERNELS = ("tile256", "tile128", "splitk64", "decode")
GROUP_CLASSES = (128, 64, 32)
DTYPES = ("fp16", "bf16")
GENERIC_KERNELS = ("tile128", "splitk64", "decode")
SM90 = 90
MAX_SHARED = 232448  # bytes of shared memory a block may opt into on sm_90



@dataclass(frozen=True)
class KernelShape:
    kind: str          # "tile" (one program per output tile, epilogue in the kernel) or "splitk"
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    unroll: int
    prefetch: bool
    scale_after: bool
    wide_scales: bool  # read fp32 scales / zeros (the prepared weight holds both forms)


SHAPES = {
    "tile256": KernelShape("tile", 256, 128, 8, 3, 1, False, False, True),
    "tile128": KernelShape("tile", 128, 128, 8, 4, 1, False, False, True),
    "splitk64": KernelShape("splitk", 64, 64, 4, 1, 2, True, False, False),
    "decode": KernelShape("splitk", 16, 64, 4, 1, 1, True, True, False),
}


@dataclass(frozen=True)
class Variant:
    kernel: str
    group_class: int
    dtype: str
    zeros: bool
    generic: bool

    @property
    def name(self) -> str:
        kind = f"g{self.group_class}" + ("_generic" if self.generic else "")
        return f"{self.kernel}_{kind}_{self.dtype}_{'zeros' if self.zeros else 'sym'}"


def gemm_variants() -> list:
    """Every GEMM cubin of the library, in table order (see :func:`variant_index`)."""
    out = [Variant(k, gc, dt, z, False) for k in KERNELS for gc in GROUP_CLASSES for dt in DTYPES
           for z in (False, True)]
    out += [Variant(k, gc, dt, z, True) for k in GENERIC_KERNELS for gc in GROUP_CLASSES for dt in DTYPES
            for z in (False, True)]
    return out


def variant_index(v: Variant) -> int:
    """Index of ``v`` in :func:`gemm_variants` (the C library computes the same)."""
    dz = DTYPES.index(v.dtype) * 2 + int(v.zeros)
    gc = GROUP_CLASSES.index(v.group_class)
    if v.generic:
        fast = len(KERNELS) * len(GROUP_CLASSES) * 4
        return fast + (GENERIC_KERNELS.index(v.kernel) * len(GROUP_CLASSES) + gc) * 4 + dz
    return (KERNELS.index(v.kernel) * len(GROUP_CLASSES) + gc) * 4 + dz


@dataclass(frozen=True)
class Compiled:
    name: str
    func: str          # the cubin's entry point
    cubin: bytes
    num_warps: int
    shared: int        # dynamic shared memory bytes to launch with
    scratch: int       # global + profile scratch bytes the kernel asks for (must be 0)
    params: int        # parameters of the PTX entry (the user's, then Triton's two scratch pointers)
    gluon: object = None   # a Gluon GEMM's GluonPlanInfo (gluon_variants.py), else None


def _compile(fn, signature: dict, constexprs: dict, attrs: dict, num_warps: int, num_stages: int,
             name: str) -> Compiled:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from w4a16.backends.triton_compat import COMPILE_OPTIONS

    sig = dict(signature)
    for k in constexprs:
        sig[k] = "constexpr"
    src = ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs)
    k = triton.compile(src, target=GPUTarget("cuda", SM90, 32),
                       options={"num_warps": num_warps, "num_stages": num_stages, **COMPILE_OPTIONS})
    return compiled_of(k, name)


def compiled_of(k, name: str, gluon=None) -> Compiled:
    """The Compiled record of Triton's compiled kernel ``k``."""
    md = k.metadata
    scratch = int(getattr(md, "global_scratch_size", 0) or 0) + int(getattr(md, "profile_scratch_size", 0) or 0)
    ptx = k.asm["ptx"]
    entry = ptx[ptx.index(".entry"):]
    params = entry[:entry.index(")")].count(".param")
    return Compiled(name, md.name, bytes(k.asm["cubin"]), md.num_warps, int(md.shared), scratch, params, gluon)


def compile_gemm(v: Variant) -> Compiled:
    """The cubin of one GEMM variant (sm_90a)."""
    from w4a16.backends.triton.config import GemmConfig
    from w4a16.backends.triton.offline import ALIGNED_ARGS
    from w4a16.backends.triton.offline import compile_gemm as compile_kernel

    s = SHAPES[v.kernel]
    cfg = GemmConfig(s.kind, s.block_m, s.block_n, num_warps=s.num_warps, num_stages=s.num_stages, unroll=s.unroll,
                     prefetch=s.prefetch, scale_after=s.scale_after, wide_scales=s.wide_scales)
    # generic variants: only the library's own buffers are known to be aligned
    aligned = ("qk_ptr", "s_ptr", "z_ptr", "part_ptr", "counter_ptr") if v.generic else ALIGNED_ARGS
    k = compile_kernel(cfg, v.dtype, v.group_class, v.zeros, has_bias=True, epilogue=s.kind == "tile",
                       even_k=not v.generic, aligned=aligned)
    return compiled_of(k, v.name)


REPACK_NAMES = ("codes_h64", "codes_h32", "scales_fp16", "scales_bf16")
REPACK_BLOCK = 256


def compile_repack(name: str) -> Compiled:
    """The cubin of one repack kernel (:mod:`w4a16.capi.repack`)."""
    from .repack import repack_codes_kernel, repack_scales_kernel

    if name.startswith("codes"):
        h = int(name[len("codes_h"):])
        sig = {"b_ptr": "*u8", "qk_ptr": "*u8", "N": "i32", "K": "i32", "chunks": "i32"}
        return _compile(repack_codes_kernel, sig, {"H": h}, {}, 4, 1, name)
    dt = name[len("scales_"):]
    sig = {"src_ptr": f"*{dt}", "dst_ptr": f"*{dt}", "dst32_ptr": "*fp32", "N": "i32", "K": "i32", "G": "i32",
           "group": "i32", "gdst": "i32"}
    return _compile(repack_scales_kernel, sig, {"BLOCK": REPACK_BLOCK}, {}, 4, 1, name)


def compile_one(item: tuple) -> Compiled:
    """Worker entry point: ("gemm", Variant), ("repack", name), ("gluon", GluonVariant) or
    ("gluon_repack", name). Runs in a process started without TRITON_INTERPRET (cubins are
    compiled, never interpreted)."""
    from . import gluon_variants
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10000))
    kind, what = item
    if kind == "gluon":
        try:
            k, info = gluon_variants.compile_gluon(what)
        except Exception as e:  # e.g. a ring that does not fit shared memory: left out, the C side falls back
            print(f"build-lib: {what.name} left out: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
                  file=sys.stderr)
            params = gluon_variants.DECODE_PARAMS if what.is_decode else gluon_variants.PREFILL_PARAMS
            return Compiled(what.name, "", b"", 0, 0, -1, params, None)
        return compiled_of(k, what.name, info)
    if kind == "gluon_repack":
        return compiled_of(gluon_variants.compile_gluon_repack(what), what)
    return compile_gemm(what) if kind == "gemm" else compile_repack(what)
