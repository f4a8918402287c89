"""Tensor parallelism on two GPUs (NCCL): equality checks, then decode speed of a Llama-3-70B-shaped model.

    python benchmarks/tp_session.py [--layers 8] [--batches 1 16] [--iters 50] [--skip-checks] [--out tp.json]

Spawns one process per GPU (2 by default, ``--tp``), rendezvous on 127.0.0.1 only. NVLink
multicast stays off (NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1, NVSHMEM_DISABLE_NVLS=1).

1. Checks (all ranks): the sharded result equals the unsharded one on the GPU kernels (relative
   Frobenius error <= 2e-3, every element finite): an MLP 256->512->256 (g 64 symmetric, g 128
   asymmetric) column-wise + row-wise; an act-order layer row-wise (replicated and sharded
   input) and column-wise; a tiny Llama (2 layers, 4 heads, 2 KV heads) with and without fused
   projections; load_sharded of that Llama from a file.
2. Speed: a Llama-3-70B-shaped model (hidden 8192, intermediate 28672, 64 heads, 8 KV heads,
   vocab 128256) with ``--layers`` decoder layers, random weights, in fp16 and quantized
   (W4A16, g 128), at TP = 1 (rank 0 alone) and TP = tp (apply_tp_plan; the fp16 model takes
   torch's own ColwiseParallel / RowwiseParallel through the same plan). One decode step on a
   static KV cache (w4a16.e2e.speed.decode_speed: a CUDA graph when capture works, eager
   otherwise, checked against a full forward), tokens/s = batch / step time, and per GPU the
   memory allocated with the model loaded (max over ranks). A table on rank 0; JSON with --out.
"""
from __future__ import annotations

import os

os.environ["NCCL_NVLS_ENABLE"] = "0"
os.environ["TORCH_SYMM_MEM_DISABLE_MULTICAST"] = "1"
os.environ["NVSHMEM_DISABLE_NVLS"] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import socket  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch import nn  # noqa: E402

TOL = 2e-3
LLAMA3_70B = dict(hidden_size=8192, intermediate_size=28672, num_attention_heads=64, num_key_value_heads=8,
                  vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5,
                  tie_word_embeddings=False)


def say(*a):
    if dist.get_rank() == 0:
        print(*a, flush=True)


def rel(got, want) -> float:
    return float((got.float() - want.float()).norm() / want.float().norm())


# ---------------------------------------------------------------------------- checks
def _mlp(seed, g, sym, dev):
    import w4a16

    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(256, 512), nn.SiLU(), nn.Linear(512, 256)).half().to(dev)
    w4a16.quantize_model(m, group_size=g, symmetric=sym, progress=False)
    return m


