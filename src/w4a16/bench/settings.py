"""The settings of one ``w4a16 bench`` run, resolved and validated from the command line."""
from __future__ import annotations

from dataclasses import dataclass

from .. import spec
from ..errors import expect
from . import peers as peers_mod
from . import shapes as sh

TIMINGS = ("graph", "eager", "both")


@dataclass(frozen=True)
class Settings:
    """Everything that decides what a run measures and where it writes.

    shapes: layers (presets then --shape), ms: M values, dtypes: activation dtypes,
    group_sizes, zeros (asymmetric weights), peers: peer names (ignored with ``configs``),
    timing: "graph" | "eager" | "both", configs: time every named config, out: output folder,
    fake_timer: made-up times on the CPU (tests), seed: random data seed.
    """

    presets: tuple
    shapes: tuple
    ms: tuple
    dtypes: tuple
    group_sizes: tuple
    zeros: bool
    peers: tuple
    timing: str
    configs: bool
    quick: bool
    fake_timer: bool
    seed: int
    out: str

    @classmethod
    def from_args(cls, args) -> "Settings":
        """From the argparse namespace of the ``bench`` sub-command; raises W4A16Error on a bad value."""
        custom = tuple(sh.parse_shape(s) for s in (args.shape or ()))
        if args.preset:
            presets = tuple(dict.fromkeys(args.preset))
        elif args.quick:
            presets = (sh.QUICK_PRESET,)
        else:
            presets = () if custom else tuple(sh.PRESETS)
        shapes = sh.preset_shapes(presets) + tuple(s for s in custom if s not in sh.preset_shapes(presets))
        expect(len(shapes) > 0, "--preset/--shape", "at least one layer", "none")
        ms = sh.parse_m(args.m) if args.m else (sh.QUICK_M if args.quick else sh.DEFAULT_M)
        dtypes = sh.parse_dtypes(args.dtype)
        group_sizes = sh.parse_group_sizes(args.group_size)
        for s in shapes:
            for g in group_sizes:
                spec.check_group_size(g, s.K, arg=f"--group-size (layer {s.label}, K={s.K})")
        names = tuple(dict.fromkeys(p.strip() for p in args.peers.split(",") if p.strip()))
        expect(len(names) > 0, "--peers", f"a comma-separated list of {peers_mod.PEER_NAMES}", repr(args.peers))
        forced = tuple(f"w4a16-{b}" for b in peers_mod.BACKEND_NAMES)
        for n in names:
            expect(n in peers_mod.PEER_NAMES or n in forced, "--peers",
                   f"names from {peers_mod.PEER_NAMES} or a forced backend {forced}", repr(n))
        expect(args.timing in TIMINGS, "--timing", f"one of {TIMINGS}", repr(args.timing))
        return cls(presets=presets, shapes=shapes, ms=ms, dtypes=dtypes, group_sizes=group_sizes,
                   zeros=bool(args.zeros), peers=names, timing=args.timing, configs=bool(args.configs),
                   quick=bool(args.quick), fake_timer=bool(args.fake_timer), seed=int(args.seed), out=args.out)

    def as_dict(self) -> dict:
        """JSON-friendly form for the report header."""
        return {
            "presets": list(self.presets),
            "shapes": [{"layer": s.label, "N": s.N, "K": s.K} for s in self.shapes],
            "m": list(self.ms),
            "dtypes": [spec.dtype_name(d) for d in self.dtypes],
            "group_sizes": list(self.group_sizes),
            "zeros": self.zeros,
            "peers": list(self.peers),
            "timing": self.timing,
            "configs": self.configs,
            "quick": self.quick,
            "fake_timer": self.fake_timer,
            "seed": self.seed,
            "out": self.out,
        }
