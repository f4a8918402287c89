"""The Triton backend's launch configurations: a typed, validated tile/schedule choice, and the
named ones.

One kernel (``gemm.py``) runs in two shapes:

* ``tile``   — a tiled GEMM (prefill, M large): each program computes a [BLOCK_M, BLOCK_N] tile
  over all of K. The SPEC's ``w4a16_sm90_gemm_128`` is the named config "128".
* ``splitk`` — a memory-bound GEMM for small M (decode): a narrow M tile, K split across programs
  so every SM streams weights, partial sums reduced in fp32. "64" (the SPEC's small-tile entry
  point) and "decode" are of this kind.
"""
from __future__ import annotations

import functools
import json
from dataclasses import asdict, dataclass, replace

from ...errors import expect

KINDS = ("tile", "splitk")
DEQUANTS = ("magic", "portable")


def _pow2(v: int) -> bool:
    return v > 0 and (v & (v - 1)) == 0


@dataclass(frozen=True)
class GemmConfig:
    """One kernel launch shape.

    kind:       "tile" or "splitk".
    block_m:    rows of x per program (16..256, power of two).
    block_n:    output features per program (16..256, power of two).
                (The K step is the weight layout's chunk: 128, or 64 for group size 32.)
    split_k:    programs sharing one output tile along K (1 = none); "splitk" kernels only.
    num_warps:  warps per program (1, 2, 4, 8).
    num_stages: software-pipelining depth (1..6).
    group_m:    tile-order grouping for L2 reuse ("tile" kernels).
    swap_ab:    True computes y^T = W x^T (the dequantized weight is the first MMA operand, from
                registers); False computes y = x W^T (the weight is staged in shared memory). On
                Hopper a pipelined swapped config with the scales before the MMA runs unswapped
                (:meth:`for_wgmma`).
    unroll:     layout chunks (128 K values, 64 for g = 32) per main-loop iteration: 1, 2 or 4.
    prefetch:   load the next chunk's scales one iteration ahead (True) or in the iteration that
                uses them (False; with wide_scales the pipeline then stages them like the codes).
    scale_after: multiply each half chunk's fp32 MMA result by its scales (True; the MMA takes the
                integer-valued weights) or scale the weights before the MMA (False). Fewer
                instructions when the accumulator tile is small (decode), more registers.
    wide_scales: read scales and zeros from fp32 copies (True: 4-byte loads that Triton stages
                with cp.async; 2x the scale bytes) or in the activation dtype (False).
    dequant:    "magic" (inline-PTX int4 -> fp16/bf16, GPU only) or "portable" (plain Triton);
                under Triton's interpreter "magic" runs as "portable".
    """

    kind: str = "tile"
    block_m: int = 128
    block_n: int = 128
    split_k: int = 1
    num_warps: int = 8
    num_stages: int = 3
    group_m: int = 8
    swap_ab: bool = True
    dequant: str = "magic"
    unroll: int = 1
    prefetch: bool = True
    wide_scales: bool = False
    scale_after: bool = False

    def __post_init__(self):
        expect(self.kind in KINDS, "config.kind", f"one of {KINDS}", self.kind)
        for name, lo, hi in (("block_m", 16, 256), ("block_n", 16, 256)):
            v = getattr(self, name)
            expect(_pow2(v) and lo <= v <= hi, f"config.{name}", f"a power of two in [{lo}, {hi}]", v)
        expect(1 <= self.split_k <= 256, "config.split_k", "an integer in [1, 256]", self.split_k)
        expect(self.kind == "splitk" or self.split_k == 1, "config.split_k",
               "1 for kind 'tile' (split-K belongs to kind 'splitk')", self.split_k)
        expect(self.num_warps in (1, 2, 4, 8), "config.num_warps", "1, 2, 4 or 8", self.num_warps)
        expect(1 <= self.num_stages <= 6, "config.num_stages", "an integer in [1, 6]", self.num_stages)
        expect(1 <= self.group_m <= 64, "config.group_m", "an integer in [1, 64]", self.group_m)
        expect(self.dequant in DEQUANTS, "config.dequant", f"one of {DEQUANTS}", self.dequant)
        expect(self.unroll in (1, 2, 4), "config.unroll", "1, 2 or 4", self.unroll)
        expect(isinstance(self.swap_ab, bool), "config.swap_ab", "a bool", self.swap_ab)
        expect(isinstance(self.prefetch, bool), "config.prefetch", "a bool", self.prefetch)
        expect(isinstance(self.wide_scales, bool), "config.wide_scales", "a bool", self.wide_scales)
        expect(isinstance(self.scale_after, bool), "config.scale_after", "a bool", self.scale_after)

    def as_dict(self) -> dict:
        return asdict(self)

    def key(self) -> str:
        """The config as a string (JSON); :func:`config_from_key` reads it back."""
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))

    def short(self) -> str:
        """A compact label, e.g. 'tile 128x128 w8 s3' or 'splitk 16x64 k8 w4 s4'."""
        sk = f" k{self.split_k}" if self.kind == "splitk" else ""
        dq = ("" if self.swap_ab else " noswap") + ("" if self.dequant == "magic" else " portable")
        dq += f" u{self.unroll}" if self.unroll > 1 else ""
        dq += "" if self.prefetch else " noprefetch"
        dq += " s32" if self.wide_scales else ""
        dq += " sa" if self.scale_after else ""
        return (f"{self.kind} {self.block_m}x{self.block_n}{sk} "
                f"w{self.num_warps} s{self.num_stages}{dq}")

    def for_wgmma(self) -> "GemmConfig":
        """The config a Hopper (sm_90a, wgmma) launch runs: a pipelined config with the weight as
        the first MMA operand and the scales applied before the MMA runs unswapped. Compiled with
        the weight in registers (Triton 3.6 to 3.8, and 3.9 with ptxas 12.9), the next
        iteration's code rewrites the A-operand registers of the previous iteration's last wgmma
        before waiting for it, which the PTX ISA leaves undefined; the grouped MoE kernel built the
        same way computed NaN on an H100 (``w4a16 sass`` counts such writes:
        ``sass.disasm.register_operand_hazards``). Unswapped, the weight reaches the MMA through
        shared memory and no wgmma reads a register operand; a 256-row tile then keeps at most two
        stages (with three, 256x128 needs 233,472 bytes of shared memory at group size 64 with zero
        points, over the 232,448 a block may have). Other configs are returned as they are."""
        if self.swap_ab and self.num_stages > 1 and not self.scale_after:
            stages = min(self.num_stages, 2) if self.block_m >= 256 else self.num_stages
            return replace(self, swap_ab=False, num_stages=stages)
        return self


# The SPEC's two entry points, plus the decode kernel. split_k of a named "splitk" config is the
# upper bound; the launcher lowers it so every split has at least one K step.
NAMED_CONFIGS = {
    "128": GemmConfig("tile", block_m=128, block_n=128, num_warps=8, num_stages=4, prefetch=False,
                      wide_scales=True),
    "64": GemmConfig("splitk", block_m=64, block_n=64, split_k=4, num_warps=4, num_stages=1, unroll=2),
    "decode": GemmConfig("splitk", block_m=16, block_n=64, split_k=8, num_warps=4, num_stages=1,
                         scale_after=True),
}


@functools.lru_cache(maxsize=256)
def config_from_key(key: str) -> GemmConfig:
    """The GemmConfig a :meth:`GemmConfig.key` string describes."""
    return GemmConfig(**json.loads(key))
