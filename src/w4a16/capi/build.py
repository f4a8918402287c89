"""Build the C library: ``libw4a16_sm90_kernel.so``, its header and the ``test_w4a16_sm90`` program.

    from w4a16.capi import build_lib
    result = build_lib("out/capi")          # or: w4a16 build-lib --out out/capi

No GPU is needed: the kernels are compiled ahead of time for sm_90a by Triton (which ships
ptxas), written as cubins, embedded into the library with the assembler's ``.incbin``, and
launched through the CUDA driver API that the library loads at run time. The build needs gcc and
``cuda.h`` (looked up in: the ``cuda_include`` argument, ``$CUDA_HOME/include``,
``/usr/local/cuda/include``, the Triton wheel's ``backends/nvidia/include``).

What lands in ``out``: the library, the header, the test program, a Makefile that rebuilds the
last two from ``src/`` without Python, and ``src/`` itself (the C sources, the generated kernel
table and the cubins).
"""
from __future__ import annotations

import concurrent.futures as cf
import multiprocessing
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..errors import W4A16Error
from ..backends.triton.env import interpreter_unset
from ..backends.triton.offline import GEMM_ARGS
from . import gluon_variants, variants

LIB_NAME = "libw4a16_sm90_kernel.so"
HEADER = "w4a16_sm90_kernel.h"
TEST_PROGRAM = "test_w4a16_sm90"
CSRC = Path(__file__).resolve().parent / "csrc"
C_SOURCES = ("w4a16_sm90_kernel.c", "w4a16_gluon.c", "w4a16_sm90_kernel.h", "test_w4a16_sm90.c")
ENTRY_POINTS = (
    "w4a16_sm90_gemm_128", "w4a16_sm90_gemm_64", "w4a16_sm90_gemm_128_ex", "w4a16_sm90_gemm_64_ex",
    "w4a16_sm90_gemm_128_bf16", "w4a16_sm90_gemm_64_bf16", "w4a16_sm90_workspace_size",
    "w4a16_sm90_prepared_size", "w4a16_sm90_prepare", "w4a16_sm90_gemm_prepared", "w4a16_sm90_cache_clear",
    "w4a16_sm90_cache_forget", "w4a16_sm90_cache_bytes", "w4a16_get_last_error", "w4a16_peek_last_error",
    "w4a16_last_error_message", "w4a16_status_string", "w4a16_sm90_last_kernel", "w4a16_version",
    "w4a16_capi_version", "w4a16_version_string",
)


@dataclass(frozen=True)
class BuildResult:
    out_dir: Path
    library: Path
    header: Path
    test_program: Optional[Path]
    cuda_include: Path
    kernels: int          # cubins embedded
    missing: tuple        # variants left out (too much shared memory or scratch): fall back at run time
    seconds: float


SYSTEM_CUDA_INCLUDE = Path("/usr/local/cuda/include")


def _triton_cuda_include() -> Optional[Path]:
    try:
        import triton
    except ImportError:
        return None
    return Path(triton.__file__).parent / "backends" / "nvidia" / "include"


def find_cuda_include(explicit: Optional[str] = None) -> Path:
    """The first directory holding ``cuda.h`` among: ``explicit``, $CUDA_HOME/include,
    /usr/local/cuda/include, the Triton wheel's backends/nvidia/include."""
    candidates = [Path(explicit)] if explicit else []
    if os.environ.get("CUDA_HOME"):
        candidates.append(Path(os.environ["CUDA_HOME"]) / "include")
    candidates.append(SYSTEM_CUDA_INCLUDE)
    tri = _triton_cuda_include()
    if tri is not None:
        candidates.append(tri)
    for c in candidates:
        if (c / "cuda.h").is_file():
            return c
    raise W4A16Error(f"cuda_include: expected a directory holding cuda.h, looked in {[str(c) for c in candidates]}; "
                     "install the CUDA headers or pass --cuda-include DIR")


def package_version() -> str:
    try:
        from importlib.metadata import version
        return version("w4a16")
    except Exception:
        return "0.1.0"


def _version_number(v: str) -> int:
    parts = [int("".join(ch for ch in p if ch.isdigit()) or 0) for p in v.split(".")[:3]]
    parts += [0] * (3 - len(parts))
    return parts[0] * 10000 + parts[1] * 100 + parts[2]


def compile_kernels(jobs: int) -> list:
    """Every cubin of the library (GEMM variants in table order, then the repack kernels),
    compiled in ``jobs`` fresh processes started without TRITON_INTERPRET (so a caller running
    under Triton's interpreter, like the CPU tests, still gets real cubins)."""
    items = [("gemm", v) for v in variants.gemm_variants()] + [("repack", n) for n in variants.REPACK_NAMES]
    items += [("gluon_repack", n) for n in gluon_variants.REPACK_NAMES]
    items += [("gluon", v) for v in gluon_variants.gluon_variants()]
    ctx = multiprocessing.get_context("spawn")
    with interpreter_unset(), cf.ProcessPoolExecutor(max_workers=max(1, jobs), mp_context=ctx) as pool:
        return list(pool.map(variants.compile_one, items, chunksize=4))


