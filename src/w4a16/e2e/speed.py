"""End-to-end speed on a Llama-3-8B- or Qwen3-30B-A3B-shaped model: fp16 vs W4A16, on a GPU.

The model is transformers' ``LlamaForCausalLM`` (or, with ``model="qwen3-30b-a3b"``,
``Qwen3MoeForCausalLM``: 128 experts of intermediate size 768, 8 per token, its experts run by
transformers' ``grouped_mm`` implementation in 16 bits and by :class:`w4a16.moe.W4A16Experts` once
quantized) built from a config written here (the published dimensions; ``layers`` shrinks it)
with random weights in fp16 (or bf16: ``dtype``) on the device: nothing is downloaded. The same model is
measured in 16 bits, then quantized in place with
:func:`w4a16.quantize_model` (``lm_head`` left in fp16) and measured again; with ``lm_head_int4``
its ``lm_head`` is then quantized too and the model measured a third time:

* prefill: one forward over ``prefill_tokens`` tokens (batch 1, no KV cache) and the
  ``lm_head`` of the last position, eager, median of a few runs;
* decode: one token for each of ``batch`` sequences on a static KV cache (transformers'
  ``StaticCache``, ``context`` slots) after a prompt, captured once as a CUDA graph and replayed;
  tokens/s = batch / step time. Manual capture rather than ``torch.compile(mode=
  "reduce-overhead")``: the same code on every transformers version, and a failure is an
  exception at capture, not a silent fallback. If capture fails the step is timed eagerly and the
  table says so. With ``compile`` the step's forward first goes through ``torch.compile``
  (inductor fuses the many small kernels around the GEMMs), for both models;
* weight memory: bytes of the parameters and buffers, and ``torch.cuda.memory_allocated``;
* where a decode step's device time goes (CUDA): a few eager steps under torch.profiler, their
  kernels' device time per step summed by kind (W4A16 GEMM, other GEMMs, everything else);
* peers (``peers=("torchao-int4",)``, ``w4a16.e2e.peers``): other int4 weight-only
  implementations applied to a fresh copy of the fp16 model and timed the same way; a peer that
  fails (its import, its quantizer, its own decode check) is a "failed" row with the reason, and
  what was measured before it is kept.

Checks that stop the run (RuntimeError) before anything is timed:
* the W4A16 model's logits on a prompt match the same model computing with its dequantized
  weights (``F.linear``), so the kernels are right on every layer of the real model; the
  top-1 agreement and relative error against the fp16 model are reported;
* one replayed decode step matches a full forward over prompt + token (graph and cache right);
* no logit is NaN or Inf.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import time
from math import nan
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from ..measure import loop_timer, rel_error
from .decoder import StaticDecoder

LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
                 rms_norm_eps=1e-5, tie_word_embeddings=False)
# Qwen3-30B-A3B (its config.json): 48 layers, hidden 2048, 32 query heads and 4 key/value heads of
# 128, 128 experts of intermediate size 768, 8 per token, normalized top-k weights.
QWEN3_30B_A3B = dict(hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_hidden_layers=48,
                     num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128,
                     num_experts_per_tok=8, norm_topk_prob=True, decoder_sparse_step=1, vocab_size=151936,
                     max_position_embeddings=40960, rope_theta=1000000.0, rms_norm_eps=1e-6,
                     tie_word_embeddings=False)
MODELS = {"llama3-8b": LLAMA3_8B, "qwen3-30b-a3b": QWEN3_30B_A3B}
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
# Relative Frobenius errors of logits, by activation dtype (bf16 keeps 3 fewer mantissa bits than
# fp16; a wrong kernel gives errors of order 1):
KERNEL_TOL = {torch.float16: 2e-2, torch.bfloat16: 6e-2}   # W4A16 model vs its own dequantized weights
GRAPH_TOL = {torch.float16: 3e-2, torch.bfloat16: 8e-2}    # replayed decode step vs a full forward
FP16_TOL = 1.0      # W4A16 vs fp16 model: beyond this it predicts worse than all-zero logits


@dataclass
class DecodeSpeed:
    """One decode measurement: ``batch`` sequences, one token each per step."""

    batch: int
    step_ms: float
    tokens_per_s: float
    mode: str            # "cuda-graph" or "eager"
    graph_check: float   # relative error of a replayed step vs a full forward
    note: str = ""
    kernel_ms: Dict[str, float] = field(default_factory=dict)  # device ms per step by kernel kind (CUDA)
    kernels: Dict[str, float] = field(default_factory=dict)    # launches per step by kernel name (CUDA)


@dataclass
class ModelSpeed:
    name: str
    weight_bytes: int            # parameters + buffers
    memory_allocated: int        # torch.cuda.memory_allocated() with the model alone (0 on CPU)
    prefill_ms: float
    decode: List[DecodeSpeed] = field(default_factory=list)
    error: str = ""              # a peer that failed before any measurement: why (its row says "failed")


@dataclass
class SpeedResult:
    config: Dict[str, object]
    device: str
    versions: Dict[str, str]
    check: Dict[str, float]      # top1_vs_fp16, rel_err_vs_fp16 (against the 16-bit model, fp16 or bf16), rel_err_vs_dequantized
    models: List[ModelSpeed] = field(default_factory=list)
    interleaved: list = field(default_factory=list)   # e2e.interleaved.InterleavedEager per batch


# ---------------------------------------------------------------------- model
def llama_dims(layers: Optional[int] = None, **overrides) -> Dict[str, object]:
    """Llama-3-8B's dimensions, with ``layers`` decoder layers and any field overridden."""
    return model_dims("llama3-8b", layers, **overrides)


