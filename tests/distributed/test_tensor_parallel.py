"""Tensor parallelism (w4a16.distributed) on the CPU: two gloo processes on 127.0.0.1.

The pure split logic is tested in this process; everything that communicates runs once, in two
spawned ranks (``_worker``), as a list of named cases whose outcome each rank writes to a JSON
file; one test per case then reads both ranks' outcomes. The ranks set TRITON_INTERPRET=0, so the
GEMMs take the reference path (the kernels have their own tests): what is checked here is which
part of each weight a rank keeps and how the partial results are combined.
"""
from __future__ import annotations

import importlib.util
import json
import os
import socket
import sys
import time
import traceback

import pytest
import torch
import torch.distributed as dist
from torch import nn

import w4a16
from w4a16 import QuantizedWeight, W4A16Error
from w4a16.distributed import split_for
from w4a16.distributed.shard import take
from w4a16.pack import pack_nibbles

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/: tiny_models
from tiny_models import write_hf_checkpoint, write_moe_checkpoint  # noqa: E402

TP = 2
TIMEOUT_S = 150
REL_TOL = 2e-3
CASES = ("mlp_g64_sym", "mlp_g128_asym", "colwise_gather", "dtensor_chain", "rowwise_replicated_input",
         "rowwise_reduce_scatter",
         "act_order_colwise", "act_order_rowwise", "act_order_rowwise_sharded_input", "llama", "llama_fused", "state_dict",
         "errors", "load_sharded", "load_sharded_fused", "compiled", "load_hf_gptq", "load_hf_awq", "load_hf_compressed_tensors", "moe_experts", "load_hf_moe_gptq",
         "load_hf_moe_awq", "load_hf_moe_compressed_tensors")
NEEDS_TRANSFORMERS = ("llama", "llama_fused", "errors", "moe_experts", "load_sharded", "load_sharded_fused", "load_hf_gptq",
                      "load_hf_awq", "load_hf_compressed_tensors", "load_hf_moe_gptq", "load_hf_moe_awq",
                      "load_hf_moe_compressed_tensors")


# ---------------------------------------------------------------------------- helpers (both sides)
def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want.float()).norm() / want.float().norm())