def _c_string(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_kernel_sources(src: Path, compiled: list, version: str) -> tuple:
    """Writes cubins/, w4a16_cubins.S and w4a16_gen.h into ``src``; returns the variants left out."""
    cub = src / "cubins"
    cub.mkdir(parents=True, exist_ok=True)
    asm = ['/* Generated by w4a16.capi.build: the cubins, embedded. */', '\t.section .rodata']
    names = [c.name for c in compiled]
    if len(set(names)) != len(names):  # the cubin files are named after the variants
        raise W4A16Error(f"kernel names: expected unique names, got duplicates in {names}")
    rows, missing = [], []
    expected = [len(GEMM_ARGS) + 2] * len(variants.gemm_variants()) + [7, 7, 10, 10]
    expected += [gluon_variants.REPACK_PARAMS[n.split("_")[1]] for n in gluon_variants.REPACK_NAMES]
    expected += [gluon_variants.DECODE_PARAMS if v.is_decode else gluon_variants.PREFILL_PARAMS
                 for v in gluon_variants.gluon_variants()]
    if len(expected) != len(compiled):
        raise W4A16Error(f"kernels: expected {len(expected)} compiled kernels, got {len(compiled)}")
    for i, c in enumerate(compiled):
        if c.params != expected[i]:
            raise W4A16Error(f"kernel {c.name}: expected {expected[i]} PTX parameters (the C launcher's), "
                             f"got {c.params}: the Triton version changed its calling convention")
        usable = c.scratch == 0 and c.shared <= variants.MAX_SHARED and bool(c.cubin)
        if not usable:
            missing.append(c.name)
            rows.append(f'\t{{{_c_string(c.name)}, {_c_string(c.func)}, 0, 0, {c.num_warps}, {c.shared}}},')
            continue
        (cub / f"{c.name}.cubin").write_bytes(c.cubin)
        sym = f"w4a16_cubin_{i}"
        asm += ["\t.balign 16", f"\t.globl {sym}", f"\t.hidden {sym}", f"{sym}:",
                f'\t.incbin "cubins/{c.name}.cubin"', f"\t.globl {sym}_end", f"\t.hidden {sym}_end", f"{sym}_end:",
                "\t.byte 0"]
        rows.append(f'\t{{{_c_string(c.name)}, {_c_string(c.func)}, {sym}, {sym}_end, {c.num_warps}, {c.shared}}},')
    asm.append('\t.section .note.GNU-stack,"",@progbits')
    (src / "w4a16_cubins.S").write_text("\n".join(asm) + "\n")

    n_gemm = len(variants.gemm_variants())
    externs = [f"extern const unsigned char w4a16_cubin_{i}[], w4a16_cubin_{i}_end[];"
               for i, c in enumerate(compiled) if c.name not in missing]
    import triton
    version_string = (f"w4a16 {version} (weight layouts: Triton 2, Gluon 1; Triton {triton.__version__}, sm_90a, "
                      f"{len(compiled) - len(missing)} kernels)")
    gen = [
        "/* Generated by w4a16.capi.build: the kernel table (see w4a16/capi/variants.py). */",
        "#ifndef W4A16_GEN_H", "#define W4A16_GEN_H",
        f"#define W4A16_GEN_VERSION {_version_number(version)}",
        f"#define W4A16_GEN_VERSION_STRING {_c_string(version_string)}",
        f"#define W4A16_GEN_NUM_GEMM {n_gemm}",
    ]
    for j, name in enumerate(variants.REPACK_NAMES):
        gen.append(f"#define W4A16_GEN_REPACK_{name.upper()} {n_gemm + j}")
    first = n_gemm + len(variants.REPACK_NAMES)
    for j, name in enumerate(gluon_variants.REPACK_NAMES):
        gen.append(f"#define W4A16_GEN_REPACK_{name.upper()} {first + j}")
    first += len(gluon_variants.REPACK_NAMES)
    gen += [
        f"#define W4A16_GEN_NUM_CUBINS {len(compiled)}",
        f"#define W4A16_GEN_REPACK_BLOCK {variants.REPACK_BLOCK}",
        f"#define W4A16_GEN_GLUON_PARAMS_BLOCK {gluon_variants.PARAMS_BLOCK}",
        f"#define W4A16_GEN_GLUON_FIRST {first}",
        f"#define W4A16_GEN_NUM_GLUON {len(compiled) - first}",
        "typedef struct {", "    const char *name, *func;", "    const unsigned char *begin, *end;",
        "    int num_warps, shared;", "} w4a16_cubin;",
        *externs,
        "static const w4a16_cubin w4a16_cubins[W4A16_GEN_NUM_CUBINS] = {", *rows, "};",
        *_gluon_table(compiled[first:]),
        "#endif",
    ]
    (src / "w4a16_gen.h").write_text("\n".join(gen) + "\n")
    return tuple(missing)


def _gluon_table(compiled: list) -> list:
    """C rows of the Gluon GEMM table (gluon_variants.GluonPlanInfo per variant; zeros where left out)."""
    out = ["/* kind (0 decode, 1 prefill), tokens per tile, rows per tile, half chunk, K per stage, programs",
           " * per SM, dependent launch, then per TMA descriptor (codes, x, scales, offsets): swizzle, element",
           " * bytes, CUtensorMapDataType, rank, box (outermost first) */",
           "typedef struct { int swizzle, elem_size, elem_type, rank; unsigned box[3]; } w4a16_tma_meta;",
           "typedef struct { int kind, mt, tile_n, kh, ks, resident, pdl; w4a16_tma_meta desc[4]; } w4a16_gluon_info;",
           "static const w4a16_gluon_info w4a16_gluon[W4A16_GEN_NUM_GLUON] = {"]
    for c in compiled:
        g = c.gluon
        if g is None or not c.cubin:
            out.append("\t{0},")
            continue
        descs = ", ".join("{%d, %d, %d, %d, {%s}}" % (sw, es, et, len(box), ", ".join(str(b) for b in box))
                          for sw, es, et, box in g.descs)
        out.append(f"\t{{{g.kind}, {g.mt}, {g.tile_n}, {g.kh}, {g.ks}, {g.resident}, {int(g.pdl)}, {{{descs}}}}},")
    out.append("};")
    return out


def _run(cmd: list, cwd: Path) -> None:
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if r.returncode != 0:
        raise W4A16Error(f"build-lib: command failed ({r.returncode}): {' '.join(cmd)}\n{r.stdout}{r.stderr}")


def compile_c(out: Path, cuda_include: Path, cc: str = "gcc", test_program: bool = True) -> None:
    """gcc: the library from src/ (C + the embedded cubins), then the test program linked to it."""
    src = out / "src"
    flags = ["-O2", "-std=c11", "-Wall", "-Wextra", "-Wno-unused-parameter", "-fPIC", "-fvisibility=hidden"]
    _run([cc, *flags, "-shared", "-I.", f"-I{cuda_include}", "-o", f"../{LIB_NAME}", "w4a16_sm90_kernel.c",
          "w4a16_cubins.S", "-ldl", "-lpthread", f"-Wl,-soname,{LIB_NAME}"], src)
    shutil.copy2(src / HEADER, out / HEADER)
    if test_program:
        _run([cc, "-O2", "-std=c11", "-Wall", "-Wextra", "-I.", f"-I{cuda_include}", "-o", f"../{TEST_PROGRAM}",
              "test_w4a16_sm90.c", "-L..", "-lw4a16_sm90_kernel", "-Wl,-rpath,$ORIGIN", "-ldl", "-lm"], src)


def build_lib(out_dir, jobs: Optional[int] = None, cuda_include: Optional[str] = None, cc: str = "gcc",
              test_program: bool = True, log=None) -> BuildResult:
    """Builds everything into ``out_dir`` (created if needed); see the module docstring."""
    t0 = time.time()
    say = log or (lambda s: None)
    out = Path(out_dir).resolve()
    inc = find_cuda_include(cuda_include)
    if shutil.which(cc) is None:
        raise W4A16Error(f"cc: expected a C compiler on PATH, got {cc!r} (not found)")
    src = out / "src"
    src.mkdir(parents=True, exist_ok=True)
    for name in C_SOURCES:
        shutil.copy2(CSRC / name, src / name)
    shutil.copy2(CSRC / "Makefile", out / "Makefile")
    jobs = jobs or max(1, min(os.cpu_count() or 1, 8))
    n_kernels = (len(variants.gemm_variants()) + len(variants.REPACK_NAMES) + len(gluon_variants.REPACK_NAMES)
                 + len(gluon_variants.gluon_variants()))
    say(f"compiling {n_kernels} kernels for sm_90a "
        f"({jobs} processes)")
    compiled = compile_kernels(jobs)
    missing = write_kernel_sources(src, compiled, package_version())
    say(f"compiling the library with {cc} (cuda.h from {inc})")
    compile_c(out, inc, cc, test_program)
    return BuildResult(out, out / LIB_NAME, out / HEADER, out / TEST_PROGRAM if test_program else None, inc,
                       len(compiled) - len(missing), missing, time.time() - t0)
