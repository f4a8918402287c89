"""Launch configurations of the Gluon prefill kernel (``prefill.py``).

Measured on an H200 (2026-12-01, docs/gluon_prefill_notes.md): every config below passes the
correctness matrix; the heuristic follows the first sweep over Llama 8B / 70B layers, and the
shipped tuning table holds the measured winner per Llama layer and M bucket.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List

from ....errors import expect

PREFILL_TOKEN_TILES = (64, 128, 256)
SMEM_LIMIT = 227 * 1024   # dynamic shared memory per block on H100 / H200


@dataclass(frozen=True)
class GluonPrefillConfig:
    """One launch configuration of the prefill kernel.

    mt:       token tile (the wgmma N): 64, 128 or 256.
    bn:       weight rows per consumer warpgroup: 64 (one m64 wgmma row block) or 128 (two); a
              program tile is 2 * bn rows (two consumer warpgroups) x mt tokens.
    nch:      chunks per pipeline stage (a stage covers nch * 2 * kh values of K, kh = min(g, 64)).
    stages:   shared-memory ring depth (2..8).
    pingpong: True: the two consumer warpgroups take turns issuing their wgmma chains (an mbarrier
              handshake per stage: one dequantizes while the other's wgmmas run); False: both run
              free (the "cooperative" variant: one tile of 2 * bn rows split between them, no
              ordering between the warpgroups).
    hold:     True: a chunk's A registers stay alive until the next chunk's wgmmas are issued (no
              wgmma wait between chunks; + 32 registers per 64 rows); False: wait for each chunk's
              wgmmas before the next dequant (the other warpgroup keeps the tensor cores busy).
              Only matters with nch > 1 (a stage always ends with a wait for all its wgmmas).
    group_n:  grouped raster: row tiles per group (programs running together share weight tiles
              and token tiles in L2).
    maxnreg:  registers per thread at launch (0: 168). Gluon runs the kernel in 12 warps (the
              producer warp's warpgroup is padded with 3 idle warps), so the launch needs
              12 * 32 * maxnreg <= 64K registers: 168 at most (224 would not launch).
    creg:     registers the consumer worker partition asks for (setmaxnreg; 0: the most the pool
              allows, (3 * maxnreg - 40) / 2 rounded down to 8 = 232 at 168). Triton gives the
              default partition (consumer 0) what is left, 3 * maxnreg - creg - 40 (232 as well),
              and the producer warpgroup 40. At 232 / 232 / 40 ptxas reports no spills in the
              128-token kernel and no wait between its HGMMAs; at 168 for all (the rule PERF.md
              gives for one wgmma partition) consumer 0 spills 16 registers in its K loop.
    epi:      the epilogue in this many slices of tokens (1, 2 or 4; 0: 1 for 64 x 128 accumulators,
              4 above); slicing the accumulator is free (register bits), and it cuts the epilogue's
              live offsets and pointers: spills of the 256-token tiles 48 -> 4 with 2 slices, 0 with 4.
    splits:   split each tile's K in up to this many ranges (1: none), for grids of fewer tiles than
              SMs; fp32 partials summed in split order by the last range to finish (deterministic).
              64- and 128-token tiles of 64 rows per warpgroup only (the others spill in the split
              epilogue). Compile-verified only (no spills, no wait between HGMMAs, partition-local
              barriers): not among the candidates the tuner times until it has run on a GPU.
    stream:   stream-K: the tiles' K stages, laid end to end, are dealt out in equal runs, one per
              persistent program (one wave); a tile shared by several programs is summed by the
              last of them in program order (fp32 partials, deterministic), so a grid of fewer
              tiles than about two waves keeps every SM busy with at most one partial per program
              boundary (``splits`` writes one per range of every tile). Same tiles as ``splits``
              (not with it). Compile-verified only: not among the tuner's candidates until it has
              run on a GPU.
    """

    mt: int = 128
    bn: int = 64
    nch: int = 1
    stages: int = 4
    pingpong: bool = True
    hold: bool = True
    group_n: int = 8
    maxnreg: int = 0
    creg: int = 0
    epi: int = 0
    splits: int = 1
    stream: bool = False

    def __post_init__(self):
        expect(self.mt in PREFILL_TOKEN_TILES, "mt", f"one of {PREFILL_TOKEN_TILES}", self.mt)
        expect(self.bn in (64, 128), "bn", "64 or 128", self.bn)
        expect(self.nch in (1, 2, 4), "nch", "1, 2 or 4", self.nch)
        expect(2 <= self.stages <= 8, "stages", "2..8", self.stages)
        expect(1 <= self.group_n <= 64, "group_n", "1..64", self.group_n)
        expect(self.maxnreg == 0 or (64 <= self.maxnreg <= 168 and self.maxnreg % 8 == 0), "maxnreg",
               "0 or a multiple of 8 in 64..168 (12 warps x 32 x maxnreg <= 64K)", self.maxnreg)
        expect(self.epi in (0, 1, 2, 4), "epi", "0, 1, 2 or 4", self.epi)
        expect(isinstance(self.splits, int) and 1 <= self.splits <= 32, "splits", "an int in 1..32", self.splits)
        expect(self.splits == 1 or (self.mt <= 128 and self.bn == 64), "splits",
               "1 for 256-token or 128-row-per-warpgroup tiles (their split epilogue spills)", self.splits)
        expect(not self.stream or (self.splits == 1 and self.mt <= 128 and self.bn == 64), "stream",
               "False with splits > 1, 256-token or 128-row-per-warpgroup tiles (their split epilogue spills)",
               self.stream)
        expect(self.creg == 0 or (self.regs <= self.creg <= self.max_creg and self.creg % 8 == 0), "creg",
               f"0 or a multiple of 8 from maxnreg to {self.max_creg}", self.creg)

    @property
    def warps(self) -> int:
        """Warps of the default partition (consumer 0), the launch's ``num_warps``; the kernel runs
        9 warps: two consumer warpgroups and the producer warp."""
        return 4

    @property
    def regs(self) -> int:
        return self.maxnreg or 168

    @property
    def max_creg(self) -> int:
        """The most the consumer partitions can hold together: 12 warps x regs at launch, the
        producer warpgroup down to 40, the two consumer warpgroups share the rest."""
        return min(256, (3 * self.regs - 40) // 2 // 8 * 8)

    @property
    def consumer_regs(self) -> int:
        return self.creg or self.max_creg

    @property
    def epi_parts(self) -> int:
        if self.epi:
            return self.epi
        if (self.splits > 1 or self.stream) and self.mt == 128:
            return 4   # the split epilogue's reduction: 4 token slices keep the 128-token tile spill-free
        return 1 if self.mt * self.bn <= 128 * 64 else 4

    @property
    def rows(self) -> int:
        """Weight rows per program tile (both consumer warpgroups)."""
        return 2 * self.bn

    def short(self) -> str:
        s = f"p{self.mt}x{self.bn}x2c{self.nch}s{self.stages}"
        s += "pp" if self.pingpong else "co"
        s += "" if self.hold else "w0"
        s += f"g{self.group_n}" if self.group_n != 8 else ""
        s += f"r{self.maxnreg}" if self.maxnreg else ""
        s += f"e{self.epi}" if self.epi else ""
        s += f"c{self.creg}" if self.creg else ""
        return s + (f"k{self.splits}" if self.splits > 1 else "") + ("sk" if self.stream else "")

    def smem_bytes(self, kh: int, elem: int = 2, has_zeros: bool = False, group: int = 128) -> int:
        """Shared memory of the ring (codes + x + scales [+ offsets] of both warpgroups)."""
        ks = self.nch * 2 * kh
        gps = max(1, ks // group)
        per = self.rows * ks // 2 + self.mt * ks * elem + (2 if has_zeros else 1) * gps * self.rows * elem
        return self.stages * per + 1024


NAMED: Dict[str, GluonPrefillConfig] = {
    # 4 x 41 KB: 128 tokens x 128 rows per program, each warpgroup 64 x 128 (acc 64 registers)
    "prefill-128": GluonPrefillConfig(mt=128, bn=64, nch=1, stages=4),
    # 3 x 73 KB: 256 tokens (the widest wgmma), acc 128 registers per thread; A not held across chunks
    # 3 x 73 KB: 256 tokens (the widest wgmma) x 128 rows; accumulators [64, 256] (128 registers)
    "prefill-256": GluonPrefillConfig(mt=256, bn=64, nch=1, stages=3),
    # 3 x 49 KB: 128 tokens x 256 rows (128 per warpgroup: two m64 wgmmas per k step); the fewest
    # L2 bytes per MAC of the shipped tiles (85, vs 51 for prefill-128); 3 stages beat 4 (H200 sweep)
    "prefill-128x128": GluonPrefillConfig(mt=128, bn=128, nch=1, stages=3),
    # the cooperative variant of prefill-128 (no turn-taking between the warpgroups)
    "prefill-128-coop": GluonPrefillConfig(mt=128, bn=64, nch=1, stages=4, pingpong=False),
    # 4 x 33 KB: 64 tokens x 128 rows, 2 chunks per stage: the most tiles, for small M x N
    "prefill-64": GluonPrefillConfig(mt=64, bn=64, nch=2, stages=4),
}


# The K-split and stream-K configs (not among the tuner's candidates: on an H100 none beat the
# unsplit tiles at M = 128 and 256, BENCHMARKS.md), which the GPU tests and the prefill session
# still check and time.
SPLIT_CONFIGS: List[GluonPrefillConfig] = [
    GluonPrefillConfig(128, 64, 1, 4, pingpong=False, splits=2), GluonPrefillConfig(128, 64, 1, 4, splits=2),
    GluonPrefillConfig(128, 64, 1, 4, pingpong=False, splits=3), GluonPrefillConfig(128, 64, 1, 4, splits=3),
    GluonPrefillConfig(64, 64, 2, 4, splits=2), GluonPrefillConfig(64, 64, 2, 4, splits=4),
    GluonPrefillConfig(128, 64, 1, 4, stream=True), GluonPrefillConfig(128, 64, 1, 4, pingpong=False, stream=True),
    GluonPrefillConfig(64, 64, 2, 4, stream=True)]


def fits(cfg: GluonPrefillConfig, kh: int, has_zeros: bool, group: int) -> bool:
    return cfg.smem_bytes(kh, 2, has_zeros, group) <= SMEM_LIMIT


def prefill_heuristic(M: int, N: int, K: int, group: int, num_sms: int) -> GluonPrefillConfig:
    """The sweep's and the tuner's rule (H200, 2026-12-01): 128-row x 64-token tiles where even
    those make at most one wave (the tuned winner of 8B o / down at M = 128 and 256 and 70B o /
    down at M = 128: 19 against 26 us for 8B o at M = 256); else 256-row x 128-token tiles with a
    3-deep ring where they make >= 4 waves (70B gate_up from M = 1024: 0.96-1.07x cuBLAS fp16);
    else 128 x 256 tiles where they make >= 1.5 waves (70B down at M = 1024: 0.94x); else the
    cooperative 128 x 128 tile, which keeps small layers' SMs busy (8B qkv at M = 1024: 0.86x)."""
    if -(-N // 128) * -(-M // 64) <= num_sms:
        return NAMED["prefill-64"]
    if -(-N // 256) * -(-M // 128) >= 4 * num_sms:
        return NAMED["prefill-128x128"]
    if -(-N // 128) * -(-M // 256) >= 1.5 * num_sms:
        return NAMED["prefill-256"]
    return NAMED["prefill-128-coop"]


def prefill_candidates(M: int, N: int, K: int, group: int, num_sms: int, has_zeros: bool = True) -> List[GluonPrefillConfig]:
    """Configurations worth timing for this call: the heuristic's choice first, then tile shapes,
    ring depths and the two schedules (the sweep's set; each passed the GPU correctness matrix)."""
    kh = min(group, 64) if group < 64 else 64
    h = prefill_heuristic(M, N, K, group, num_sms)
    out = [h, GluonPrefillConfig(128, 64, 1, 4), GluonPrefillConfig(128, 64, 1, 5),
           GluonPrefillConfig(128, 64, 1, 4, pingpong=False), GluonPrefillConfig(128, 64, 1, 4, group_n=16),
           GluonPrefillConfig(256, 64, 1, 3), GluonPrefillConfig(256, 64, 1, 3, pingpong=False),
           GluonPrefillConfig(128, 128, 1, 4), GluonPrefillConfig(128, 128, 1, 4, pingpong=False),
           GluonPrefillConfig(128, 128, 1, 3), GluonPrefillConfig(64, 128, 1, 6), GluonPrefillConfig(64, 64, 2, 4)]
    if M <= 256 and -(-N // 128) * -(-M // 64) <= num_sms:
        # a grid that leaves SMs idle: K splits (H200 sweep of 2026-12-01: 8B down M = 128 33.8 us with
        # 64 x 64 rows in 2 splits against 54.5 unsplit, M = 256 53.0 against 58.5; 8B o M = 128 15.4
        # against 18.7)
        out += [GluonPrefillConfig(64, 64, 2, 4, splits=2), GluonPrefillConfig(64, 64, 2, 4, splits=4),
                GluonPrefillConfig(128, 64, 1, 4, splits=2),
                GluonPrefillConfig(128, 64, 1, 4, pingpong=False, splits=2),
                GluonPrefillConfig(128, 64, 1, 4, pingpong=False, splits=3)]
    seen, res = set(), []
    for c in out:
        if c not in seen and fits(c, kh, has_zeros, group):
            seen.add(c)
            res.append(c)
    return res