def assert_same(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    """Every element within fp16 tolerance, and the relative Frobenius error <= REL_TOL."""
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert torch.isfinite(got).all(), f"{what}: non-finite values"
    torch.testing.assert_close(got.float(), want.float(), rtol=1e-2, atol=2e-3, msg=lambda m: f"{what}: {m}")
    err = rel_err(got, want)
    assert err <= REL_TOL, f"{what}: relative error {err:.2e} > {REL_TOL}"


def act_order_weight(N: int, K: int, g: int, seed: int, zeros: bool = True) -> QuantizedWeight:
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (N, K), dtype=torch.uint8, generator=gen)
    scales = (torch.rand(N, K // g, generator=gen) * 0.02 + 0.005).half()
    z = torch.randint(0, 16, (N, K // g), generator=gen) if zeros else None
    return QuantizedWeight.from_plain(pack_nibbles(codes), scales, z, g, torch.randperm(K, generator=gen))


def mlp(seed: int, group_size: int, symmetric: bool) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(256, 512), nn.SiLU(), nn.Linear(512, 256)).half()
    w4a16.quantize_model(model, group_size=group_size, symmetric=symmetric, progress=False)
    return model


def tiny_llama(seed: int = 0, kv_heads: int = 2, fuse: bool = False):
    from w4a16.e2e.speed import build_model, llama_config, llama_dims

    cfg = llama_config(llama_dims(2, hidden_size=256, intermediate_size=512, num_attention_heads=4,
                                  num_key_value_heads=kv_heads, vocab_size=1000))
    model = build_model(cfg, "cpu", seed=seed)
    w4a16.quantize_model(model, group_size=64, progress=False, fuse=fuse)
    return model


# ---------------------------------------------------------------------------- the ranks' cases
def _case_mlp(mesh, group_size, symmetric):
    from w4a16.distributed import ShardedW4A16Linear, apply_tp_plan

    model = mlp(1, group_size, symmetric)
    x = torch.randn(3, 5, 256, generator=torch.Generator().manual_seed(2)).half()
    with torch.no_grad():
        want = model(x)
        apply_tp_plan(model, mesh, {"0": "colwise", "2": "rowwise"})
        assert isinstance(model[0], ShardedW4A16Linear) and model[0].weight_q.shape == (256, 256)
        assert model[2].weight_q.shape == (256, 256)
        assert model[2].weight_q.scales.shape == (256, 256 // group_size)
        assert_same(model(x), want, "mlp")


def _case_compiled(mesh):
    """torch.compile(fullgraph=True) of a sharded MLP and of a sharded tiny Llama (the row-wise
    all-reduce traced as a functional collective): the eager sharded result."""
    import torch._dynamo as dynamo

    from w4a16.distributed import apply_tp_plan

    model = mlp(3, 64, False)
    x = torch.randn(2, 4, 256, generator=torch.Generator().manual_seed(5)).half()
    with torch.no_grad():
        apply_tp_plan(model, mesh, {"0": "colwise", "2": "rowwise"})
        want = model(x)
        dynamo.reset()
        got = torch.compile(model, backend="aot_eager", fullgraph=True)(x)
    assert_same(got, want, "compiled sharded mlp")
    if importlib.util.find_spec("transformers") is None:
        return
    llama = tiny_llama(seed=2, fuse=True)
    ids = torch.randint(0, 1000, (1, 5), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        apply_tp_plan(llama, mesh)
        want = llama(ids).logits
        dynamo.reset()
        explained = dynamo.explain(llama)(ids)
        assert explained.graph_break_count == 0, [str(b.reason)[:200] for b in explained.break_reasons]
        got = torch.compile(llama, backend="aot_eager")(ids).logits
    assert_same(got, want, "compiled sharded llama")


def _single(mesh, style, layer, x):
    from torch.distributed.tensor.parallel import parallelize_module

    with torch.no_grad():
        want = layer(x)
        parallelize_module(layer, mesh, style)
        return layer(x), want


def _case_colwise_gather(mesh):
    from torch.distributed.tensor import Replicate
    from w4a16.distributed import W4A16ColwiseParallel

    layer = mlp(3, 128, False)[2]
    x = torch.randn(4, 512, generator=torch.Generator().manual_seed(4)).half()
    got, want = _single(mesh, W4A16ColwiseParallel(output_layouts=Replicate()), layer, x)
    assert_same(got, want, "colwise gathered")
    layer2 = mlp(3, 128, False)[2]
    got2, _ = _single(mesh, W4A16ColwiseParallel(use_local_output=False), layer2, x)
    from torch.distributed.tensor import DTensor

    assert isinstance(got2, DTensor) and tuple(got2.shape) == (4, 256) and got2.to_local().shape == (4, 128)
    assert_same(got2.full_tensor(), want, "colwise DTensor output")


def _case_dtensor_chain(mesh):
    """DTensors between layers: column-wise hands a Shard(-1) DTensor through SiLU to row-wise."""
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.parallel import parallelize_module
    from w4a16.distributed import W4A16ColwiseParallel, W4A16RowwiseParallel

    model = mlp(9, 128, True)
    x = torch.randn(6, 256, generator=torch.Generator().manual_seed(10)).half()
    with torch.no_grad():
        want = model(x)
        parallelize_module(model, mesh, {"0": W4A16ColwiseParallel(use_local_output=False),
                                         "2": W4A16RowwiseParallel(use_local_output=False)})
        got = model(x)
    assert isinstance(got, DTensor) and got.placements[0].is_replicate()
    assert_same(got.to_local(), want, "DTensor chain")


def _case_rowwise_replicated_input(mesh):
    from torch.distributed.tensor import Replicate
    from w4a16.distributed import W4A16RowwiseParallel

    layer = mlp(5, 64, True)[2]
    x = torch.randn(2, 7, 512, generator=torch.Generator().manual_seed(6)).half()
    got, want = _single(mesh, W4A16RowwiseParallel(input_layouts=Replicate()), layer, x)
    assert_same(got, want, "rowwise, replicated input")


def _case_rowwise_reduce_scatter(mesh):
    from torch.distributed.tensor import Replicate, Shard
    from w4a16.distributed import W4A16RowwiseParallel

    layer = mlp(7, 64, False)[2]
    x = torch.randn(3, 512, generator=torch.Generator().manual_seed(8)).half()
    style = W4A16RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(-1))
    got, want = _single(mesh, style, layer, x)
    r = mesh.get_local_rank()
    assert_same(got, want[:, r * 128:(r + 1) * 128], "rowwise, reduce-scattered output")


def _act_order_layer(seed, bias=True):
    w = act_order_weight(192, 512, 64, seed)
    b = torch.randn(192, generator=torch.Generator().manual_seed(seed + 1)).half() if bias else None
    return w4a16.W4A16Linear.from_quantized(w, b)


def _case_act_order_colwise(mesh):
    from w4a16.distributed import W4A16ColwiseParallel

    layer = _act_order_layer(10)
    x = torch.randn(5, 512, generator=torch.Generator().manual_seed(11)).half()
    got, want = _single(mesh, W4A16ColwiseParallel(), layer, x)
    r = mesh.get_local_rank()
    assert layer.weight_q.perm is not None and layer.weight_q.shape == (96, 512)
    assert_same(got, want[:, r * 96:(r + 1) * 96], "act-order colwise")


def _case_act_order_rowwise(mesh, sharded_input):
    from torch.distributed.tensor import Replicate
    from w4a16.distributed import W4A16RowwiseParallel

    layer = _act_order_layer(12)
    perm = layer.perm.clone()
    x = torch.randn(5, 512, generator=torch.Generator().manual_seed(13)).half()
    r = mesh.get_local_rank()
    style = W4A16RowwiseParallel() if sharded_input else W4A16RowwiseParallel(input_layouts=Replicate())
    with torch.no_grad():
        want = layer(x)
        from torch.distributed.tensor.parallel import parallelize_module

        parallelize_module(layer, mesh, style)
        assert layer.weight_q.perm is None and layer.weight_q.shape == (192, 256)
        assert torch.equal(layer.input_index, perm[r * 256:(r + 1) * 256])
        got = layer(x[:, r * 256:(r + 1) * 256] if sharded_input else x)
    assert_same(got, want, "act-order rowwise")


def _case_llama(mesh):
    from w4a16.distributed import DEFAULT_TP_PLAN, ShardedW4A16Linear, apply_tp_plan

    model = tiny_llama()
    ids = torch.randint(0, 1000, (2, 9), generator=torch.Generator().manual_seed(14))
    with torch.no_grad():
        want = model(ids).logits
        styles = apply_tp_plan(model, mesh)
        per_layer = [k for k in DEFAULT_TP_PLAN if k not in ("lm_head", "mlp.experts")]   # no experts here
        assert len(styles) == 2 * len(per_layer) + 1, sorted(styles)   # 2 layers + lm_head
        assert model.lm_head.weight.to_local().shape[0] == model.lm_head.out_features // mesh.size()
        attn = model.model.layers[0].self_attn
        assert isinstance(attn.q_proj, ShardedW4A16Linear) and attn.q_proj.weight_q.shape == (128, 256)
        assert attn.k_proj.weight_q.shape == (64, 256) and attn.o_proj.weight_q.shape == (256, 128)
        assert model.model.layers[1].mlp.down_proj.weight_q.shape == (256, 256)
        got = model(ids).logits
    assert_same(got, want, "llama logits")


def _tiny_qwen3_moe(heads: int, intermediate: int, seed: int):
    """A two-layer Qwen3-MoE model (hidden 64, 4 experts, 2 per token, head_dim 16), fp16, random."""
    import transformers

    cfg = transformers.Qwen3MoeConfig(vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=heads,
                                      num_key_value_heads=2, head_dim=16, intermediate_size=128,
                                      moe_intermediate_size=intermediate, num_experts=4, num_experts_per_tok=2,
                                      max_position_embeddings=64)
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(cfg).eval().half()


def _case_moe_experts(mesh):
    """A tiny Qwen3-MoE model: the default plan splits each experts module over I (and the
    attention as for Llama); the logits equal the unsharded model's."""
    from w4a16.distributed import W4A16ExpertsParallel, apply_tp_plan
    from w4a16.moe import W4A16Experts

    model = _tiny_qwen3_moe(heads=4, intermediate=64, seed=3)
    w4a16.quantize_model(model, group_size=32, symmetric=False, progress=False)
    ids = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(15))
    with torch.no_grad():
        want = model(ids).logits
        styles = apply_tp_plan(model, mesh)
        experts = model.model.layers[0].mlp.experts
        assert isinstance(experts, W4A16Experts) and isinstance(styles["model.layers.0.mlp.experts"], W4A16ExpertsParallel)
        gu, dn = experts.weights()
        assert gu.shape == (4, 64, 64) and dn.shape == (4, 64, 32)     # I = 64 over 2 ranks
        got = model(ids).logits
    assert_same(got, want, "moe logits")


def _case_load_hf_moe(mesh, tmp, method):
    """load_pretrained_quantized(..., mesh=mesh) of a MoE checkpoint of ``method`` (per-expert
    layers): each experts module is split over I as apply_tp_plan does (rank r: its slice of every
    expert), each expert's layers read as slices (gate and up rows, down's K), never whole, and
    the logits equal the unsharded load's. Its o_proj (K = 128, group 64) keeps one group per
    rank: read as a per-channel part, it still shards as a group-64 layer."""
    import copy

    from safetensors import safe_open

    from w4a16 import io as w4a16_io
    from w4a16.distributed import W4A16ExpertsParallel
    from w4a16.moe import W4A16Experts

    r = mesh.get_local_rank()
    source = _tiny_qwen3_moe(heads=8, intermediate=128, seed=5)
    folder = os.path.join(tmp, f"hf-moe-{method}")
    if r == 0:
        write_moe_checkpoint(folder, method, source)
    dist.barrier()
    whole = copy.deepcopy(source)
    w4a16.load_pretrained_quantized(whole, folder)
    ids = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(21))
    with torch.no_grad():
        want = whole(ids).logits
    model = _tiny_qwen3_moe(heads=8, intermediate=128, seed=6)   # other float weights
    log = []
    w4a16_io.safe_open = lambda *a, **k: _Spy(safe_open(*a, **k), log)   # the checkpoint opens through io
    try:
        report = w4a16.load_pretrained_quantized(model, folder, mesh=mesh)
    finally:
        w4a16_io.safe_open = safe_open
    read_whole = sorted({e[1] for e in log if e[0] == "tensor" and ".experts." in e[1] and not e[1].endswith("g_idx")})
    assert not read_whole and not report.read_whole, (read_whole[:4], report.read_whole)
    slices = {e[1]: e[2] for e in log if e[0] == "slice"}
    p = "model.layers.1.mlp.experts.2"
    want_slices = {   # up: rows r*64.. of N = 64 per rank; down: K = 128 columns, 64 per rank
        "gptq": (("up_proj.qweight", (slice(None), slice(r * 64, (r + 1) * 64))), ("down_proj.qweight", slice(r * 8, (r + 1) * 8))),
        "awq": (("up_proj.qweight", (slice(None), slice(r * 8, (r + 1) * 8))), ("down_proj.qweight", slice(r * 64, (r + 1) * 64))),
        "compressed-tensors": (("up_proj.weight_packed", slice(r * 64, (r + 1) * 64)),
                               ("down_proj.weight_packed", (slice(None), slice(r * 8, (r + 1) * 8))))}[method]
    for key, sl in want_slices:
        assert slices[f"{p}.{key}"] == repr(sl), (key, slices.get(f"{p}.{key}"))
    name = "model.layers.1.mlp.experts"
    experts = model.get_submodule(name)
    assert isinstance(experts, W4A16Experts) and experts.tp == 2 and report.sharded[name] == W4A16ExpertsParallel.__name__
    assert name in report.experts
    gu, dn = experts.weights()
    assert gu.shape == (4, 128, 64) and dn.shape == (4, 64, 64) and not gu.qweight.is_meta
    full_gu, full_dn = whole.get_submodule(name).weights()
    I, i = 128, 64
    assert torch.equal(gu.dequantize(), torch.cat([full_gu.dequantize()[:, r * i:(r + 1) * i],
                                                   full_gu.dequantize()[:, I + r * i:I + (r + 1) * i]], 1))
    assert torch.equal(dn.dequantize(), full_dn.dequantize()[:, :, r * i:(r + 1) * i])
    with torch.no_grad():
        assert_same(model(ids).logits, want, f"{method} moe checkpoint logits")


def _case_llama_fused(mesh):
    """quantize_model's default fuses q/k/v and gate/up: each member is split alike."""
    from w4a16.distributed import apply_tp_plan

    model = tiny_llama(fuse=True)
    attn = model.model.layers[0].self_attn
    ids = torch.randint(0, 1000, (2, 9), generator=torch.Generator().manual_seed(14))
    r = mesh.get_local_rank()
    with torch.no_grad():
        want = model(ids).logits
        q_rows = attn.qkv_proj.weight_q.plain_codes()[r * 128:(r + 1) * 128].clone()
        v_rows = attn.qkv_proj.weight_q.plain_codes()[256 + 128 + r * 64:256 + 128 + (r + 1) * 64].clone()
        styles = apply_tp_plan(model, mesh)
        assert "model.layers.0.self_attn.qkv_proj" in styles and "model.layers.1.mlp.gate_up_proj" in styles
        local = attn.qkv_proj.weight_q.plain_codes()
        assert attn.qkv_proj.splits == (128, 64, 64) and local.shape == (256, 128)
        assert torch.equal(local[:128], q_rows) and torch.equal(local[192:], v_rows)
        got = model(ids).logits
    assert_same(got, want, "llama logits, fused projections")


def _case_state_dict(mesh):
    from torch.distributed.tensor import DTensor
    from w4a16.distributed import apply_tp_plan

    model = mlp(15, 64, False)
    full = {k: v.clone() for k, v in model.state_dict().items()}
    apply_tp_plan(model, mesh, {"0": "colwise", "2": "rowwise"})
    sd = model.state_dict()
    assert sorted(sd) == sorted(full), (sorted(sd), sorted(full))
    for k, v in sd.items():
        assert isinstance(v, DTensor) and tuple(v.shape) == tuple(full[k].shape), k
        assert torch.equal(v.full_tensor(), full[k]), k
    try:
        model.load_state_dict(full)
    except W4A16Error as e:
        assert "load_sharded" in str(e)
    else:
        raise AssertionError("load_state_dict on a sharded layer was accepted")


def _expect_error(fn, *words):
    try:
        fn()
    except W4A16Error as e:
        for w in words:
            assert w in str(e), f"{w!r} not in {e}"
        return
    raise AssertionError(f"no W4A16Error (wanted one naming {words})")


def _case_errors(mesh):
    from w4a16.distributed import W4A16ColwiseParallel, W4A16RowwiseParallel, apply_tp_plan
    from torch.distributed.tensor.parallel import parallelize_module

    per_channel = mlp(16, -1, True)
    _expect_error(lambda: parallelize_module(per_channel[2], mesh, W4A16RowwiseParallel()), "group_size", "-1")
    odd = w4a16.W4A16Linear.from_linear(nn.Linear(256, 255).half(), 64)
    _expect_error(lambda: parallelize_module(odd, mesh, W4A16ColwiseParallel()), "tp", "255")
    coarse = w4a16.W4A16Linear.from_linear(nn.Linear(256, 64).half(), 256)
    _expect_error(lambda: parallelize_module(coarse, mesh, W4A16RowwiseParallel()), "group boundaries", "256")
    # one key/value head cannot go to two ranks; nothing is changed before the refusal
    model = tiny_llama(kv_heads=1)
    ids = torch.randint(0, 1000, (1, 5), generator=torch.Generator().manual_seed(17))
    with torch.no_grad():
        before = model(ids).logits
    _expect_error(lambda: apply_tp_plan(model, mesh), "k_proj", "heads")
    assert type(model.model.layers[0].self_attn.q_proj) is w4a16.W4A16Linear
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)
    _expect_error(lambda: apply_tp_plan(model, mesh, {"q_proj": "diagonal"}), "plan", "diagonal")
    # fused q/k/v: every member split column-wise with the default layouts, or nothing
    fused = tiny_llama(fuse=True)
    _expect_error(lambda: apply_tp_plan(fused, mesh, {"self_attn.q_proj": "colwise"}), "k_proj", "qkv_proj")
    from torch.distributed.tensor import Replicate

    gather = {p: W4A16ColwiseParallel(output_layouts=Replicate()) for p in ("q_proj", "k_proj", "v_proj")}
    _expect_error(lambda: apply_tp_plan(fused, mesh, gather), "qkv_proj", "default layouts")
    assert type(fused.model.layers[0].self_attn.qkv_proj).__name__ == "FusedW4A16Linear"


class _Spy:
    """safe_open wrapper recording every read: ('tensor', name) or ('slice', name, index)."""

    def __init__(self, real, log):
        self.real, self.log = real, log

    def __enter__(self):
        self.f = self.real.__enter__()
        return self

    def __exit__(self, *a):
        return self.real.__exit__(*a)

    def metadata(self):
        return self.f.metadata()

    def keys(self):
        return self.f.keys()

    def get_tensor(self, name):
        self.log.append(("tensor", name))
        return self.f.get_tensor(name)

    def get_slice(self, name):
        sl, log = self.f.get_slice(name), self.log

        class _Slice:
            def get_shape(self):
                return sl.get_shape()

            def __getitem__(self, idx):
                log.append(("slice", name, repr(idx)))
                return sl[idx]

        return _Slice()


def _case_load_sharded(mesh, tmp, fuse=False):
    from safetensors import safe_open
    from w4a16.distributed import apply_tp_plan, load_sharded
    from w4a16 import io as w4a16_io

    r = mesh.get_local_rank()
    path = os.path.join(tmp, f"llama{'-fused' if fuse else ''}.safetensors")
    source = tiny_llama(seed=0, fuse=fuse)
    if r == 0:
        w4a16.save(source, path)
    dist.barrier()
    ids = torch.randint(0, 1000, (2, 6), generator=torch.Generator().manual_seed(18))
    log = []
    w4a16_io.safe_open = lambda *a, **k: _Spy(safe_open(*a, **k), log)   # load_sharded opens through io
    try:
        model = tiny_llama(seed=1, fuse=fuse)  # other weights: everything must come from the file
        load_sharded(path, model, mesh)
    finally:
        w4a16_io.safe_open = safe_open
    with torch.no_grad():
        apply_tp_plan(source, mesh)
        assert_same(model(ids).logits, source(ids).logits, "load_sharded logits")
    sharded = (".q_proj.", ".k_proj.", ".v_proj.", ".o_proj.", ".gate_proj.", ".up_proj.", ".down_proj.",
               ".qkv_proj.", ".gate_up_proj.")
    whole = [e[1] for e in log if e[0] == "tensor" and any(s in e[1] for s in sharded)]
    assert not whole, f"sharded tensors read whole: {whole[:4]}"
    reads = {e[1]: e[2] for e in log if e[0] == "slice"}
    if fuse:  # q rows, then k rows, then v rows of this rank
        want = [slice(r * 128, (r + 1) * 128), slice(256 + r * 64, 256 + (r + 1) * 64),
                slice(384 + r * 64, 384 + (r + 1) * 64)]
        got = [e[2] for e in log if e[0] == "slice" and e[1] == "model.layers.0.self_attn.qkv_proj.qweight"]
        assert got == [repr(sl) for sl in want], got
        return
    saved = w4a16.load(path)
    up, down = model.model.layers[1].mlp.up_proj, model.model.layers[1].mlp.down_proj
    assert torch.equal(up.weight_q.plain_codes(), saved["model.layers.1.mlp.up_proj.qweight"][r * 256:(r + 1) * 256])
    assert torch.equal(down.weight_q.plain_codes(),
                       saved["model.layers.1.mlp.down_proj.qweight"][:, r * 128:(r + 1) * 128])
    assert torch.equal(down.weight_q.scales, saved["model.layers.1.mlp.down_proj.scales"][:, r * 4:(r + 1) * 4])
    assert reads["model.layers.1.mlp.up_proj.qweight"] == repr(slice(r * 256, (r + 1) * 256)), reads
    assert reads["model.layers.1.mlp.down_proj.qweight"] == repr((slice(None), slice(r * 128, (r + 1) * 128)))
    assert reads["model.layers.1.mlp.down_proj.scales"] == repr((slice(None), slice(r * 4, (r + 1) * 4)))


def _case_load_hf(mesh, tmp, method, fuse):
    """load_pretrained_quantized(..., mesh=mesh) of a GPTQ / AWQ / compressed-tensors checkpoint:
    the logits of the unsharded model; each sharded layer's quantized tensors read as slices
    (an act-order layer split row-wise is read whole, and said so)."""
    from safetensors import safe_open

    from w4a16 import io as w4a16_io
    from w4a16.distributed import ShardedW4A16Linear

    r = mesh.get_local_rank()
    source = tiny_llama(seed=0)
    act_order = method != "awq"   # AWQ has no act-order
    if act_order:  # layer 0's down_proj (row-wise) with act-order and asymmetric zeros
        source.model.layers[0].mlp.down_proj = w4a16.W4A16Linear.from_quantized(act_order_weight(256, 512, 64, 21))
    folder = os.path.join(tmp, f"hf-{method}")
    if r == 0:
        write_hf_checkpoint(folder, method, source)
    dist.barrier()
    ids = torch.randint(0, 1000, (2, 7), generator=torch.Generator().manual_seed(19))
    with torch.no_grad():
        want = source(ids).logits
    from w4a16.e2e.speed import build_model

    model = build_model(source.config, "cpu", seed=3)   # float weights: everything must come from the file
    log = []
    w4a16_io.safe_open = lambda *a, **k: _Spy(safe_open(*a, **k), log)   # the checkpoint opens through io
    try:
        report = w4a16.load_pretrained_quantized(model, folder, mesh=mesh, fuse=fuse)
    finally:
        w4a16_io.safe_open = safe_open
    with torch.no_grad():
        assert_same(model(ids).logits, want, f"{method} logits")
    attn = model.model.layers[1].self_attn
    q = attn.qkv_proj if fuse else attn.q_proj
    assert isinstance(q, ShardedW4A16Linear), type(q).__name__
    assert isinstance(model.model.layers[1].mlp.down_proj, ShardedW4A16Linear)
    assert model.lm_head.weight.to_local().shape[0] == 500
    planned = (".q_proj.", ".k_proj.", ".v_proj.", ".o_proj.", ".gate_proj.", ".up_proj.", ".down_proj.")
    whole = sorted({e[1] for e in log if e[0] == "tensor" and any(s in e[1] for s in planned)
                    and not e[1].endswith("g_idx")})
    expect_whole = ["model.layers.0.mlp.down_proj"] if act_order else []
    assert report.read_whole == expect_whole, report.read_whole
    assert all(k.startswith("model.layers.0.mlp.down_proj.") for k in whole), whole
    slices = {e[1]: e[2] for e in log if e[0] == "slice"}
    N = 256 // 2
    if method == "gptq":
        assert slices["model.layers.1.self_attn.q_proj.qweight"] == repr((slice(None), slice(r * N, (r + 1) * N)))
        assert slices["model.layers.1.mlp.down_proj.qweight"] == repr(slice(r * 32, (r + 1) * 32))
    elif method == "awq":
        assert slices["model.layers.1.self_attn.q_proj.qweight"] == repr((slice(None), slice(r * 16, (r + 1) * 16)))
        assert slices["model.layers.1.mlp.down_proj.qweight"] == repr(slice(r * 256, (r + 1) * 256))
    else:
        assert slices["model.layers.1.self_attn.q_proj.weight_packed"] == repr(slice(r * N, (r + 1) * N))
        assert slices["model.layers.1.mlp.down_proj.weight_packed"] == repr((slice(None), slice(r * 32, (r + 1) * 32)))


def _worker(rank: int, port: int, tmp: str) -> None:
    os.environ["TRITON_INTERPRET"] = "0"
    torch.set_num_threads(1)
    outcome = {}
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=TP)
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu", (TP,))
        cases = {
            "mlp_g64_sym": lambda: _case_mlp(mesh, 64, True),
            "mlp_g128_asym": lambda: _case_mlp(mesh, 128, False),
            "colwise_gather": lambda: _case_colwise_gather(mesh),
            "dtensor_chain": lambda: _case_dtensor_chain(mesh),
            "rowwise_replicated_input": lambda: _case_rowwise_replicated_input(mesh),
            "rowwise_reduce_scatter": lambda: _case_rowwise_reduce_scatter(mesh),
            "act_order_colwise": lambda: _case_act_order_colwise(mesh),
            "act_order_rowwise": lambda: _case_act_order_rowwise(mesh, False),
            "act_order_rowwise_sharded_input": lambda: _case_act_order_rowwise(mesh, True),
            "llama": lambda: _case_llama(mesh),
            "llama_fused": lambda: _case_llama_fused(mesh),
            "state_dict": lambda: _case_state_dict(mesh),
            "errors": lambda: _case_errors(mesh),
            "load_sharded": lambda: _case_load_sharded(mesh, tmp),
            "load_sharded_fused": lambda: _case_load_sharded(mesh, tmp, fuse=True),
            "compiled": lambda: _case_compiled(mesh),
            "load_hf_gptq": lambda: _case_load_hf(mesh, tmp, "gptq", True),
            "load_hf_awq": lambda: _case_load_hf(mesh, tmp, "awq", False),
            "load_hf_compressed_tensors": lambda: _case_load_hf(mesh, tmp, "compressed-tensors", True),
            "moe_experts": lambda: _case_moe_experts(mesh),
            "load_hf_moe_gptq": lambda: _case_load_hf_moe(mesh, tmp, "gptq"),
            "load_hf_moe_awq": lambda: _case_load_hf_moe(mesh, tmp, "awq"),
            "load_hf_moe_compressed_tensors": lambda: _case_load_hf_moe(mesh, tmp, "compressed-tensors"),
        }
        has_transformers = importlib.util.find_spec("transformers") is not None
        for name in CASES:
            started = time.perf_counter()
            if not has_transformers and name in NEEDS_TRANSFORMERS:
                outcome[name] = "skip: transformers is not installed (the tiny Llama needs it)"
                continue
            try:
                cases[name]()
                outcome[name] = "ok"
            except Exception:  # noqa: BLE001 - reported to the test of this case
                outcome[name] = traceback.format_exc()
            outcome[name + ":s"] = round(time.perf_counter() - started, 2)
            dist.barrier()  # keep the ranks in step even after a failed case
    except Exception:  # noqa: BLE001
        outcome["setup"] = traceback.format_exc()
    finally:
        with open(os.path.join(tmp, f"rank{rank}.json"), "w") as f:
            json.dump(outcome, f)
        if dist.is_initialized():
            dist.destroy_process_group()