def model_dims(model: str, layers: Optional[int] = None, **overrides) -> Dict[str, object]:
    """The dimensions of ``model`` (a key of MODELS), with ``layers`` decoder layers and any field overridden."""
    from ..errors import expect

    expect(model in MODELS, "model", f"one of {tuple(MODELS)}", repr(model))
    dims = dict(MODELS[model], **overrides)
    if layers is not None:
        dims["num_hidden_layers"] = int(layers)
    return dims


ATTENTIONS = ("sdpa", "packed-gqa", "fused-decode")


def model_config(model: str, dims: Dict[str, object], attention: str = "sdpa", fused_routers: bool = False):
    """The transformers config of ``model`` from :func:`model_dims`: SDPA attention, or with
    ``attention="packed-gqa"`` :func:`w4a16.attention.packed_gqa_sdpa` (a decode token's query heads
    folded onto the cache's key/value heads instead of the cache repeated per query head), or with
    ``attention="fused-decode"`` SDPA plus :mod:`w4a16.fused_attention` for decode steps (rotary
    embedding, cache write and attention in one kernel; :func:`build_model` converts the
    attention modules of a config so marked); ``fused_routers``: the MoE routers' softmax, top-k
    and renormalization in one kernel (:mod:`w4a16.moe.router`, converted by build_model too); the MoE
    model's experts run by transformers' ``grouped_mm`` implementation (torch._grouped_mm) where
    it has one."""
    from ..errors import expect

    expect(attention in ATTENTIONS, "attention", f"one of {ATTENTIONS}", repr(attention))
    if model == "llama3-8b":
        cfg = llama_config(dims)
    else:
        from transformers import Qwen3MoeConfig

        cfg = Qwen3MoeConfig(**dims)
        cfg._attn_implementation = "sdpa"
        if hasattr(cfg, "_experts_implementation") and hasattr(torch, "_grouped_mm"):
            cfg._experts_implementation = "grouped_mm"
    if attention == "packed-gqa":
        from ..attention import register

        cfg._attn_implementation = register()
    cfg.w4a16_fused_decode_attention = attention == "fused-decode"
    cfg.w4a16_fused_routers = bool(fused_routers)
    return cfg


def llama_config(dims: Dict[str, object]):
    """transformers.LlamaConfig from :func:`llama_dims` (rope_theta lands in ``rope_parameters`` on
    transformers 5), SDPA attention."""
    from transformers import LlamaConfig

    cfg = LlamaConfig(**dims)
    theta = getattr(cfg, "rope_parameters", None) or {"rope_theta": getattr(cfg, "rope_theta", None)}
    if theta.get("rope_theta") != dims["rope_theta"]:
        raise RuntimeError(f"LlamaConfig: rope_theta expected {dims['rope_theta']}, got {theta}")
    cfg._attn_implementation = "sdpa"
    return cfg


