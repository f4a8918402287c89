"""Where a quantized model's long prompt turns NaN or Inf: the first module whose output is not
finite (forward hooks over one prefill), that module run again on the same inputs with its
dequantized weights, and the MoE layer op alone on the model's expert shapes at prefill sizes
against the reference.

    python benchmarks/nonfinite_probe.py --model qwen3-30b-a3b --layers 2 --tokens 2048 --dtype fp16
"""
import argparse

import torch

from w4a16 import quantize_model
from w4a16.e2e.speed import DTYPES, build_model, dequantized_weights, model_config, model_dims
from w4a16.measure import rel_error
from w4a16.bench.moe import random_experts
from w4a16.moe import fused_moe, reference


def _tensors(v):
    if isinstance(v, torch.Tensor):
        return [v]
    if isinstance(v, (tuple, list)):
        return [t for x in v for t in _tensors(x)]
    return []


def first_nonfinite(model, ids):
    """(name, module, args, kwargs) of the first module (in call order) whose output holds NaN or
    Inf during ``model.model(ids)``, or None."""
    found = []

    def hook(name):
        def fn(mod, args, kwargs, out):
            if not found and any(not bool(torch.isfinite(t).all()) for t in _tensors(out) if t.is_floating_point()):
                found.append((name, mod, [a.clone() if isinstance(a, torch.Tensor) else a for a in args],
                              {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}))
        return fn

    handles = [m.register_forward_hook(hook(n), with_kwargs=True) for n, m in model.named_modules() if n]
    try:
        with torch.no_grad():
            model.model(input_ids=ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return found[0] if found else None


def describe(t):
    t = t.float()
    fin = torch.isfinite(t)
    return (f"shape {tuple(t.shape)}, {int((~fin).sum())} non-finite, "
            f"max |finite| {float(t[fin].abs().max()) if fin.any() else float('nan'):.4g}")


def moe_op_check(H, I, E, k, dtype, tokens):
    """fused_moe against the reference on random experts of the model's shape, T in ``tokens``."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    gu = random_experts(E, 2 * I, H, 128, dtype, "cuda", gen)
    dn = random_experts(E, H, I, 128, dtype, "cuda", gen)
    for T in tokens:
        x = torch.randn(T, H, device="cuda", generator=gen).to(dtype)
        ids = torch.stack([torch.randperm(E, device="cuda", generator=gen)[:k] for _ in range(T)])
        w = torch.softmax(torch.randn(T, k, device="cuda", generator=gen), -1)
        y = fused_moe(x, gu, dn, ids, w)
        ref = reference.fused_moe(x, gu, dn, ids, w)
        bad = (~torch.isfinite(y)).any(1).nonzero().flatten()
        print(f"fused_moe {dtype} T={T}: rel err {rel_error(y, ref):.3g}, non-finite rows {len(bad)} "
              f"{bad[:8].tolist()}", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="qwen3-30b-a3b")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--dtype", default="fp16", choices=tuple(DTYPES))
    ap.add_argument("--op-tokens", default="512,2048,4096")
    ap.add_argument("--op-only", action="store_true", help="only the MoE layer op against the reference")
    a = ap.parse_args()
    dtype = DTYPES[a.dtype]
    dims = model_dims(a.model, a.layers)
    config = model_config(a.model, dims)
    print(torch.cuda.get_device_name(), torch.__version__, a.model, a.layers, "layers", a.dtype, flush=True)
    if "num_experts" in dims:
        moe_op_check(dims["hidden_size"], dims["moe_intermediate_size"], dims["num_experts"],
                     dims["num_experts_per_tok"], dtype, [int(t) for t in a.op_tokens.split(",")])
    if a.op_only:
        return
    model = build_model(config, "cuda", dtype)
    ids = torch.randint(0, config.vocab_size, (1, a.tokens), generator=torch.Generator().manual_seed(1)).cuda()
    print("16-bit model:", first_nonfinite(model, ids) is None and "finite" or "NOT finite", flush=True)
    print(quantize_model(model, group_size=128, skip=("lm_head",), dtype=dtype, progress=False), flush=True)
    hit = first_nonfinite(model, ids)
    if hit is None:
        print("quantized model: every module's output finite", flush=True)
        return
    name, mod, args, kwargs = hit
    print(f"first non-finite output: {name} ({type(mod).__name__})", flush=True)
    for i, t in enumerate(_tensors(args) + _tensors(list(kwargs.values()))):
        print(f"  input {i}: {describe(t)}")
    with torch.no_grad():
        out = _tensors(mod(*args, **kwargs))
        with dequantized_weights(model):
            deq = _tensors(mod(*args, **kwargs))
    for i, (o, d) in enumerate(zip(out, deq)):
        print(f"  output {i}: kernel {describe(o)}; dequantized {describe(d)}")
        fin = torch.isfinite(o) & torch.isfinite(d)
        if fin.any():
            print(f"    rel err on finite elements {rel_error(o[fin], d[fin]):.3g}")
        rows = (~torch.isfinite(o.float())).reshape(-1, o.shape[-1]).any(1).nonzero().flatten()
        print(f"    non-finite rows {len(rows)}: {rows[:16].tolist()}", flush=True)


if __name__ == "__main__":
    main()