def _act_order_layer(dev, seed=10, N=192, bias=True):
    import w4a16
    from w4a16.pack import pack_nibbles

    gen = torch.Generator().manual_seed(seed)
    K, g = 512, 64
    w = w4a16.QuantizedWeight.from_plain(pack_nibbles(torch.randint(0, 16, (N, K), dtype=torch.uint8, generator=gen)),
                                         (torch.rand(N, K // g, generator=gen) * 0.02 + 0.005).half(),
                                         torch.randint(0, 16, (N, K // g), generator=gen), g,
                                         torch.randperm(K, generator=gen))
    return w4a16.W4A16Linear.from_quantized(w, torch.randn(N, generator=gen).half() if bias else None).to(dev)


def _tiny_llama(dev, fuse, seed=0):
    import w4a16
    from w4a16.e2e.speed import build_model, llama_config, llama_dims

    cfg = llama_config(llama_dims(2, hidden_size=256, intermediate_size=512, num_attention_heads=4,
                                  num_key_value_heads=2, vocab_size=1000))
    model = build_model(cfg, dev, seed=seed)
    w4a16.quantize_model(model, group_size=64, progress=False, fuse=fuse)
    return model


@torch.no_grad()
def run_checks(mesh, dev, tmp) -> dict:
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import parallelize_module
    import w4a16
    from w4a16.distributed import W4A16ColwiseParallel, W4A16RowwiseParallel, apply_tp_plan, load_sharded

    r, tp = mesh.get_local_rank(), mesh.size()
    out = {}

    def record(name, got, want):
        ok = bool(torch.isfinite(got).all()) and rel(got, want) <= TOL
        out[name] = (rel(got, want), ok)

    x = torch.randn(3, 5, 256, generator=torch.Generator().manual_seed(2)).half().to(dev)
    for g, sym in ((64, True), (128, False)):
        m = _mlp(1, g, sym, dev)
        want = m(x)
        apply_tp_plan(m, mesh, {"0": "colwise", "2": "rowwise"})
        record(f"mlp g{g} {'sym' if sym else 'asym'}", m(x), want)
    xa = torch.randn(5, 512, generator=torch.Generator().manual_seed(11)).half().to(dev)
    n = 192 // tp
    for name, style, sharded_in in (("act-order colwise", W4A16ColwiseParallel(), None),
                                    ("act-order rowwise, replicated input",
                                     W4A16RowwiseParallel(input_layouts=Replicate()), False),
                                    ("act-order rowwise, sharded input", W4A16RowwiseParallel(), True)):
        layer = _act_order_layer(dev)
        want = layer(xa)
        parallelize_module(layer, mesh, style)
        if sharded_in is None:
            record(name, layer(xa), want[:, r * n:(r + 1) * n])
        else:
            k = 512 // tp
            record(name, layer(xa[:, r * k:(r + 1) * k] if sharded_in else xa), want)
    ids = torch.randint(0, 1000, (2, 9), generator=torch.Generator().manual_seed(14)).to(dev)
    for fuse in (False, True):
        model = _tiny_llama(dev, fuse)
        want = model(ids).logits
        apply_tp_plan(model, mesh)
        record(f"tiny llama{' (fused)' if fuse else ''}", model(ids).logits, want)
    record("tiny llama (fused), sharded, torch.compile", torch.compile(model)(ids).logits, want)
    path = os.path.join(tmp, "tiny.safetensors")
    source = _tiny_llama(dev, True)
    if r == 0:
        w4a16.save(source, path)
    dist.barrier()
    loaded = _tiny_llama(dev, True, seed=1)
    load_sharded(path, loaded, mesh)
    apply_tp_plan(source, mesh)
    record("load_sharded tiny llama vs sharded source", loaded(ids).logits, source(ids).logits)
    # a GPTQ checkpoint (one act-order layer, split row-wise: read whole) loaded with the mesh
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
    from tiny_models import write_hf_checkpoint

    plain = _tiny_llama("cpu", False)
    plain.model.layers[0].mlp.down_proj = _act_order_layer("cpu", seed=12, N=256, bias=False)
    folder = os.path.join(tmp, "gptq")
    if r == 0:
        write_hf_checkpoint(folder, "gptq", plain)
    dist.barrier()
    want = plain.to(dev)(ids).logits
    from w4a16.e2e.speed import build_model
    target = build_model(plain.config, dev, seed=2)
    report = w4a16.load_pretrained_quantized(target, folder, mesh=mesh)
    record(f"GPTQ load_pretrained_quantized(mesh=) vs unsharded (read whole: {report.read_whole})",
           target(ids).logits, want)
    dist.barrier()  # rank 0's folder with the files goes away after this
    return out


# ---------------------------------------------------------------------------- speed
def _big(layers, dev, quantized):
    import w4a16
    from w4a16.e2e.speed import build_model, llama_config, llama_dims

    model = build_model(llama_config(llama_dims(layers, **LLAMA3_70B)), dev)
    if quantized:
        w4a16.quantize_model(model, group_size=128, progress=False)
    return model


def _decode(model, tp, batches, iters, dev):
    from w4a16.e2e.speed import decode_speed

    cfg = model.config
    heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    cfg.head_dim = cfg.hidden_size // heads
    cfg.num_key_value_heads = kv // tp  # the static cache holds this rank's KV heads
    try:
        return [decode_speed(model, b, str(dev), context=256, iters=iters, say=say) for b in batches]
    finally:
        cfg.num_key_value_heads = kv


def run_speed(mesh, dev, args) -> list:
    from w4a16.distributed import apply_tp_plan

    rows = []
    r, tp = mesh.get_local_rank(), mesh.size()
    for quantized in (False, True):
        label = "W4A16" if quantized else "fp16"
        for size in (1, tp):
            torch.cuda.empty_cache()
            t0 = time.perf_counter()
            if size == 1 and r != 0:
                dist.barrier()
                continue
            model = _big(args.layers, dev, quantized)
            if size > 1:
                apply_tp_plan(model, mesh)
            torch.cuda.synchronize(dev)
            mem = torch.cuda.memory_allocated(dev)
            if size > 1:
                m = torch.tensor([mem], device=dev)
                dist.all_reduce(m, op=dist.ReduceOp.MAX)
                mem = int(m.item())
            try:
                speeds = _decode(model, size, args.batches, args.iters, dev)
            except Exception as e:  # reported, never hidden
                speeds = []
                rows.append(dict(precision=label, tp=size, error=f"{type(e).__name__}: {e}"))
                say(f"{label} TP={size}: FAILED {type(e).__name__}: {e}")
            for s in speeds:
                rows.append(dict(precision=label, tp=size, batch=s.batch, step_ms=s.step_ms,
                                 tokens_per_s=s.tokens_per_s, mode=s.mode, graph_check=s.graph_check,
                                 mem_gib=mem / 2**30, note=s.note))
            say(f"{label} TP={size}: {len(speeds)} batch sizes in {time.perf_counter() - t0:.0f} s")
            del model
            torch.cuda.empty_cache()
            if size == 1:
                dist.barrier()
    return rows


def table(rows) -> str:
    lines = ["| precision | TP | batch | step ms | tokens/s | per-GPU memory GiB | mode |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for x in rows:
        if "error" in x:
            lines.append(f"| {x['precision']} | {x['tp']} | - | - | - | - | FAILED: {x['error'][:80]} |")
        else:
            lines.append(f"| {x['precision']} | {x['tp']} | {x['batch']} | {x['step_ms']:.3f} | "
                         f"{x['tokens_per_s']:.1f} | {x['mem_gib']:.2f} | {x['mode']} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- processes
def worker(rank: int, port: int, args) -> None:
    dev = torch.device("cuda", rank)
    torch.cuda.set_device(dev)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=args.tp,
                            device_id=dev)
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cuda", (args.tp,))
    failed = False
    result = {"tp": args.tp, "layers": args.layers, "device": torch.cuda.get_device_name(dev)}
    try:
        say(f"{args.tp} x {result['device']}, torch {torch.__version__}")
        if not args.skip_checks:
            with tempfile.TemporaryDirectory() as tmp:
                tmp_list = [tmp]
                dist.broadcast_object_list(tmp_list, src=0)  # rank 0's folder: one file for all ranks
                checks = run_checks(mesh, dev, tmp_list[0])
            result["checks"] = {k: {"rel_err": e, "ok": ok} for k, (e, ok) in checks.items()}
            for k, (e, ok) in checks.items():
                say(f"check {k:45s} rel. error {e:.2e}  {'ok' if ok else 'FAIL'}")
            failed = not all(ok for _, ok in checks.values())
        if not args.checks_only:
            rows = run_speed(mesh, dev, args)
            result["speed"] = rows
            say(table(rows))
        if rank == 0 and args.out:
            with open(args.out, "w") as f:
                json.dump(result, f, indent=1)
    except Exception:
        traceback.print_exc()
        failed = True
    finally:
        dist.destroy_process_group()
    if failed:
        sys.exit(1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--skip-checks", action="store_true")
    p.add_argument("--checks-only", action="store_true", help="no speed table")
    p.add_argument("--out", default="")
    args = p.parse_args()
    if torch.cuda.device_count() < args.tp:
        sys.exit(f"needs {args.tp} CUDA GPUs, found {torch.cuda.device_count()}")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    import torch.multiprocessing as mp

    mp.spawn(worker, args=(port, args), nprocs=args.tp, join=True)


if __name__ == "__main__":
    main()
