"""The smallest warp-specialized Gluon kernel (two partitions that each store to their own part of
a global buffer, no shared memory of their own), run once: for compute-sanitizer's racecheck, to
tell hazards of Triton's warp-specialize lowering from hazards in the w4a16 kernels.

    compute-sanitizer --tool racecheck python benchmarks/racecheck_probe.py
"""
import sys

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl


@gluon.jit
def _main_part(out_ptr):
    offs = gl.arange(0, 128, layout=gl.BlockedLayout([1], [32], [4], [0]))
    gl.store(out_ptr + offs, offs + 1)


@gluon.jit
def _worker_part(out_ptr):
    offs = gl.arange(0, 32, layout=gl.BlockedLayout([1], [32], [1], [0]))
    gl.store(out_ptr + 128 + offs, offs + 1000)


@gluon.jit
def ws_probe_kernel(out_ptr):
    gl.warp_specialize([(_main_part, (out_ptr,)), (_worker_part, (out_ptr,))], [1], [40])


def main() -> int:
    out = torch.zeros(160, dtype=torch.int32, device="cuda")
    ws_probe_kernel[(2,)](out, num_warps=4, maxnreg=80)   # the register budget of the decode kernel
    torch.cuda.synchronize()
    want = torch.cat([torch.arange(1, 129), torch.arange(1000, 1032)]).to(out)
    ok = torch.equal(out, want)
    print(f"warp-specialize probe: {'correct' if ok else 'WRONG'}", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
