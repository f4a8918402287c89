"""Every launch shape (``PackedTile``) of the grouped W4A16 MoE kernel over the experts' layout-2
copy (``w4a16.backends.triton.moe_packed``) on the ``w4a16 bench --moe`` presets, each projection alone (gate_up with its SiLU*up epilogue, down with the routing
weights), CUDA-graph timing over 8 rotating routings; checked against the reference first. Prints
one line per (preset, T, projection, tile) and the best tile of each against the heuristic's.

    python benchmarks/moe_tiles.py [--presets all] [--tokens 1,16,256,4096] [--dtype bf16] [--out DIR]
    python benchmarks/moe_tiles.py --check-only --dtype fp16 --tokens 16,512,4096   # correctness of every tile
"""
import argparse
import json
import os
import sys
import time

import torch

import w4a16
from w4a16.backends.selection import get
from w4a16.backends.triton import moe_packed as kernel
from w4a16.bench.ceilings import measure_copy_bandwidth
from w4a16.bench.moe import PRESETS, random_experts
from w4a16.measure import GraphTimer, rel_error
from w4a16.moe import reference
from w4a16.moe.ops import block_m_for
from w4a16.moe.routing import align, direct

ROUTINGS = 8


def candidates(block_m: int) -> list:
    """The tiles tried for a block size (those the heuristic picks among them; the ones the kernel
    refuses, ``moe_packed.tile_refusal``, are left out by the caller)."""
    T = kernel.PackedTile
    if block_m <= 16:
        return ([T(bn, True, after, bn // 16, st) for bn in (16, 32, 64, 128) for after in (True, False)
                 for st in (1, 3)]
                + [T(bn, True, True, bn // 16, st) for bn in (64, 128) for st in (2, 4, 5, 6)]
                + [T(bn, False, False, 4, 1) for bn in (32, 64, 128)])
    return [T(bn, swap, after, w, st) for bn in (64, 128) for swap, after in ((True, False), (False, False), (True, True))
            for w in (4, 8) for st in (3, 4)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", default="all")
    ap.add_argument("--tokens", default="1,16,256,4096")
    ap.add_argument("--dtype", default="bf16", choices=("fp16", "bf16"))
    ap.add_argument("--out", default=None)
    ap.add_argument("--check-only", action="store_true", help="check every tile against the reference, no timing")
    ap.add_argument("--limit-s", type=float, default=1e9, help="stop starting new shapes after this many seconds")
    a = ap.parse_args()
    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float16
    presets = list(PRESETS) if a.presets == "all" else a.presets.split(",")
    tokens = [int(t) for t in a.tokens.split(",")]
    bw = measure_copy_bandwidth("cuda")[0]
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, w4a16 {w4a16.__version__}, "
          f"copy {bw / 1e12:.2f} TB/s, {a.dtype}, g128 symmetric", flush=True)
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows, t0 = [], time.time()
    for preset in presets:
        H, I, E, k = PRESETS[preset]
        gu = random_experts(E, 2 * I, H, 128, dtype, "cuda", gen)
        dn = random_experts(E, H, I, 128, dtype, "cuda", gen)
        for T in tokens:
            if time.time() - t0 > a.limit_s:
                print("time limit: stopping", flush=True)
                break
            S = T * k
            bm = block_m_for(S, E)
            ids = [torch.stack([torch.randperm(E, device="cuda", generator=gen)[:k] for _ in range(T)])
                   for _ in range(ROUTINGS)]
            routes = [direct(i) if T == 1 else align(i, E, bm) for i in ids]   # as w4a16.moe routes
            x = torch.randn(T, H, device="cuda", generator=gen).to(dtype)
            acts = torch.randn(S, I, device="cuda", generator=gen).to(dtype)
            tw = torch.rand(S, device="cuda", generator=gen)
            touched = sum(torch.unique(i).numel() for i in ids) / ROUTINGS
            ref_h = reference.silu_mul(reference.grouped_gemm(x, gu, ids[0]).to(dtype))
            ref_y = reference.grouped_gemm(acts, dn, ids[0], False, tw.reshape(T, k))
            heur = {}
            for proj, w, n_out in (("gate_up", gu, I), ("down", dn, H)):
                out = torch.empty(S, n_out, dtype=dtype if proj == "gate_up" else torch.float32, device="cuda")
                nbytes = touched * w.nbytes() / E
                pw = w.weight.prepared(get("triton"))
                heur[proj] = kernel.launch_plan(routes[0], n_out, pw.K_pad // pw.kc, E, x.device, proj == "gate_up")[0]
                tiles = {t for t in candidates(bm) if kernel.tile_refusal(t, bm, proj == "gate_up") is None}
                for tile in sorted(tiles | {heur[proj]}):
                    def call(r, tile=tile, proj=proj, pw=pw, out=out):
                        if proj == "gate_up":
                            return kernel.grouped_gemm(x, pw, E, r, k, True, out, silu_mul=True, tile=tile)
                        return kernel.grouped_gemm(acts, pw, E, r, k, False, out, tw, tile=tile)
                    try:
                        got = call(routes[0]).clone()
                        err = rel_error(got, ref_h if proj == "gate_up" else ref_y)
                        us = (float("nan") if a.check_only else
                              GraphTimer().measure([lambda r=r: call(r) for r in routes]).median_us)
                    except Exception as e:   # a tile that does not fit (shared memory) is reported
                        print(f"{preset} T={T} {proj} {tuple(tile)} failed: {type(e).__name__}: {str(e)[:120]}")
                        continue
                    row = dict(preset=preset, T=T, proj=proj, block_m=bm, tile=list(tile), us=us, rel_err=err,
                               frac_copy=nbytes / (us * 1e-6) / bw, heuristic=tile == heur[proj])
                    rows.append(row)
                    print(f"{preset:16s} T={T:5d} {proj:7s} bm={bm:3d} {tuple(tile)} {us:9.2f} us "
                          f"{row['frac_copy']:.2f} of copy err {err:.1e}{'  <- heuristic' if row['heuristic'] else ''}",
                          flush=True)
            for proj in ("gate_up", "down"):
                mine = [r for r in rows if (r["preset"], r["T"], r["proj"]) == (preset, T, proj)]
                if mine:
                    if a.check_only:
                        continue
                    best = min(mine, key=lambda r: r["us"])
                    h = [r for r in mine if r["heuristic"]]
                    print(f"BEST {preset} T={T} {proj}: {tuple(best['tile'])} {best['us']:.2f} us "
                          f"({best['frac_copy']:.2f} of copy); heuristic "
                          f"{(h[0]['us'] / best['us']) if h else float('nan'):.3f}x the best", flush=True)
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, "moe_tiles.json"), "w") as f:
            json.dump(dict(copy_tb_s=bw / 1e12, rows=rows), f, indent=1)
    bad = [r for r in rows if not r["rel_err"] < 2e-2]
    for r in bad:
        print("WRONG", r)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