def build_model(config, device: str = "cuda", dtype: torch.dtype = torch.float16, seed: int = 0):
    """The causal LM of ``config`` (``LlamaForCausalLM``, ``Qwen3MoeForCausalLM``) with transformers'
    random init (normal, std ``initializer_range``), created directly on ``device`` with parameters
    in ``dtype`` (the rotary ``inv_freq`` buffer stays fp32, as transformers makes it); eval mode;
    its attention modules converted by ``use_fused_decode_attention`` and its MoE routers by
    ``use_fused_routers`` where :func:`model_config` asked for them."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config)
    finally:
        torch.set_default_dtype(previous)
    for name, p in model.named_parameters():
        if p.dtype != dtype:
            p.data = p.data.to(dtype)
    if getattr(config, "w4a16_fused_decode_attention", False):
        from ..fused_attention import use_fused_decode_attention

        use_fused_decode_attention(model)
    if getattr(config, "w4a16_fused_routers", False):
        from ..moe.router import use_fused_routers

        use_fused_routers(model)
    return model.to(device).eval()


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of every parameter and buffer (shared tensors once)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def _finite(t: torch.Tensor, what: str) -> torch.Tensor:
    if not bool(torch.isfinite(t).all()):
        raise RuntimeError(f"{what}: logits contain NaN or Inf")
    return t


@torch.no_grad()
def logits_of(model, ids: torch.Tensor) -> torch.Tensor:
    """ids int64 [B, T] -> fp32 logits [B, T, V] on the CPU."""
    return _finite(model(input_ids=ids, use_cache=False).logits.float().cpu(), "forward")


@contextlib.contextmanager
def dequantized_weights(model):
    """Within the block every W4A16Linear computes ``F.linear(x, W, bias)`` with its dequantized W
    (then its epilogue and norms in torch, ``w4a16.epilogue``; a fused layer's deferred o
    projection in ``project`` / ``project_norm``, its normed q/k/v projection through its norm
    module), and every W4A16Experts runs the pure-torch reference (dequantized experts, fp32)."""
    from ..epilogue import rms_norm, silu_mul
    from ..fused_layer import DeferredW4A16Linear, NormedFusedW4A16Linear
    from ..moe import W4A16Experts
    from ..nn import W4A16Linear

    mods = [m for m in model.modules() if isinstance(m, W4A16Linear)]
    experts = [m for m in model.modules() if isinstance(m, W4A16Experts)]

    def forward(self, x, residual=None, epilogue=None, norm_weight=None, norm_eps=1e-6, input_norm=None):
        if input_norm is not None:
            x = rms_norm(x, *input_norm)
        y = torch.nn.functional.linear(x, self.weight_q.dequantize(x.dtype), self.bias)
        if epilogue == "silu_mul":
            y = silu_mul(y)
        y = y if residual is None else y + residual
        return (y, rms_norm(y, norm_weight, norm_eps)) if epilogue == "residual_rmsnorm" else y

    def normed_forward(self, x, residual=None, epilogue=None):
        return forward(self, self.input_norm(x), residual, epilogue)

    def project_norm(self, x, residual, norm):
        return forward(self, x, residual, "residual_rmsnorm", norm.weight, float(norm.variance_epsilon))

    patched = []
    for m in mods:
        if isinstance(m, DeferredW4A16Linear):
            patches = {"project": forward, "project_norm": project_norm}
        else:
            patches = {"forward": normed_forward if isinstance(m, NormedFusedW4A16Linear) else forward}
        for name, fn in patches.items():
            setattr(m, name, fn.__get__(m))
        patched.append((m, patches))
    backends = [m.backend for m in experts]
    for m in experts:
        m.backend = "reference"
    try:
        yield len(mods) + len(experts)
    finally:
        for m, patches in patched:
            for name in patches:
                delattr(m, name)
        for m, b in zip(experts, backends):
            m.backend = b


# ---------------------------------------------------------------------- timing
@torch.no_grad()
def prefill_ms(model, tokens: int, device: str, iters: int = 3, seed: int = 1) -> float:
    """Median ms of one forward over [1, tokens] (no cache) plus lm_head on the last position."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (1, tokens), generator=g).to(device)

    def run():
        h = model.model(input_ids=ids, use_cache=False).last_hidden_state
        return model.lm_head(h[:, -1])

    _finite(run(), "prefill")
    time_ms = loop_timer(device)
    return statistics.median(time_ms(run, 1) for _ in range(iters))


@torch.no_grad()
def decode_speed(model, batch: int, device: str, context: int = 256, prompt_len: int = 32, iters: int = 50,
                 warmup: int = 5, use_graph: bool = True, seed: int = 2, say=print,
                 compile: bool = False) -> DecodeSpeed:
    """Time one decode step for ``batch`` sequences; checks a replay against a full forward first."""
    if prompt_len + 3 + warmup + iters + 1 > context:
        raise ValueError(f"context: expected >= prompt_len + warmup + iters + 4 = "
                         f"{prompt_len + warmup + iters + 4}, got {context}")
    g = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    prompt = torch.randint(0, vocab, (batch, prompt_len), generator=g).to(device)
    dec = StaticDecoder(model, batch, context, prompt_len, device, compile=compile)
    dec.prefill(prompt)
    dec.ids.copy_(torch.randint(0, vocab, (batch, 1), generator=g).to(device))
    mode, note = "eager", ""
    if not str(device).startswith("cuda"):
        note = "no CUDA device: eager steps"
    elif use_graph:
        try:
            dec.capture()
            mode = "cuda-graph"
        except Exception as e:  # reported in the table and the JSON, never hidden
            note = f"CUDA graph capture failed, eager steps timed instead: {type(e).__name__}: {e}"
            say(f"WARNING: batch {batch}: {note}")
            dec.graph = None
            torch.cuda.synchronize()
    dec.prefill(prompt)
    got = _finite(dec.run().float(), f"decode batch {batch}")
    want = logits_of(model, torch.cat([prompt, dec.ids], dim=1))[:, -1].to(got.device)
    err, tol = rel_error(got, want), GRAPH_TOL[_activation_dtype(model)]
    if err > tol:
        raise RuntimeError(f"decode batch {batch} ({mode}): logits differ from a full forward, "
                           f"relative error {err:.3g} > {tol}")
    time_ms = loop_timer(device)
    time_ms(dec.run, warmup)
    ms = time_ms(dec.run, iters)
    kinds, counts = kernel_breakdown(dec.step) if str(device).startswith("cuda") else ({}, {})
    return DecodeSpeed(batch, ms, batch * 1e3 / ms, mode, err, note, kinds, counts)


