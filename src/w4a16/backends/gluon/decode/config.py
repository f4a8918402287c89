"""Launch configurations of the Gluon decode kernel (``decode.py``)."""
from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass
from typing import Dict, List

from ....errors import expect

TOKEN_TILES = (8, 16, 32, 64)
# Whether the backend runs "residual_rmsnorm" in the decode kernel (:func:`kernel_norm`) instead of
# the residual epilogue and the norm in torch after it. The kernel's norm compiles spill-free for
# sm_90a on Triton 3.6.0 to 3.9.0 (``w4a16 sass``); on by default once its GPU tests have passed
# (tests/test_epilogue_gpu.py turns it on for itself). W4A16_GLUON_KERNEL_NORM=1 turns it on for a
# process.
KERNEL_NORM = os.environ.get("W4A16_GLUON_KERNEL_NORM", "0") == "1"
# The largest output (M x N elements) whose norm the decode kernel writes itself: its last program
# reads and writes the rows alone, 4096 elements (one L2 round trip) a step, which a separate norm
# kernel spreads over the GPU. By estimate (not measured yet: benchmarks/epilogue_bench.py times
# the crossover) four 4096-wide rows, where the serial tail is about a separate kernel's launch.
NORM_MAX_ELEMENTS = 16384


def kernel_norm(cfg: "GluonDecodeConfig", M: int, N: int) -> bool:
    """Whether the decode kernel with ``cfg`` writes the "residual_rmsnorm" epilogue's norm of an
    [M, N] output itself: KERNEL_NORM on, ``cfg.norm_epilogue``, 0 < M * N <= NORM_MAX_ELEMENTS."""
    return KERNEL_NORM and cfg.norm_epilogue and 0 < M * N <= NORM_MAX_ELEMENTS


