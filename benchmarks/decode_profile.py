"""Profile the Gluon decode kernel on one layer: occupancy from the CUDA driver, and a few launches
for Nsight Compute to read (run under ``ncu``; see --help).

    PYTHONPATH=src python3 benchmarks/decode_profile.py --layer "70B gate_up" --M 1 --configs g8x64c2s4ws,g8x64c2s4wssk
    ncu --kernel-name regex:w4a16_decode --launch-skip 4 --launch-count 2 --section SpeedOfLight ... \\
        python3 benchmarks/decode_profile.py ...

Each config is launched 3 times to warm up, then 3 more (the profiled ones with --launch-skip 4).
"""
from __future__ import annotations

import argparse
import ctypes
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from w4a16.bench.shapes import preset_layers  # noqa: E402
from w4a16.backends.gluon.decode.config import GluonDecodeConfig  # noqa: E402
from w4a16.backends.gluon.decode.launch import plan_for, run_decode  # noqa: E402
from w4a16.backends.gluon.host import STATE  # noqa: E402
from w4a16.backends.gluon.layout import prepare_weight  # noqa: E402
from w4a16.measure import random_weight  # noqa: E402


def driver_occupancy(function: int, threads: int, smem: int) -> int:
    """cuOccupancyMaxActiveBlocksPerMultiprocessor for a loaded kernel."""
    cuda = ctypes.CDLL("libcuda.so.1")
    n = ctypes.c_int(0)
    rc = cuda.cuOccupancyMaxActiveBlocksPerMultiprocessor(ctypes.byref(n), ctypes.c_void_p(function),
                                                          ctypes.c_int(threads), ctypes.c_size_t(smem))
    return n.value if rc == 0 else -rc


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layer", default="70B gate_up")
    ap.add_argument("--M", type=int, default=1)
    ap.add_argument("--configs", default="g8x64c2s4ws,g8x64c2s4wssk")
    a = ap.parse_args()
    N, K = preset_layers()[a.layer]
    w = random_weight(N, K, 128, None, torch.float16, "cuda", torch.Generator("cuda").manual_seed(0))
    pw = prepare_weight(w)
    x = torch.randn(a.M, K, dtype=torch.float16, device="cuda")
    for short in a.configs.split(","):
        cfg = GluonDecodeConfig.from_short(short)
        for _ in range(6):
            run_decode(x, pw, None, 1.0, cfg)
        torch.cuda.synchronize()
        compiled, grid = STATE.last
        plan = plan_for(pw, a.M, cfg, True)
        md = compiled.metadata
        occ = driver_occupancy(compiled.function, md.num_warps * 32, md.shared)
        print(f"{a.layer} M={a.M} {short}: grid {tuple(grid)} split_mode {plan.split_mode} num_warps {md.num_warps} "
              f"regs {compiled.n_regs} shared {md.shared} model resident {cfg.resident(pw.kh)} "
              f"driver occupancy {occ} per SM", flush=True)


if __name__ == "__main__":
    main()
