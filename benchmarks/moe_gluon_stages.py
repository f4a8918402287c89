"""The Gluon MoE decode kernel's ring depth and gate_up K ranges, timed: one token's expert layer
on the ``w4a16 bench --moe`` presets with 3, 4, 6 and 8 stages for both launches, or gate_up:down
pairs such as 8:4 (``backends.gluon.moe.launch``'s configs), each with the gate_up launch's K split
in the given numbers of ranges ("auto": ``gate_up_splits``'s rule), against the same layer on the
Triton kernels, each checked against the reference first. CUDA-graph replay over 8 routings, as
``w4a16 bench --moe`` times it.

    PYTHONPATH=src python3 benchmarks/moe_gluon_stages.py [--dtype bf16] [--presets all] [--stages 3,4,6,8]
        [--gate-up-splits auto,1,2]
"""
import argparse
import dataclasses

import torch

from w4a16.backends.gluon.moe import launch
from w4a16.bench import ceilings
from w4a16.bench.moe import PRESETS, ROUTINGS, random_experts
from w4a16.measure import TOLERANCE, GraphTimer, rel_error
from w4a16.moe import fused_moe, reference


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dtype", default="bf16", choices=("fp16", "bf16"))
    p.add_argument("--presets", default="all")
    p.add_argument("--stages", default="3,4,6,8", help="ring depths, both launches (8) or gate_up:down (8:4)")
    p.add_argument("--gate-up-splits", default="auto", help="gate_up K ranges (auto: the launch's rule)")
    a = p.parse_args()
    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float16
    presets = tuple(PRESETS) if a.presets == "all" else tuple(a.presets.split(","))
    dev = torch.device("cuda")
    bw = ceilings.measure_copy_bandwidth(dev)[0]
    print(f"{torch.cuda.get_device_name()}, copy {bw / 1e12:.2f} TB/s, {a.dtype}, T = 1")
    gen = torch.Generator().manual_seed(0)
    wgen = torch.Generator(device=dev).manual_seed(0)
    base_gu, base_dn, base_splits = launch.GATE_UP_CONFIG, launch.DOWN_CONFIG, launch.GATE_UP_SPLITS
    print("| preset | kernel | stages | gate_up K ranges | us | of copy |\n|---|---|---:|---:|---:|---:|")
    for name in presets:
        H, I, E, k = PRESETS[name]
        gu, dn = random_experts(E, 2 * I, H, 128, dtype, dev, wgen), random_experts(E, H, I, 128, dtype, dev, wgen)
        x = torch.randn(1, H, generator=gen).to(dev, dtype)
        routes = [(torch.rand(1, E, generator=gen).topk(k, dim=1).indices.to(dev),
                   torch.softmax(torch.randn(1, k, generator=gen), 1).to(dev)) for _ in range(ROUTINGS)]
        nbytes = k * (gu.nbytes() + dn.nbytes()) / E
        ref = reference.fused_moe(x, gu, dn, *routes[0])
        runs = [("triton", None, None)] + [("gluon", s, sp) for s in a.stages.split(",")
                                             for sp in a.gate_up_splits.split(",")]
        for backend, stages, splits in runs:
            if stages:
                gu_st, dn_st = (stages.split(":") * 2)[:2]
                launch.GATE_UP_CONFIG = dataclasses.replace(base_gu, stages=int(gu_st))
                launch.DOWN_CONFIG = dataclasses.replace(base_dn, stages=int(dn_st))
                launch.GATE_UP_SPLITS = None if splits == "auto" else int(splits)
                splits = launch.gate_up_splits(H, I, k, dev)[1]
            calls = [lambda r=r, b=backend: fused_moe(x, gu, dn, *r, backend=b) for r in routes]
            err = rel_error(calls[0](), ref)
            row = f"| {name} | {backend} | {stages or '-'} | {splits or '-'} |"
            if not err <= TOLERANCE[dtype]:
                print(f"{row} WRONG (relative error {err:.3g}) | |")
                continue
            us = GraphTimer().measure(calls, nbytes=nbytes).median_us
            print(f"{row} {us:.1f} | {nbytes / (us * 1e-6) / bw:.2f} |")
        launch.GATE_UP_CONFIG, launch.DOWN_CONFIG, launch.GATE_UP_SPLITS = base_gu, base_dn, base_splits
        gu = dn = calls = None   # free the experts before the next preset
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
