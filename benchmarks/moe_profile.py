"""Where a fused MoE layer's time goes: device microseconds per kernel of one ``w4a16.moe.fused_moe``
call (torch.profiler over eager calls, the kernels a captured graph replays), per preset and T.

    python benchmarks/moe_profile.py [--presets qwen3-30b-a3b,deepseek-v3] [--tokens 1,16] [--dtype bf16]
"""
import argparse
import collections

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from w4a16.bench.moe import PRESETS, random_experts
from w4a16.moe import fused_moe

ITERS = 10


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", default="qwen3-30b-a3b,deepseek-v3")
    ap.add_argument("--tokens", default="1,16")
    ap.add_argument("--dtype", default="bf16", choices=("fp16", "bf16"))
    a = ap.parse_args()
    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float16
    gen = torch.Generator(device="cuda").manual_seed(0)
    print(torch.cuda.get_device_name(), torch.__version__, a.dtype)
    for preset in a.presets.split(","):
        H, I, E, k = PRESETS[preset]
        gu = random_experts(E, 2 * I, H, 128, dtype, "cuda", gen)
        dn = random_experts(E, H, I, 128, dtype, "cuda", gen)
        for T in (int(t) for t in a.tokens.split(",")):
            x = torch.randn(T, H, device="cuda", generator=gen).to(dtype)
            ids = [torch.stack([torch.randperm(E, device="cuda", generator=gen)[:k] for _ in range(T)])
                   for _ in range(ITERS)]
            w = torch.softmax(torch.randn(T, k, device="cuda", generator=gen), -1)
            fused_moe(x, gu, dn, ids[0], w)
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for i in range(ITERS):
                    fused_moe(x, gu, dn, ids[i], w)
                torch.cuda.synchronize()
            per = collections.defaultdict(float)
            for e in prof.events():
                if e.device_type == DeviceType.CUDA:
                    per[e.name[:60]] += e.device_time_total / ITERS
            total = sum(per.values())
            print(f"{preset} T={T}: {total:.1f} us of kernels per call: "
                  + "; ".join(f"{n} {v:.1f}" for n, v in sorted(per.items(), key=lambda kv: -kv[1])), flush=True)
    del gu, dn


if __name__ == "__main__":
    main()
