"""Launch configurations of the Gluon decode kernel (``decode.py``)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List

from ...errors import expect

TOKEN_TILES = (8, 16, 32, 64)


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
             128 without ws; fewer spill or serialize the HGMMAs): with the shared memory, what decides how many programs share an SM.
    """

    mt: int = 16
    warps: int = 4
    nch: int = 2
    stages: int = 4
    splits: int = 0
    ws: bool = True
    maxnreg: int = 0

    def __post_init__(self):
        expect(self.mt in TOKEN_TILES, "mt", f"one of {TOKEN_TILES}", self.mt)
        expect(self.warps in (4, 8), "warps", "4 or 8", self.warps)
        expect(self.nch in (1, 2, 4), "nch", "1, 2 or 4", self.nch)
        expect(2 <= self.stages <= 8, "stages", "2..8", self.stages)
        expect(self.splits >= 0, "splits", ">= 0 (0 = automatic)", self.splits)
        expect(self.maxnreg == 0 or 64 <= self.maxnreg <= 255, "maxnreg", "0 or 64..255", self.maxnreg)

    @property
    def regs(self) -> int:
        if self.maxnreg:
            return self.maxnreg
        if not self.ws:
            return 128      # fewer: ptxas puts a wait after every HGMMA (register pressure)
        return 80 if (self.warps == 4 and self.mt <= 16) else 104

    def resident(self, kh: int, has_zeros: bool = False) -> int:
        """Programs per SM (H100/H200: 228 KB shared memory, 64K registers, 64 warps)."""
        warps = self.warps + (1 if self.ws else 0)
        by_smem = (228 * 1024) // (self.smem_bytes(kh, 2, has_zeros) + 2048)
        by_regs = 65536 // (self.regs * 32 * warps)
        return max(1, min(by_smem, by_regs, 64 // warps, 32))

    def short(self) -> str:
        s = f"g{self.mt}x{16 * self.warps}c{self.nch}s{self.stages}"
        return s + (f"k{self.splits}" if self.splits else "") + ("ws" if self.ws else "")

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

    From the H200 sweep of 2026-11-30 (docs/gluon_decode_notes.md, versions 3-4; fp16, g = 128,
    CUDA-graph replay over rotating weights; us):
    - M <= 8: wide layers (N >= 32768) 2 chunks x 4 stages with a producer warp (70B gate_up 69.3
      vs 75.2 for 4 x 3); long-K layers (K >= 14336) 4 chunks x 3 stages with a producer warp (70B
      down 38.3 vs 41.0, 8B down 13.7 vs 13.8); the rest the single-partition pipeline, 2 x 4 (70B
      qkv 18.2 vs 21.6 with the producer warp, 70B o 15.1, 8B qkv 8.2 vs 8.7, 8B o 7.3, 8B gate_up
      24.8 vs 24.6).
    - M <= 16: N, K >= 8192: 2 x 4 with a producer warp (70B gate_up 80.4 vs 91.7, 70B down 40.0,
      70B qkv 20.1, 70B o 15.9); N*K < 32M: single partition 2 x 4 (8B qkv 9.5 vs 10.3); else
      2 x 6 with a producer warp (8B gate_up 26.9 vs 28.8, 8B down 15.2 vs 16.1).
    - M > 16, with a producer warp: N*K <= 67M: one warpgroup, 2 x 3 (8B qkv 13.6 vs 15.5, 8B o
      11.3 vs 12.3, 70B o 23.4 vs 24.5, 8B down 24.0 vs 24.5); bigger layers: two warpgroups
      (128 rows), 2 x 3 (version 4 sweep: 70B down 64.7 vs 67.4 for 64 rows 1 x 4, 70B gate_up
      143.5 vs 143.8, 70B qkv 35.3 vs 35.4, 8B gate_up 39.0 vs 39.4).
    One warpgroup of 64 rows beat two (128 rows) everywhere at M <= 16. K splits come from the
    launcher's wave model (``auto_splits``).
    """
    mt = token_tile(M)
    c2 = 4 if group == 32 else 2
    size = N * K
    if mt <= 8:
        if N >= 32768:
            return GluonDecodeConfig(mt=mt, warps=4, nch=c2, stages=4)
        if K >= 14336:
            return GluonDecodeConfig(mt=mt, warps=4, nch=4, stages=3)
        return GluonDecodeConfig(mt=mt, warps=4, nch=c2, stages=4, ws=False)
    if mt <= 16:
        if N >= 8192 and K >= 8192:
            return GluonDecodeConfig(mt=mt, warps=4, nch=c2, stages=4)
        if size < 32_000_000:
            return GluonDecodeConfig(mt=mt, warps=4, nch=c2, stages=4, ws=False)
        return GluonDecodeConfig(mt=mt, warps=4, nch=c2, stages=6)
    if size <= 67_200_000:
        return GluonDecodeConfig(mt=mt, warps=4, nch=c2, stages=3)
    return GluonDecodeConfig(mt=mt, warps=8, nch=c2, stages=3)


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
