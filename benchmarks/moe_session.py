"""The MoE layer on a GPU: w4a16.moe.fused_moe (the Triton grouped kernel) against the 16-bit layer
of torch on the same shapes, and the GPU tests of w4a16.moe.

For each model shape and token count T: random routings (8 of them, rotated between calls, so
that the touched experts change from call to call and do not stay in L2), the w4a16 layer and the
torch layer each captured in a CUDA graph and timed by replays (w4a16.measure.GraphTimer). The
torch layer is ``torch._grouped_mm`` over the slots sorted by expert where this torch has it
(bf16 weights [E, K, N]), else a per-expert loop timed eagerly; the log says which. "of copy" is
the int4 bytes of the experts the call touches (codes and scales, both GEMMs) over the measured
time, against the copy bandwidth measured in the same run.

    PYTHONPATH=src python3 benchmarks/moe_session.py --out $OUT [--tokens 1 16 64 256 4096] [--tests]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from session_log import SessionLog  # noqa: E402

from w4a16.bench.ceilings import measure_copy_bandwidth  # noqa: E402
from w4a16.measure import GraphTimer  # noqa: E402
from w4a16.moe import QuantizedExperts, fused_moe  # noqa: E402

SHAPES = {   # H, I (per expert), E, top-k
    "Qwen3-30B-A3B": (2048, 768, 128, 8),
    "Qwen3-235B-A22B": (4096, 1536, 128, 8),
    "Mixtral-8x7B": (4096, 14336, 8, 2),
    "DeepSeek-V3": (7168, 2048, 256, 8),
}
log = SessionLog()


def random_experts(E, N, K, dtype, g=128):
    q = torch.randint(0, 256, (E, N, K // 2), dtype=torch.uint8, device="cuda")
    s = (torch.rand(E, N, K // g, device="cuda") * 0.02 + 0.005).to(dtype)
    return QuantizedExperts(q, s, None, g)


def routings(T, E, k, n=8):
    gen = torch.Generator(device="cuda").manual_seed(T)
    out = []
    for _ in range(n):
        ids = torch.rand(T, E, device="cuda", generator=gen).topk(k, dim=1).indices
        w = torch.softmax(torch.randn(T, k, device="cuda", generator=gen), 1)
        out.append((ids, w))
    return out


def touched_bytes(ids, gu, dn):
    """int4 codes and scales of the experts the routing touches, both projections."""
    used = torch.unique(ids).numel()
    per = sum(w.nbytes() / w.shape[0] for w in (gu, dn))
    return used * per


def torch_layer(x, w_gu, w_dn, ids, tw):
    """16-bit MoE layer with torch._grouped_mm: w_gu [E, H, 2I], w_dn [E, I, H] (K-major)."""
    T, k = ids.shape
    E = w_gu.shape[0]
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.zeros(E, dtype=torch.int32, device=x.device).scatter_add_(0, flat, torch.ones_like(flat, dtype=torch.int32))
    offs = torch.cumsum(counts, 0, dtype=torch.int32)
    xs = x[order // k]
    h = torch._grouped_mm(xs, w_gu, offs=offs)
    I = h.shape[1] // 2
    a = (torch.nn.functional.silu(h[:, :I].float()) * h[:, I:].float()).to(x.dtype)
    y = torch._grouped_mm(a, w_dn, offs=offs).float() * tw.reshape(-1)[order, None]
    out = torch.zeros(T, x.shape[1], dtype=torch.float32, device=x.device)
    out.index_add_(0, order // k, y)
    return out.to(x.dtype)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="/tmp/moe_session")
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 64, 256, 4096])
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--dtype", choices=["fp16", "bf16"], default="bf16")
    args = ap.parse_args()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    log.open(Path(args.out) / "moe_session.log")
    import triton

    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    log(f"env: {torch.cuda.get_device_name()} torch {torch.__version__} triton {triton.__version__} {args.dtype}")
    bw = measure_copy_bandwidth(torch.device("cuda"))[0]
    log(f"copy bandwidth {bw / 1e12:.2f} TB/s; torch layer: "
        f"{'torch._grouped_mm' if hasattr(torch, '_grouped_mm') else 'missing'}")
    timer = GraphTimer(max_calls=20, budget_ms=60.0, max_repeats=5)
    log("shape                T   w4a16 us  torch us  speedup  of copy")
    for name in args.shapes:
        H, I, E, k = SHAPES[name]
        gu, dn = random_experts(E, 2 * I, H, dtype), random_experts(E, H, I, dtype)
        w_gu = torch.randn(E, H, 2 * I, device="cuda", dtype=dtype) * 0.02
        w_dn = torch.randn(E, I, H, device="cuda", dtype=dtype) * 0.02
        for T in args.tokens:
            x = torch.randn(T, H, device="cuda", dtype=dtype)
            rs = routings(T, E, k)
            ours = timer.measure([lambda r=r: fused_moe(x, gu, dn, *r) for r in rs]).median_us
            try:
                theirs = timer.measure([lambda r=r: torch_layer(x, w_gu, w_dn, *r) for r in rs]).median_us
            except Exception as e:   # an old torch or an unsupported dtype
                log(f"torch layer failed: {type(e).__name__}: {str(e)[:200]}")
                theirs = float("nan")
            frac = sum(touched_bytes(r[0], gu, dn) for r in rs) / len(rs) / (ours * 1e-6) / bw
            log(f"{name:18s} {T:5d} {ours:10.1f} {theirs:9.1f} {theirs / ours:8.2f} {frac:8.2f}")
        gu = dn = w_gu = w_dn = None   # free this shape's weights before the next one
        torch.cuda.empty_cache()
    log("done")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