@dataclass(frozen=True)
class GluonDecodeConfig:
    """One launch configuration.

    mt:      token tile (the wgmma N): 8, 16, 32 or 64; must be >= M.
    warps:   4 or 8 (one or two warpgroups; the program covers 16 * warps weight rows).
    nch:     chunks per pipeline stage (a stage covers nch * 2 * kh values of K, kh = min(g, 64)).
    stages:  shared-memory ring depth (2..8).
    splits:  K splits (1 = none; 0 = chosen by the launcher to fill the GPU).
    ws:      True: a one-warp TMA producer partition (warp_specialize); False: one partition that
             issues the loads of stage i + stages - 1 before consuming stage i.
    maxnreg: registers per thread at launch (0: 80 for 4 warps and mt <= 16, else 104, and
             128 without ws or for stream-K with mt >= 32, 160 for stream-K with 8 warps; fewer spill
             or serialize the HGMMAs): with the shared memory, what decides how many programs share
             an SM.
    sk:      stream-K: a persistent grid of as many programs as fit on the GPU at once, each taking an
             equal share of all (N tile, K stage) units, so no wave is partly empty; tiles shared by
             several programs are summed in program order (deterministic). Needs ws; splits, if
             set, is then the number of programs (for tests; 0: as many as fit).
    sa:      symmetric weights (at mt <= 32, see scale_after): multiply the exact integers q - 8 and apply each group's
             scale to its fp32 sums after the MMA (9 instead of 13 dequant instructions per 8
             weights in fp16); False: fold the scale into the dequant (q * s - 8 s).
    pdl:     launched as a programmatic dependent launch: the weight's first stages are loaded
             while the previous kernel on the stream finishes (x and every store wait for it).
    """

    mt: int = 16
    warps: int = 4
    nch: int = 2
    stages: int = 4
    splits: int = 0
    ws: bool = True
    maxnreg: int = 0
    sk: bool = False
    sa: bool = True
    pdl: bool = True

    def __post_init__(self):
        expect(self.mt in TOKEN_TILES, "mt", f"one of {TOKEN_TILES}", self.mt)
        expect(self.warps in (4, 8), "warps", "4 or 8", self.warps)
        expect(self.nch in (1, 2, 4), "nch", "1, 2 or 4", self.nch)
        expect(2 <= self.stages <= 8, "stages", "2..8", self.stages)
        expect(self.splits >= 0, "splits", ">= 0 (0 = automatic)", self.splits)
        expect(self.maxnreg == 0 or 64 <= self.maxnreg <= 255, "maxnreg", "0 or 64..255", self.maxnreg)
        expect(not self.sk or self.ws, "sk", "False without ws (stream-K needs the producer warp)", self.sk)

    @property
    def regs(self) -> int:
        if self.maxnreg:
            return self.maxnreg
        if not self.ws:
            return 128      # fewer: ptxas puts a wait after every HGMMA (register pressure)
        if self.sk and self.warps == 8:
            return 160      # the stream-K epilogue's partial sums spill at 128 (1 program per SM either way)
        if self.sk and self.mt >= 32:
            return 128      # ... and at 104 (2 programs per SM either way)
        return 80 if (self.warps == 4 and self.mt <= 16) else 104

    @property
    def norm_epilogue(self) -> bool:
        """Whether the kernel runs the "residual_rmsnorm" epilogue itself (``common.norm_rows``):
        with a producer warp and no stream-K. The single-partition kernel (at 128 registers) and
        the stream-K consumer (whose tile loop keeps the pipeline's state live, at 80) spill
        registers in it on sm_90a; with those configs ``w4a16.gemm`` runs the norm after the kernel."""
        return self.ws and not self.sk

    def scale_after(self, has_zeros: bool, group: int) -> bool:
        """Whether the kernel applies the scales after the MMA for this weight (see ``sa``): symmetric
        weights, mt <= 32; at mt = 8 not with 4 chunks of group 64; above mt = 8 groups of at least
        128 and at most 2 chunks per stage
        (with two groups per chunk or 4 chunks, the wider tiles' integer sums do not fit 80
        registers and ptxas waits for every wgmma: checked by tests/backends/gluon/test_sass.py)."""
        if not self.sa or has_zeros:
            return False
        if self.mt <= 8:
            # 4 chunks of two 64-value groups: ptxas waits after every HGMMA (w4a16 sass, triton 3.6-3.9)
            return not (self.nch == 4 and group == 64)
        return self.mt <= 32 and group >= 128 and self.nch <= 2

    @property
    def launch_warps(self) -> int:
        """Warps of a program as launched: Gluon pads a warp-specialized program to whole
        warpgroups, so the producer warp brings a warpgroup of its own."""
        return self.warps + (4 if self.ws else 0)

    def resident(self, kh: int, has_zeros: bool = False) -> int:
        """Programs per SM (H100/H200: 228 KB shared memory with 1 KB reserved per program, 64K
        registers allocated per warp in units of 256, 64 warps, 32 programs)."""
        warps = self.launch_warps
        by_smem = (228 * 1024) // (self.smem_bytes(kh, 2, has_zeros) + 2048)
        per_warp = -(-self.regs * 32 // 256) * 256
        by_regs = (65536 // per_warp) // warps
        return max(1, min(by_smem, by_regs, 64 // warps, 32))

    @classmethod
    def from_short(cls, text: str) -> "GluonDecodeConfig":
        """The config whose ``short()`` is ``text`` (as sweep logs print them), e.g. "g8x64c2s4wssk"
        (``short()`` leaves out maxnreg: it comes back 0, the default)."""
        m = re.fullmatch(r"g(\d+)x(\d+)c(\d+)s(\d+)(?:k(\d+))?(ws)?(sk)?(fo)?(np)?", text)
        expect(m is not None, "config name", "g{mt}x{rows}c{chunks}s{stages}[k{splits}][ws][sk][fo][np]", repr(text))
        mt, rows, nch, st, k, ws, sk, fo, np_ = m.groups()
        expect(int(rows) % 16 == 0, "config name rows", "a multiple of 16", rows)
        return cls(int(mt), int(rows) // 16, int(nch), int(st), int(k or 0), bool(ws), sk=bool(sk), sa=not fo,
                   pdl=not np_)

    def short(self) -> str:
        s = f"g{self.mt}x{16 * self.warps}c{self.nch}s{self.stages}"
        s += (f"k{self.splits}" if self.splits else "") + ("ws" if self.ws else "") + ("sk" if self.sk else "")
        return s + ("" if self.sa else "fo") + ("" if self.pdl else "np")

    def smem_bytes(self, kh: int, elem: int = 2, has_zeros: bool = False) -> int:
        """Shared memory of the ring (codes + x + scales [+ offsets]) for half-chunk kh."""
        ks = self.nch * 2 * kh
        bn = 16 * self.warps
        per = bn * ks // 2 + self.mt * ks * elem + (2 if has_zeros else 1) * max(1, ks // 32) * bn * elem
        return self.stages * per


NAMED: Dict[str, GluonDecodeConfig] = {
    "m8": GluonDecodeConfig(mt=8, warps=4, nch=4, stages=3),
    "m8_small": GluonDecodeConfig(mt=8, warps=4, nch=2, stages=4, ws=False),
    "m16": GluonDecodeConfig(mt=16, warps=4, nch=2, stages=4),
    "m32": GluonDecodeConfig(mt=32, warps=4, nch=1, stages=4),
    "m64": GluonDecodeConfig(mt=64, warps=4, nch=1, stages=4),
    "m64_wide": GluonDecodeConfig(mt=64, warps=8, nch=2, stages=3),
}


def token_tile(M: int) -> int:
    for mt in TOKEN_TILES:
        if M <= mt:
            return mt
    return TOKEN_TILES[-1]


def heuristic(M: int, N: int, K: int, group: int, num_sms: int) -> GluonDecodeConfig:
    """The configuration for a call of M tokens on an N x K weight.

    From the H200 sweeps of 2026-12-01 (docs/gluon_decode_notes.md, versions 5 and 6: symmetric
    weights scaled after the MMA, stream-K, programmatic dependent launch; fp16, g = 128,
    CUDA-graph replay over rotating weights; us):
    - M <= 8: wide layers (N >= 32768) stream-K, 2 chunks x 4 stages (70B gate_up 61.5 vs 68.9 for
      the single partition); N >= 16384 the single-partition pipeline (8B gate_up 21.3-22.3 vs
      22.5 stream-K); the rest 2 x 4 with a producer warp, which the dependent launch made the
      fastest (8B o 5.6 vs 6.0 single-partition, 8B qkv 7.3 vs 7.8, 8B down 10.3 vs 12.0, 70B qkv
      15.0 vs 16.3, 70B o 11.6 vs 12.9, 70B down 33.3).
    - M <= 16: N >= 16384 stream-K 2 x 4 (70B gate_up 66.1, 8B gate_up 22.0); N*K < 32M 2 x 6
      with a producer warp (8B o 7.2, 8B qkv 8.5); else 2 x 4 with a producer warp (8B down 13.1,
      70B o 13.4, 70B qkv 17.6, 70B down 35.9 vs 35.4 for 2 x 6).
    - M > 16, with a producer warp: N*K <= 67.2M, or K < 8192: one warpgroup (8B qkv 12.1, 8B o
      9.9, 70B o 21.9, 8B down 22.1: 2 x 3; 8B gate_up 36.7: 1 x 4); bigger layers two warpgroups
      (128 rows), 2 x 3, stream-K where N >= 10240 (70B gate_up 123.3, 70B qkv 29.0-29.4; 70B
      down 62.9 without).
    One warpgroup of 64 rows beat two (128 rows) everywhere at M <= 16. K splits of the per-tile
    grid come from the launcher's wave model (``auto_splits``).
    """
    mt = token_tile(M)
    c2 = 4 if group == 32 else 2
    size = N * K
    if mt <= 8:
        if N >= 32768:
            return GluonDecodeConfig(mt=mt, warps=4, nch=c2, stages=4, sk=True)
        if N >= 16384:
            return GluonDecodeConfig(mt=mt, warps=4, nch=c2, stages=4, ws=False)
        return GluonDecodeConfig(mt=mt, warps=4, nch=c2, stages=4)
    if mt <= 16:
        if N >= 16384:
            return GluonDecodeConfig(mt=mt, warps=4, nch=c2, stages=4, sk=True)
        if size < 32_000_000:
            return GluonDecodeConfig(mt=mt, warps=4, nch=c2, stages=6)
        return GluonDecodeConfig(mt=mt, warps=4, nch=c2, stages=4)
    if K < 8192 and size > 67_200_000:
        return GluonDecodeConfig(mt=mt, warps=4, nch=1 if group >= 64 else c2, stages=4)
    if size <= 67_200_000:
        return GluonDecodeConfig(mt=mt, warps=4, nch=c2, stages=3)
    return GluonDecodeConfig(mt=mt, warps=8, nch=c2, stages=3, sk=N >= 10240)


def candidates(M: int, N: int, K: int, group: int, num_sms: int) -> List[GluonDecodeConfig]:
    """Configurations worth timing for this call (for tuning sweeps): the heuristic's choice first."""
    mt = token_tile(M)
    c4 = 4 if group == 32 else 2
    h = heuristic(M, N, K, group, num_sms)
    if mt <= 16:
        out = [h, GluonDecodeConfig(mt, 4, c4, 4), GluonDecodeConfig(mt, 4, 4, 3), GluonDecodeConfig(mt, 4, c4, 4, ws=False),
               GluonDecodeConfig(mt, 4, 4, 3, ws=False), GluonDecodeConfig(mt, 4, c4, 6)]
    else:
        out = [h, GluonDecodeConfig(mt, 4, 1, 4), GluonDecodeConfig(mt, 4, c4, 3), GluonDecodeConfig(mt, 8, c4, 3),
               GluonDecodeConfig(mt, 4, 1, 6), GluonDecodeConfig(mt, 4, 1, 4, ws=False)]
    if h.scale_after(False, group):
        out.append(dataclasses.replace(h, sa=False))   # the scales folded into the dequant, for comparison
    out.append(dataclasses.replace(h, pdl=False))      # a plain launch, for comparison
    # each producer-warp config also as stream-K (the persistent schedule), and a deeper stream-K ring
    out += [dataclasses.replace(c, sk=True) for c in out if c.ws and c.sa and c.pdl]
    out.append(GluonDecodeConfig(mt, 4, c4, 5, sk=True))
    if mt <= 16 and N * K < 64_000_000 and group >= 64:
        # small layers: one chunk per stage, a deeper ring (more, shorter K ranges for the same bytes in flight)
        out.append(GluonDecodeConfig(mt, 4, 1, 8))
    if N * K < 64_000_000:   # small layers: fewer, longer ranges (less fill and fewer shared tiles per program)
        out += [GluonDecodeConfig(mt, 4, c4, 4, splits=num_sms, sk=True),
                GluonDecodeConfig(mt, 4, c4, 4, splits=2 * num_sms, sk=True)]
    kh = min(group, 64) if group < 64 else 64
    seen, res = set(), []
    for c in out:
        if c not in seen and c.smem_bytes(kh) <= 220 * 1024:
            seen.add(c)
            res.append(c)
    return res


def auto_splits(n_tiles: int, n_stages: int, slots: int, split_cost: float = 0.0, min_stages: int = 2,
                max_splits: int = 16) -> int:
    """K splits for n_tiles output tiles of n_stages pipeline stages each, with ``slots`` programs
    resident on the whole GPU at once.

    Cost model: programs run in waves of ``slots``; a program costs its stages, about two stages of
    pipeline fill and epilogue, and with several splits ``split_cost`` stage-equivalents for its
    fp32 partial tile (written, then read by the reducing program); pick the split count with the
    lowest cost. (Version 2 asked for 3 programs per SM regardless of the real occupancy: 70B down
    at M = 1 ran 512 programs on 396 slots, 1.3 waves; version 3 without ``split_cost`` split 70B
    gate_up in two at M = 64 and lost 12%: 139 -> 156 us.)"""
    best, best_t = 1, None
    for s in range(1, max_splits + 1):
        sps = -(-n_stages // s)
        if s > 1 and sps < min_stages:
            break
        s_eff = -(-n_stages // sps)
        units = n_tiles * s_eff
        t = -(-units // slots) * (sps + 2 + (split_cost if s_eff > 1 else 0.0))
        if best_t is None or t < best_t:
            best, best_t = s_eff, t
    return best
