"""Compile the GEMM kernel for sm_90 on any machine (no GPU needed: Triton ships ptxas) and report
what the GPU would run: shared memory, registers, whether the dequantized weight tile is staged
through shared memory, and a SASS opcode histogram.

    python scripts/compile_sm90.py tile 256 128 8 3 --no-prefetch --wide-scales
    python scripts/compile_sm90.py splitk 16 64 4 1 --scale-after --sass

Integer arguments are compiled as divisible by 16, as the launcher's real shapes are.
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from w4a16.backends.triton.gemm import w4a16_gemm_kernel  # noqa: E402

ARGS = ("x_ptr", "qk_ptr", "s_ptr", "z_ptr", "bias_ptr", "y_ptr", "part_ptr", "counter_ptr", "M", "N", "K", "chunks",
        "chunks_per_split", "n_blocks", "alpha")


def compile_kernel(a):
    dt = "fp16" if a.dtype == "fp16" else "bf16"
    st = "*fp32" if a.wide_scales else f"*{dt}"
    sig = dict(zip(ARGS, (f"*{dt}", "*u8", st, st, f"*{dt}", f"*{dt}", "*fp32", "*i32",
                          "i32", "i32", "i32", "i32", "i32", "i32", "fp32")))
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(ARGS) if n != "alpha"}
    cx = dict(GROUP_LOG2=a.group_log2, KC=128 if a.group_log2 != 5 else 64, ONE_SCALE=a.group_log2 != 6,
              EVEN_K=True, BM=a.block_m, BN=a.block_n, EPILOGUE=a.kind == "tile", GROUP_M=8,
              SWAP_AB=not a.no_swap, UNROLL=a.unroll, PREFETCH=not a.no_prefetch, SCALE_AFTER=a.scale_after,
              HAS_ZEROS=a.zeros, HAS_BIAS=False, ATOMIC=False, USE_ASM=a.dequant != "portable", DTYPE=tl.float16 if dt == "fp16" else tl.bfloat16)
    for k in cx:
        sig[k] = "constexpr"
    src = ASTSource(fn=w4a16_gemm_kernel, signature=sig, constexprs=cx, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": a.num_warps, "num_stages": a.num_stages})


def cuobjdump(cubin: bytes, *flags) -> str:
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    r = subprocess.run([str(tool), *flags, f.name], capture_output=True, text=True)
    os.unlink(f.name)
    return r.stdout + r.stderr


def main_loop(sass: str) -> tuple:
    """(instruction count, opcode histogram) of the longest backward-branch loop in ``sass``."""
    lines = [ln for ln in sass.splitlines() if re.match(r"\s+/\*[0-9a-f]{4}\*/", ln)]

    def addr(ln):
        return int(re.match(r"\s+/\*([0-9a-f]{4})\*/", ln).group(1), 16)

    span = (0, -1)
    for ln in lines:
        m = re.search(r"BRA\s+0x([0-9a-f]+)", ln)
        if m and int(m.group(1), 16) < addr(ln) and addr(ln) - int(m.group(1), 16) > span[1] - span[0]:
            span = (int(m.group(1), 16), addr(ln))
    body = [ln for ln in lines if span[0] <= addr(ln) <= span[1]]
    ops = (re.match(r"\s+/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", ln) for ln in body)
    return len(body), collections.Counter(m.group(1) for m in ops if m)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("kind", choices=("tile", "splitk"))
    p.add_argument("block_m", type=int)
    p.add_argument("block_n", type=int)
    p.add_argument("num_warps", type=int)
    p.add_argument("num_stages", type=int)
    p.add_argument("--no-swap", action="store_true")
    p.add_argument("--no-prefetch", action="store_true")
    p.add_argument("--scale-after", action="store_true", help="scale the MMA's partial sums")
    p.add_argument("--wide-scales", action="store_true", help="fp32 scales and zeros")
    p.add_argument("--unroll", type=int, default=1)
    p.add_argument("--zeros", action="store_true")
    p.add_argument("--dequant", choices=("magic", "portable"), default="magic")
    p.add_argument("--dtype", choices=("fp16", "bf16"), default="fp16")
    p.add_argument("--group-log2", type=int, default=7, help="5 (g=32) .. 8 (g=256), -1 per-channel")
    p.add_argument("--sass", action="store_true", help="print the SASS opcode histogram")
    a = p.parse_args(argv)
    k = compile_kernel(a)
    staged = sum(1 for ln in k.asm["ttgir"].splitlines() if re.search(r"local_alloc %w_", ln))
    res = cuobjdump(k.asm["cubin"], "-res-usage")
    regs = re.search(r"REG:(\d+)", res)
    print(f"shared {k.metadata.shared} B, registers {regs.group(1) if regs else '?'}, "
          f"weight tiles staged in shared memory: {staged}")
    if a.sass:
        body, hist = main_loop(cuobjdump(k.asm["cubin"], "-sass"))
        per_thread = a.block_n * (64 if a.group_log2 == 5 else 128) * a.unroll // (32 * a.num_warps)
        print(f"main loop: {body} SASS instructions for {per_thread} weights per thread "
              f"({body / per_thread:.2f} per weight): " + ", ".join(f"{o}:{n}" for o, n in hist.most_common(14)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
