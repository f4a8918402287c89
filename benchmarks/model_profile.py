"""Where a whole model's time goes, kernel by kernel: device microseconds and launches per kernel name
(torch.profiler) of one prefill forward over [1, T] tokens (eager, as ``w4a16.e2e.speed`` times
prefill) or of one decode step at a batch size (``w4a16.e2e.decoder.StaticDecoder``, optionally
through torch.compile, the kernels its CUDA graph replays), for the 16-bit model and then the same
model quantized (``quantize_model``, lm_head kept 16-bit unless --lm-head-int4; --fuse-layers: the
decoder layers' epilogues fused, ``w4a16.fused_layer``), side by side.

    python benchmarks/model_profile.py prefill [--model qwen3-30b-a3b] [--layers 8] [--tokens 2048] [--dtype bf16]
    python benchmarks/model_profile.py decode --model llama3-8b --layers 8 --batches 1,16 --compile --fuse-layers
        [--attention packed-gqa] [--fused-routers]
"""
import argparse
import collections

import torch

from w4a16.e2e.decoder import StaticDecoder
from w4a16.e2e.speed import ATTENTIONS, DTYPES, build_model, kernel_kinds, kernel_table, model_config, model_dims
from w4a16.model import quantize_model


def report(name: str, times: dict, top: int, layers: int) -> None:
    """The totals of a ``kernel_table`` by kind, then its ``top`` kernels by device time."""
    total = sum(t for t, _ in times.values())
    kinds = collections.Counter(kernel_kinds(times))
    launches = sum(c for _, c in times.values())
    print(f"\n{name}: {total / 1e3:.3f} ms of kernels, {launches:.0f} launches ({launches / layers:.1f} per layer); "
          + ", ".join(f"{k} {v:.3f} ms" for k, v in kinds.most_common()))
    print("| us | launches | kernel |\n|---:|---:|---|")
    for k, (t, c) in sorted(times.items(), key=lambda kv: -kv[1][0])[:top]:
        print(f"| {t:.1f} | {c:.0f} | {k[:110]} |")


def runs(model, a, ids: torch.Tensor):
    """(label, callable) pairs for the phase."""
    if a.phase == "prefill":
        def forward():
            h = model.model(input_ids=ids, use_cache=False).last_hidden_state
            return model.lm_head(h[:, -1])
        return [(f"prefill {a.tokens} tokens", forward)]
    out = []
    for b in (int(x) for x in a.batches.split(",")):
        dec = StaticDecoder(model, b, 256, 32, "cuda", compile=a.compile)
        dec.prefill(torch.randint(0, model.config.vocab_size, (b, 32), device="cuda"))
        out.append((f"decode batch {b}{' compiled' if a.compile else ''}", dec.step))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("phase", choices=("prefill", "decode"))
    ap.add_argument("--model", default="qwen3-30b-a3b")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=2048, help="prefill length")
    ap.add_argument("--batches", default="1,16", help="decode batch sizes")
    ap.add_argument("--compile", action="store_true", help="decode steps through torch.compile")
    ap.add_argument("--fuse-layers", action="store_true", help="fuse the quantized decoder layers' epilogues")
    ap.add_argument("--lm-head-int4", action="store_true", help="quantize the lm_head too")
    ap.add_argument("--dtype", default="bf16", choices=tuple(DTYPES))
    ap.add_argument("--attention", default="sdpa", choices=ATTENTIONS, help="both models' attention (w4a16.e2e.speed)")
    ap.add_argument("--fused-routers", action="store_true",
                    help="both models' MoE routers on one kernel (w4a16.moe.router)")
    ap.add_argument("--top", type=int, default=20)
    a = ap.parse_args()
    dtype = DTYPES[a.dtype]
    config = model_config(a.model, model_dims(a.model, a.layers), a.attention, a.fused_routers)
    model = build_model(config, "cuda", dtype)
    ids = torch.randint(0, config.vocab_size, (1, a.tokens), generator=torch.Generator().manual_seed(1)).cuda()
    print(f"{a.model}, {a.layers} layers, {a.dtype}, attention {a.attention}, {torch.cuda.get_device_name()}, "
          f"torch {torch.__version__}")
    for label, run in runs(model, a, ids):
        report(f"{a.dtype}, {label}", kernel_table(run), a.top, a.layers)
    quantize_model(model, group_size=128, skip=() if a.lm_head_int4 else ("lm_head",), dtype=dtype, progress=False,
                   fuse=True)
    if a.fuse_layers:
        from w4a16.fused_layer import fuse_decoder_layers
        fuse_decoder_layers(model)
    for label, run in runs(model, a, ids):
        report(f"w4a16 g128, {label}", kernel_table(run), a.top, a.layers)


if __name__ == "__main__":
    main()