def kernel_kind(name: str) -> str:
    """"w4a16 gemm", "other gemm" (cuBLAS and friends) or "other" for a CUDA kernel's name."""
    low = name.lower()
    if "w4a16" in low:
        return "w4a16 gemm"
    if any(k in low for k in ("gemm", "nvjet", "cutlass", "xmma", "gemv")):
        return "other gemm"
    return "other"


@torch.no_grad()
def kernel_table(step: Callable[[], object], iters: int = 3) -> Dict[str, Tuple[float, float]]:
    """{CUDA kernel name: (device microseconds per call of ``step``, launches per call)} from eager
    calls under torch.profiler (after one call outside it): the same kernels a captured graph
    replays. Copies and fills (``Memcpy``, ``Memset``) count as kernels."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            step()
        torch.cuda.synchronize()
    table: Dict[str, Tuple[float, float]] = {}
    for e in prof.events():
        if e.device_type == DeviceType.CUDA:
            us, n = table.get(e.name, (0.0, 0.0))
            table[e.name] = (us + e.device_time_total / iters, n + 1.0 / iters)
    return table


def kernel_kinds(table: Dict[str, Tuple[float, float]]) -> Dict[str, float]:
    """Device milliseconds per :func:`kernel_kind` of a :func:`kernel_table` (copies and fills are
    of kind "other")."""
    out = {"w4a16 gemm": 0.0, "other gemm": 0.0, "other": 0.0}
    for name, (us, _) in table.items():
        out[kernel_kind(name)] += us / 1e3
    return out


def kernel_breakdown(step: Callable[[], object], iters: int = 3) -> Tuple[Dict[str, float], Dict[str, float]]:
    """(device milliseconds per call of ``step`` spent in each :func:`kernel_kind`, launches per
    call by kernel name), from :func:`kernel_table`."""
    table = kernel_table(step, iters)
    counts = {name: n for name, (_, n) in table.items()}
    return kernel_kinds(table), dict(sorted(counts.items(), key=lambda kv: -kv[1]))


def kernels_per_layer(d: "DecodeSpeed", layers: int) -> float:
    """Kernel launches of one decode step divided by the decoder layers (the embedding, the last
    norm, the lm_head and the step's bookkeeping included: an upper bound on a layer's own)."""
    return sum(d.kernels.values()) / max(1, layers)


# ---------------------------------------------------------------------- the run
def _versions() -> Dict[str, str]:
    import importlib.metadata

    from .. import __version__

    out = {"torch": torch.__version__, "w4a16": __version__}
    for pkg in ("transformers", "triton"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def _against_dequantized(model, vids, ref: torch.Tensor, what: str) -> tuple:
    """(logits of ``vids``, their top-1 agreement with ``ref``, their relative error against the
    same model computing with its dequantized weights); RuntimeError naming ``what`` when that
    error exceeds KERNEL_TOL (a kernel computes something else than its weights say)."""
    got = logits_of(model, vids)
    with dequantized_weights(model):
        deq = logits_of(model, vids)
    err, tol = rel_error(got, deq), KERNEL_TOL[_activation_dtype(model)]
    if err > tol:
        raise RuntimeError(f"{what} disagrees with its dequantized weights: relative error {err:.3g} > {tol}")
    return got, float((got.argmax(-1) == ref.argmax(-1)).double().mean()), err


def _activation_dtype(model) -> torch.dtype:
    """The model's activation dtype: its input embeddings' (fp16 or bf16)."""
    return model.get_input_embeddings().weight.dtype


def _measure(name, model, device, batches, prefill_tokens, decode_kw, say, graph_modes=(True,),
             tolerate: bool = False) -> ModelSpeed:
    """Prefill and every decode step of ``model``. With ``tolerate`` (a peer), a step that fails
    (its own consistency check, a capture error) becomes a "failed" entry with the reason and the
    run goes on; otherwise the error propagates."""
    mem = torch.cuda.memory_allocated() if str(device).startswith("cuda") else 0
    say(f"{name}: prefill {prefill_tokens} tokens ...")
    ms = ModelSpeed(name, weight_bytes(model), mem, _tolerant(lambda: prefill_ms(model, prefill_tokens, device),
                                                              tolerate, say, f"{name} prefill", nan))
    for use_graph in graph_modes:
        for b in batches:
            say(f"{name}: decode batch {b} ({'graph' if use_graph else 'eager'}) ...")
            failed = lambda why, b=b: DecodeSpeed(b, nan, nan, "failed", nan, why)  # noqa: E731
            ms.decode.append(_tolerant(lambda b=b: decode_speed(model, b, device, say=say, use_graph=use_graph,
                                                                **decode_kw),
                                       tolerate, say, f"{name} decode batch {b}", failed))
    return ms


def _tolerant(run: Callable[[], object], tolerate: bool, say, what: str, failed):
    """run(), or when it raises and ``tolerate``: ``failed`` (a value, or a function of the reason)."""
    if not tolerate:
        return run()
    try:
        return run()
    except Exception as e:   # a peer's failure is a result: reported, and the run goes on
        why = f"failed: {type(e).__name__}: {str(e)[:300]}"
        say(f"WARNING: {what}: {why}")
        return failed(why) if callable(failed) else failed


def run_speed(layers: Optional[int] = None, batches: Sequence[int] = (1, 16), prefill_tokens: int = 2048,
              group_size: int = 128, symmetric: bool = True, device: str = "cuda", context: int = 256,
              iters: int = 50, prompt_len: int = 32, verify_tokens: int = 64, use_graph: bool = True,
              eager_too: bool = False, interleave_eager: bool = False,
              config_overrides=None, compile: bool = False, fuse=True, peers: Sequence[str] = (),
              print_fn: Optional[Callable[[str], None]] = print, model: str = "llama3-8b",
              lm_head_int4: bool = False, fused_layers_too: bool = False, dtype: str = "fp16",
              attention: str = "sdpa", fused_routers: bool = False) -> SpeedResult:
    """Measure fp16 and W4A16 on the Llama-3-8B shape, or another of MODELS (see the module docstring).

    Args:
        layers: decoder layers (default 32); batches: decode batch sizes;
        prefill_tokens: prompt length timed for prefill; group_size / symmetric: quantization;
        device: "cuda" (timings) or "cpu" (structure only: no graphs, times meaningless);
        context: KV cache slots (decode attends over all of them); iters: timed decode steps;
        prompt_len: tokens in the cache before the timed decode step;
        verify_tokens: prompt length of the logits check; use_graph: False times eager steps;
        eager_too: with use_graph, also time eager steps (both rows in the table and the JSON);
        interleave_eager: then also time eager steps of a second fp16 copy and the W4A16 model in
            alternating blocks (``w4a16.e2e.interleaved``: host drift cancels; needs memory for both);
        compile: run the decode step's forward through torch.compile (both models);
        fuse: True: fuse q/k/v and gate/up into one W4A16 GEMM each; "layers": also the activation
            and residual adds into the GEMMs' epilogues (``quantize_model(fuse=...)``);
        peers: names from ``w4a16.e2e.peers.PEERS`` (e.g. "torchao-int4"): each quantizes a fresh
            copy of the fp16 model its own way and is timed in the same harness, after W4A16 (they
            quantize ``nn.Linear`` layers only: on the MoE model their experts stay in fp16);
        config_overrides: dict of config fields (e.g. a tiny model for tests);
        model: "llama3-8b" or "qwen3-30b-a3b" (a mixture of experts; ``layers`` default 48).
        lm_head_int4: then quantize the W4A16 model's lm_head too (``quantize_model(skip=())``),
            check it against its dequantized weights again and time it as one more row (both
            lm_head choices in one run; quality: ``w4a16.e2e.run_quality(lm_head_too=True)``).
        dtype: "fp16" or "bf16": the 16-bit model's parameters and the W4A16 model's activations
            (the 16-bit baseline row is named by it). transformers' ``grouped_mm`` experts fall back
            to a per-expert loop with a host sync under torch.compile in fp16, so the MoE model's
            compiled baseline needs "bf16".
        attention: "sdpa" (transformers' SDPA attention), "packed-gqa" (:mod:`w4a16.attention`) or
            "fused-decode" (:mod:`w4a16.fused_attention`), for every model of the run alike
            (:func:`model_config`).
        fused_routers: every model's MoE routers on one kernel after their GEMM
            (:mod:`w4a16.moe.router`; the MoE model only).
        fused_layers_too: after the W4A16 model (fuse=True), move its decoder layers' activation and
            residual adds into the GEMM epilogues (``w4a16.fused_layer.fuse_decoder_layers``), check
            it against its dequantized weights and time it as one more row (before the 4-bit
            lm_head row, which then has both).
    Returns:
        SpeedResult; raises RuntimeError if a check fails.
    """
    from ..model import quantize_model
    from ..errors import expect
    from .peers import PEERS, check_peers

    check_peers(peers)
    expect(dtype in DTYPES, "dtype", f"one of {tuple(DTYPES)}", repr(dtype))
    torch_dtype = DTYPES[dtype]
    say = print_fn or (lambda s: None)
    kind = model
    dims = model_dims(kind, layers, **(config_overrides or {}))
    config = model_config(kind, dims, attention, fused_routers)
    t0 = time.perf_counter()
    model = build_model(config, device, torch_dtype)
    say(f"built {kind} ({dims['num_hidden_layers']} layers, hidden {dims['hidden_size']}) on {device} "
        f"in {time.perf_counter() - t0:.1f} s")
    g = torch.Generator().manual_seed(3)
    vids = torch.randint(0, config.vocab_size, (1, verify_tokens), generator=g).to(device)
    ref = logits_of(model, vids)
    decode_kw = dict(context=context, prompt_len=prompt_len, iters=iters, compile=compile)
    graph_modes = (True, False) if use_graph and eager_too else (use_graph,)
    dev_name = torch.cuda.get_device_name() if str(device).startswith("cuda") else "cpu"
    result = SpeedResult(dict(dims, model=kind, group_size=group_size, symmetric=symmetric, prefill_tokens=prefill_tokens,
                              context=context, verify_tokens=verify_tokens, compile=compile, fused=fuse,
                              lm_head_int4=lm_head_int4, dtype=dtype, attention=attention,
                              fused_routers=bool(fused_routers)),
                         dev_name, _versions(), {})
    result.models.append(_measure(dtype, model, device, batches, prefill_tokens, decode_kw, say, graph_modes))

    t0 = time.perf_counter()
    report = quantize_model(model, group_size=group_size, symmetric=symmetric, skip=("lm_head",),
                            dtype=torch_dtype, progress=False, fuse=fuse)
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
    say(f"{report} in {time.perf_counter() - t0:.1f} s")
    if not report.replaced:
        raise RuntimeError("quantize_model replaced no layer")
    got, top1, err = _against_dequantized(model, vids, ref, "W4A16 model")
    result.check = {"top1_vs_fp16": top1, "rel_err_vs_fp16": rel_error(got, ref), "rel_err_vs_dequantized": err,
                    "layers_quantized": len(report.replaced)}
    say("W4A16 logits on a {}-token prompt: top-1 agreement with {} {top1_vs_fp16:.3f}, relative error "
        "{rel_err_vs_fp16:.3g}; vs its own dequantized weights {rel_err_vs_dequantized:.3g}"
        .format(verify_tokens, dtype, **result.check))
    if result.check["rel_err_vs_fp16"] > FP16_TOL:
        # Random weights make a chaotic network: 4-bit rounding noise grows through 32 random layers,
        # so distance to the fp16 model says nothing here (quality is measured on a real model in
        # w4a16.e2e.quality). The kernel check above is the one that must hold.
        say(f"note: with random weights the W4A16 model drifts from fp16 (relative error "
            f"{result.check['rel_err_vs_fp16']:.3g}); expected, not a kernel error")
    name = f"w4a16 g{group_size} {'sym' if symmetric else 'asym'}"
    result.models.append(_measure(name, model, device, batches, prefill_tokens, decode_kw, say, graph_modes))
    if interleave_eager:
        from .interleaved import interleaved_eager
        say("eager decode, fp16 and W4A16 in alternating blocks ...")
        fp16 = build_model(config, device, torch_dtype)   # the same random weights as the 16-bit model above
        steps = min(5, context - prompt_len - 1)
        result.interleaved = [interleaved_eager({dtype: fp16, name: model}, b, device, context, prompt_len,
                                                steps=steps) for b in batches]
        del fp16
    if fused_layers_too:
        from ..fused_layer import fuse_decoder_layers

        fused_names = fuse_decoder_layers(model)
        if not fused_names:
            raise RuntimeError("fuse_decoder_layers converted no decoder layer")
        say(f"fused decoder layers: {len(fused_names)}")
        _, top1, err = _against_dequantized(model, vids, ref, "W4A16 model with fused decoder layers")
        result.check.update(fused_layers_top1_vs_fp16=top1, fused_layers_rel_err_vs_dequantized=err)
        name += ", fused layers"
        result.models.append(_measure(name, model, device, batches, prefill_tokens, decode_kw, say, graph_modes))
    if lm_head_int4:
        head = quantize_model(model, group_size=group_size, symmetric=symmetric, skip=(), dtype=torch_dtype,
                              progress=False, fuse=False)
        say(f"lm_head: {head}")
        if "lm_head" not in head.replaced:
            raise RuntimeError(f"quantize_model(skip=()) left the lm_head alone: {head.skipped.get('lm_head')}")
        _, top1, err = _against_dequantized(model, vids, ref, "W4A16 model with a 4-bit lm_head")
        result.check.update(lm_head_top1_vs_fp16=top1, lm_head_rel_err_vs_dequantized=err)
        result.models.append(_measure(name + ", 4-bit lm_head", model, device, batches, prefill_tokens, decode_kw,
                                      say, graph_modes))
    for peer in peers:
        say(f"{peer}: quantizing a fresh copy of the fp16 model ...")
        other = _tolerant(lambda: PEERS[peer](build_model(config, device, torch_dtype), group_size), True, say, peer,
                          lambda why: why)
        if isinstance(other, str):   # it could not even be built (a missing package, its quantizer failed)
            result.models.append(ModelSpeed(peer, 0, 0, nan, error=other))
            continue
        result.models.append(_measure(peer, other, device, batches, prefill_tokens, decode_kw, say, graph_modes,
                                      tolerate=True))
        del other
        if str(device).startswith("cuda"):
            torch.cuda.empty_cache()
    say(format_speed(result))
    return result


# ---------------------------------------------------------------------- output
def format_speed(result: SpeedResult) -> str:
    """A markdown table: one row per model and a speed-up row per model against fp16 (the first)."""
    from ..model import format_bytes

    steps = [(d.batch, d.mode) for d in result.models[0].decode]
    both = len(steps) != len({b for b, _ in steps})  # a batch timed in both modes: label every column
    c = result.config
    shape = {"llama3-8b": "Llama-3-8B", "qwen3-30b-a3b": "Qwen3-30B-A3B"}.get(c.get("model", "llama3-8b"), c.get("model"))
    head = (f"{shape} shape, {c['num_hidden_layers']} layers, {result.device} "
            f"(torch {result.versions['torch']}, transformers {result.versions['transformers']}, "
            f"triton {result.versions['triton']}); decode on a {c['context']}-slot KV cache"
            + (", decode step through torch.compile" if c.get("compile") else "")
            + (f", attention {c['attention']}" if c.get("attention", "sdpa") != "sdpa" else "")
            + (", fused routers" if c.get("fused_routers") else ""))
    cols = ["model", "weights", f"prefill {c['prefill_tokens']} ms"] + [
        f"decode b={b} tok/s" + (f" ({m})" if both else "") for b, m in steps]
    lines = [head, "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for m in result.models:
        if m.error:
            lines.append("| " + " | ".join([m.name] + ["failed"] * (len(cols) - 1)) + " |")
            continue
        dec = ["failed" if d.mode == "failed" else
               f"{d.tokens_per_s:.1f}" + ("" if d.mode == "cuda-graph" or both else f" ({d.mode})") for d in m.decode]
        lines.append("| " + " | ".join([m.name, format_bytes(m.weight_bytes), _num(m.prefill_ms, ".2f")] + dec) + " |")
    a = result.models[0]
    for i, b in enumerate(result.models[1:]):
        label = f"W4A16 / {a.name}" if i == 0 else f"{b.name} / {a.name}"
        if b.error:
            lines.append(f"| {label} | " + " | ".join(["failed"] * (len(cols) - 1)) + " |")
            continue
        ratio = [f"{a.weight_bytes / b.weight_bytes:.2f}x smaller", _num(a.prefill_ms / b.prefill_ms, ".2f", "x")]
        ratio += [_decode_ratio(da, db) for da, db in zip(a.decode, b.decode)]
        lines.append(f"| {label} | " + " | ".join(ratio) + " |")
    notes = [f"{m.name}: {m.error}" for m in result.models if m.error]
    notes += [f"b={db.batch} {b.name} / {a.name}: {db.mode} step against a{'n' if da.mode[0] in 'ae' else ''} "
              f"{da.mode} one (the other model's capture failed): not a like-for-like ratio"
              for b in result.models[1:] if not b.error for da, db in zip(a.decode, b.decode)
              if "failed" not in (da.mode, db.mode) and da.mode != db.mode]
    notes += [f"b={d.batch} {m.name}: {d.note}" for m in result.models for d in m.decode if d.note]
    layers = int(c["num_hidden_layers"])
    split = [f"{m.name} b={d.batch}: " + ", ".join(f"{k} {v:.2f}" for k, v in d.kernel_ms.items())
             + (f"; {sum(d.kernels.values()):.0f} kernels per step, {kernels_per_layer(d, layers):.1f} per layer"
                if d.kernels else "")
             for m in result.models for d in m.decode if d.kernel_ms]
    if split:
        lines += ["", "device ms per decode step by kernel kind, and kernel launches (profiled eager steps):"] + split
    for it in result.interleaved:
        names = list(it.step_ms)
        lines.append(f"eager b={it.batch}, alternating blocks ({it.blocks} x {it.steps} steps): "
                     + ", ".join(f"{n} {it.step_ms[n]:.2f} ms" for n in names)
                     + "".join(f"; {n} / {names[0]} tokens/s {v:.2f}x" for n, v in it.speedup.items()))
    return "\n".join(lines + [f"note: {n}" for n in notes])


def _decode_ratio(base: DecodeSpeed, other: DecodeSpeed) -> str:
    """other / base tokens/s; "failed" when either failed; marked when the two steps ran in
    different modes (one captured, one eager)."""
    r = _num(other.tokens_per_s / base.tokens_per_s, ".2f", "x")
    return r if r == "failed" or base.mode == other.mode else f"{r} ({other.mode} vs {base.mode})"


def _num(v: float, fmt: str, unit: str = "") -> str:
    """v formatted, or "failed" for the NaN a failed measurement leaves."""
    return "failed" if v != v else f"{v:{fmt}}{unit}"


def _nan_to_none(v):
    """The JSON form: a failed measurement's NaN becomes null (strict JSON has no NaN)."""
    if isinstance(v, float) and v != v:
        return None
    if isinstance(v, dict):
        return {k: _nan_to_none(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_nan_to_none(x) for x in v]
    return v


def write_json(result: SpeedResult, out_dir: str) -> str:
    """Write ``speed.json`` into ``out_dir`` (created); returns its path."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "speed.json")
    with open(path, "w") as f:
        json.dump(_nan_to_none(asdict(result)), f, indent=2)
    return path


def main(argv: Optional[Sequence[str]] = None) -> SpeedResult:
    p = argparse.ArgumentParser(description="fp16 vs W4A16 on a Llama-3-8B- or Qwen3-30B-A3B-shaped model "
                                            "(random weights)")
    p.add_argument("--model", choices=tuple(MODELS), default="llama3-8b",
                   help="llama3-8b (dense) or qwen3-30b-a3b (128 experts, 8 per token)")
    p.add_argument("--layers", type=int, default=None, help="decoder layers (default: the model's, 32 or 48)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16], help="decode batch sizes")
    p.add_argument("--prefill-tokens", type=int, default=2048)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--asym", action="store_true", help="asymmetric (zero points) instead of symmetric")
    p.add_argument("--context", type=int, default=256, help="KV cache slots for decode")
    p.add_argument("--iters", type=int, default=50, help="timed decode steps")
    p.add_argument("--no-graph", action="store_true", help="time eager decode steps")
    p.add_argument("--eager-too", action="store_true", help="time eager decode steps besides graph-replayed ones")
    p.add_argument("--interleave-eager", action="store_true",
                   help="also time eager steps of fp16 and W4A16 in alternating blocks (both models in memory)")
    p.add_argument("--compile", action="store_true", help="torch.compile the decode step's forward (both models)")
    p.add_argument("--no-fuse", action="store_true", help="one W4A16 GEMM per projection (no fused q/k/v, gate/up)")
    p.add_argument("--fuse-layers", action="store_true",
                   help="SiLU(gate)*up and the residual adds in the GEMM epilogues (quantize_model(fuse='layers'))")
    p.add_argument("--fuse-layers-too", action="store_true",
                   help="then fuse the W4A16 model's decoder layers that way and time it as one more row")
    p.add_argument("--peers", nargs="*", default=[], metavar="NAME",
                   help="other int4 implementations timed in the same harness (torchao-int4)")
    p.add_argument("--lm-head-int4", action="store_true",
                   help="also time the W4A16 model with its lm_head quantized (one more row)")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="fp16",
                   help="the 16-bit model and the W4A16 model's activations (the MoE model's compiled "
                        "16-bit baseline needs bf16: transformers' grouped_mm experts fall back to a "
                        "host-synchronizing loop under torch.compile in fp16)")
    p.add_argument("--attention", choices=ATTENTIONS, default="sdpa",
                   help="every model's attention: transformers' SDPA, or packed-gqa (w4a16.attention: a decode "
                        "token's query heads folded onto the cache's heads, no repeated cache), or fused-decode "
                        "(w4a16.fused_attention: a decode step's rotary embedding, cache write and attention in "
                        "one kernel)")
    p.add_argument("--fused-routers", action="store_true",
                   help="every model's MoE routers: softmax, top-k and renormalization in one kernel "
                        "(w4a16.moe.router)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", default=None, help="folder for speed.json")
    a = p.parse_args(argv)
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("no CUDA device: this benchmark needs a GPU (--device cpu only checks that it runs)")
    result = run_speed(a.layers, a.batches, a.prefill_tokens, a.group_size, not a.asym, a.device, a.context,
                       a.iters, use_graph=not a.no_graph, compile=a.compile,
                       fuse="layers" if a.fuse_layers else not a.no_fuse,
                       eager_too=a.eager_too, interleave_eager=a.interleave_eager, peers=a.peers, model=a.model,
                       lm_head_int4=a.lm_head_int4, fused_layers_too=a.fuse_layers_too, dtype=a.dtype,
                       attention=a.attention, fused_routers=a.fused_routers)
    if a.out:
        print(f"wrote {write_json(result, a.out)}")
    return result


if __name__ == "__main__":
    main()