# ---------------------------------------------------------------------------- the spawned run
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with the gloo backend is not available in this torch build")
    import torch.multiprocessing as mp

    tmp = str(tmp_path_factory.mktemp("tp"))
    with pytest.MonkeyPatch.context() as m:
        m.setenv("TRITON_INTERPRET", "0")
        m.setenv("GLOO_SOCKET_IFNAME", "lo")
        m.setenv("MASTER_ADDR", "127.0.0.1")
        ctx = mp.start_processes(_worker, args=(_free_port(), tmp), nprocs=TP, join=False, start_method="spawn")
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail(f"the {TP} ranks did not finish within {TIMEOUT_S} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    out = []
    for r in range(TP):
        with open(os.path.join(tmp, f"rank{r}.json")) as f:
            out.append(json.load(f))
    for r, o in enumerate(out):
        assert "setup" not in o, f"rank {r} could not start: {o['setup']}"
    return out


@pytest.mark.parametrize("case", CASES)
def test_two_ranks(outcomes, case):
    if outcomes[0].get(case, "").startswith("skip: "):
        pytest.skip(outcomes[0][case][len("skip: "):])
    for r, o in enumerate(outcomes):
        assert o.get(case) == "ok", f"rank {r}, case {case}:\n{o.get(case)}"


# ---------------------------------------------------------------------------- in this process
def test_split_ranges():
    s = split_for("rowwise", (512, 1024), 128, 1, 2)
    assert (s.rows, s.cols, s.groups) == ((slice(0, 512),), slice(512, 1024), slice(4, 8))
    s = split_for("colwise", (512, 1024), -1, 3, 4)
    assert (s.rows, s.cols, s.groups) == ((slice(384, 512),), slice(0, 1024), slice(0, 1))
    s = split_for("colwise", (384, 1024), 128, 1, 2, members=(256, 64, 64))
    assert s.rows == (slice(128, 256), slice(288, 320), slice(352, 384))


@pytest.mark.parametrize("args, words", [
    (("rowwise", (64, 256), -1, 0, 2), ("group_size", "per-channel")),
    (("rowwise", (64, 256), 128, 0, 3), ("tp", "in_features K = 256")),
    (("rowwise", (64, 256), 256, 0, 2), ("group boundaries", "K / tp = 128")),
    (("colwise", (100, 256), 128, 0, 8), ("tp", "out_features N = 100")),
    (("colwise", (64, 256), 128, 2, 2), ("rank",)),
    (("diagonal", (64, 256), 128, 0, 2), ("style",)),
])
def test_split_refusals(args, words):
    with pytest.raises(W4A16Error) as e:
        split_for(*args)
    for w in words:
        assert w in str(e.value)


@pytest.mark.parametrize("style", ["colwise", "rowwise"])
@pytest.mark.parametrize("act_order", [False, True])
def test_shards_rebuild_the_layer(style, act_order):
    """Exactly: the ranks' shards, combined as the styles combine them, give the whole product
    (reference GEMM in fp32, no communication)."""
    N, K, g = 64, 256, 32
    w = act_order_weight(N, K, g, 20, zeros=True)
    if not act_order:
        w = QuantizedWeight.from_plain(w.qweight, w.scales, w.zeros, g)
    bias = torch.randn(N, generator=torch.Generator().manual_seed(21)).half()
    x = torch.randn(3, K, generator=torch.Generator().manual_seed(22)).half()
    W = w.dequantize(torch.float32)
    want = x.float() @ W.T + bias.float()
    parts = []
    for r in range(4):
        shard = take(w, bias, split_for(style, w.shape, g, r, 4))
        Wl = shard.weight.dequantize(torch.float32)
        if style == "colwise":
            parts.append(x.float() @ Wl.T + shard.bias.float())
        else:
            xl = x[:, shard.input_index] if act_order else x[:, r * 64:(r + 1) * 64]
            parts.append(xl.float() @ Wl.T + (shard.bias.float() if r == 0 else 0))
    got = torch.cat(parts, dim=-1) if style == "colwise" else sum(parts)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


def test_hf_slices_and_fallbacks():
    """Which slices of each format's tensors a rank reads, and when the layer is read whole."""
    from w4a16.distributed.hf_shards import sliced_tensors

    calls = []

    def get(part, index):
        calls.append((part, index))
        return torch.zeros(1)
    col = split_for("colwise", (256, 512), 64, 1, 2)
    row = split_for("rowwise", (256, 512), 64, 1, 2)
    out = sliced_tensors("gptq", get, ["qweight", "qzeros", "scales"], col, 256, 512, None)
    assert set(out) == {"qweight", "qzeros", "scales"}
    assert calls == [("qweight", (slice(None), slice(128, 256))), ("scales", (slice(None), slice(128, 256))),
                     ("qzeros", (slice(None), slice(16, 32)))]
    calls.clear()
    out = sliced_tensors("compressed-tensors", get, ["weight_packed", "weight_scale", "weight_shape"], row, 256, 512, None)
    assert out["weight_shape"].tolist() == [256, 256]
    assert calls == [("weight_packed", (slice(None), slice(32, 64))), ("weight_scale", (slice(None), slice(4, 8)))]
    # act-order row-wise: the stored K order is permuted, so not a slice
    assert sliced_tensors("gptq", get, ["qweight", "qzeros", "scales", "g_idx"], row, 256, 512,
                          torch.arange(512) % 8) is None
    # column-wise with 12 rows per rank: AWQ packs 8 outputs per int32 word
    odd = split_for("colwise", (24, 512), 64, 1, 2)
    assert sliced_tensors("awq", get, ["qweight", "qzeros", "scales"], odd, 24, 512, None) is None
    # compressed-tensors without zero points packs nothing along N: still a slice
    assert sliced_tensors("compressed-tensors", get, ["weight_packed", "weight_scale", "weight_shape"], odd, 24, 512,
                          None) is not None
