"""The one-kernel decode attention (``w4a16.fused_attention``) against the operations it replaces, on a
GPU: for one decode token, transformers' way (rotary embedding of q and k in torch, the two
``index_copy_`` writes into the static cache, the position bump, and SDPA on the cache's grouped
heads with the step's mask, as ``w4a16.attention.packed_gqa_sdpa`` runs it) against one
``decode_attention`` call, CUDA-graph replay. Both reset the cache position before each call (one
small kernel each), so every call attends over the same number of slots.

    python benchmarks/attention_bench.py [--batches 1,16,64] [--contexts 64,512,4096,16384] [--dtype fp16]
        [--out DIR]

Heads: Llama-3-8B (32 query, 8 key/value, 128 wide) and Qwen3-30B-A3B (32 / 4, with its per-head q/k
RMSNorms). Prints a table and writes attention_bench.csv under --out.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from w4a16.fused_attention import decode_attention, decode_attention_reference
from w4a16.measure import GraphTimer, rel_error
from session_log import write_rows

MODELS = {"llama3-8b": (32, 8, 128, False), "qwen3-30b-a3b": (32, 4, 128, True)}


def _rope(x, cos, sin):
    """transformers' apply_rotary_pos_emb on x [B, H, 1, D] with cos, sin [B, D] (in x's dtype)."""
    half = x.shape[-1] // 2
    rot = torch.cat((-x[..., half:], x[..., :half]), -1)
    return x * cos[:, None, None] + rot * sin[:, None, None]


def _head_norm(x, w, eps=1e-6):
    """Qwen3's per-head RMSNorm on x [B, H, 1, D]."""
    x32 = x.float()
    return w * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _problem(B, Hq, Hkv, D, ctx, norm, dtype, gen):
    S = ctx + 64
    r = lambda *s: torch.randn(*s, generator=gen).to("cuda", dtype)  # noqa: E731
    angle = torch.rand(B, D // 2, generator=gen) * 6
    cos, sin = (torch.cat([f(angle)] * 2, -1).to("cuda", dtype) for f in (torch.cos, torch.sin))
    norms = dict(q_norm=(1 + r(D) / 4), k_norm=(1 + r(D) / 4)) if norm else {}
    mask = (torch.arange(S) <= ctx).to("cuda").expand(B, S)
    return dict(q=r(B, Hq * D), k=r(B, Hkv * D), v=r(B, Hkv * D), cos=cos, sin=sin, keys=r(B, Hkv, S, D),
                values=r(B, Hkv, S, D), length=torch.tensor(ctx, device="cuda"), mask=mask, norms=norms)


def main(argv=None) -> list:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", default="1,16,64")
    p.add_argument("--contexts", default="64,512,4096,16384", help="the new token's slot (filled slots before it)")
    p.add_argument("--dtype", choices=("fp16", "bf16"), default="fp16")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    dtype = torch.float16 if a.dtype == "fp16" else torch.bfloat16
    gen = torch.Generator().manual_seed(0)
    timer = GraphTimer()
    rows = []
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {__import__('triton').__version__}, "
          f"{a.dtype}")
    print(f"{'heads':<14} {'B':>3} {'slots':>6} {'fused us':>9} {'torch us':>9} {'ratio':>6}")
    for model, (Hq, Hkv, D, norm) in MODELS.items():
        for B in (int(b) for b in a.batches.split(",")):
            for ctx in (int(c) for c in a.contexts.split(",")):
                t = _problem(B, Hq, Hkv, D, ctx, norm, dtype, gen)
                G, n = Hq // Hkv, t["norms"]
                pos = torch.tensor(ctx, device="cuda")

                def fused(t=t, n=n, pos=pos):
                    t["length"].copy_(pos)
                    return decode_attention(t["q"], t["k"], t["v"], t["cos"], t["sin"], t["keys"], t["values"],
                                            t["length"], t["mask"], D ** -0.5, **n)

                def unfused(t=t, n=n, pos=pos, B=B):
                    t["length"].copy_(pos)
                    q, k = t["q"].view(B, Hq, 1, D), t["k"].view(B, Hkv, 1, D)
                    if n:
                        q, k = _head_norm(q, n["q_norm"]), _head_norm(k, n["k_norm"])
                    q, k = _rope(q, t["cos"], t["sin"]), _rope(k, t["cos"], t["sin"])
                    idx = t["length"].view(1)
                    t["keys"].index_copy_(2, idx, k)
                    t["values"].index_copy_(2, idx, t["v"].view(B, Hkv, 1, D))
                    t["length"].add_(1)
                    out = F.scaled_dot_product_attention(q.reshape(B, Hkv, G, D), t["keys"], t["values"],
                                                         attn_mask=t["mask"][:, None, None, :], scale=D ** -0.5)
                    return out.reshape(B, Hq * D)

                ref = decode_attention_reference(t["q"], t["k"], t["v"], t["cos"], t["sin"], t["keys"].clone(),
                                                 t["values"].clone(), pos.clone(), t["mask"], D ** -0.5,
                                                 n.get("q_norm"), n.get("k_norm"), (1e-6, 1e-6)).float()
                err = rel_error(fused().float(), ref)
                for what, e in (("fused", err), ("torch", rel_error(unfused().float(), ref))):
                    if e > 1e-2:
                        raise RuntimeError(f"{model} B={B} slots={ctx}: the {what} path is off the reference "
                                           f"(relative error {e:.3g})")
                tf, tu = timer.measure([fused]).median_us, timer.measure([unfused]).median_us
                rows.append(dict(heads=model, batch=B, slots=ctx, dtype=a.dtype, fused_us=round(tf, 2),
                                 torch_us=round(tu, 2), ratio=round(tu / tf, 3), rel_err=f"{err:.2e}"))
                print(f"{model:<14} {B:>3} {ctx:>6} {tf:>9.2f} {tu:>9.2f} {tu / tf:>5.2f}x", flush=True)
                del t
    if a.out:
        write_rows(rows, a.out, "attention_bench.csv")
    return rows


if __name__ == "__main__":
    main()
