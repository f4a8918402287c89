"""Decoder layers on fewer kernels: the GEMM epilogues (``w4a16.epilogue``) inside Llama-, Qwen2-,
Qwen3- and Mistral-style layers.

After :func:`w4a16.fused.fuse_projections`, a decoder layer still runs SiLU(gate) * up and the two
residual adds as kernels of their own, each reading and writing the activations once more.
:func:`fuse_decoder_layers` moves them into the GEMMs:

* the MLP becomes a :class:`W4A16GatedMLP`: one GEMM over the gate and up rows paired in the
  silu_mul order (``gate_up_paired``) writes SiLU(gate) * up [..., I], and the down GEMM adds the
  residual;
* ``self_attn.o_proj`` becomes a :class:`DeferredW4A16Linear`: the attention module's own call of
  it passes the attention output through, and the layer runs the projection with the residual;
* the layer's ``forward`` (its class is swapped for a subclass) is the same arithmetic as the
  model's: ``h = x + o(attn(norm1(x)))``, ``y = h + mlp(norm2(h))``, with the two adds in the
  GEMMs' fp32 epilogues, and norm2 (an RMSNorm of the classes in :data:`NORM_CLASSES`, its
  weight in the activations' dtype) in the o projection's too (the "residual_rmsnorm" epilogue
  writes h and norm2(h));
* norm1 of such a class moves into the fused q/k/v projection (``self_attn.qkv_proj`` becomes a
  :class:`NormedFusedW4A16Linear`, which reads its input RMS-normalized: ``gemm(input_norm=...)``),
  and the attention module gets the layer's input as it is.

The attention module (rotary embedding, cache, attention kernel) is the model's own, called with
the layer's keyword arguments as the model's layer calls it.

Only the layer classes named in :data:`LAYER_CLASSES` (whose forward is exactly that arithmetic)
with W4A16 projections, a fused gate/up (``gate_up_proj`` of two equal halves) and a SiLU MLP are
converted. In the state dict the paired gate/up weight is ``mlp.gate_up_paired`` (not
``mlp.gate_up_proj``, whose rows are [gate; up]): a state dict of one form never loads silently
into the other.
"""
from __future__ import annotations

import inspect
from typing import List, Optional

import torch
from torch import nn

from .epilogue import PAIR_ROWS, interleave_rows, pair_gate_up
from .fused import FusedW4A16Linear
from .mixins import mixed_class
from .nn import W4A16Linear
from .weight import QuantizedWeight

LAYER_CLASSES = ("LlamaDecoderLayer", "Qwen2DecoderLayer", "Qwen3DecoderLayer", "MistralDecoderLayer")
MLP_CLASSES = ("LlamaMLP", "Qwen2MLP", "Qwen3MLP", "MistralMLP")
# RMSNorm modules computing weight * (h * rsqrt(mean(h^2) + variance_epsilon)).to(h.dtype), which
# is w4a16.epilogue.rms_norm
NORM_CLASSES = ("LlamaRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "MistralRMSNorm")


class DeferredW4A16Linear(W4A16Linear):
    """An output projection whose GEMM the decoder layer runs: ``forward(x)`` returns x as it is
    (the attention module calls it last), :meth:`project` computes x @ W^T + bias + residual."""

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None,
                epilogue: Optional[str] = None) -> torch.Tensor:
        return x

    def project(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x [..., in_features] -> [..., out_features] (+ residual, added in fp32 before the cast)."""
        return W4A16Linear.forward(self, x, residual)

    def project_norm(self, x: torch.Tensor, residual: torch.Tensor, norm: nn.Module) -> tuple:
        """(h, norm(h)) for h = x @ W^T + bias + residual, x [..., in_features], residual and both
        results [..., out_features]; ``norm`` an RMSNorm module of :data:`NORM_CLASSES` (its weight
        [out_features] in x's dtype)."""
        return W4A16Linear.forward(self, x, residual, "residual_rmsnorm", norm.weight, float(norm.variance_epsilon))


class NormedFusedW4A16Linear(FusedW4A16Linear):
    """A fused projection whose input is normalized by :attr:`input_norm` (an RMSNorm module of
    :data:`NORM_CLASSES`, held outside the module tree: it stays its decoder layer's) as the GEMM
    reads it."""

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None,
                epilogue: Optional[str] = None) -> torch.Tensor:
        """x [..., in_features] un-normalized -> [..., out_features] = norm(x) @ W^T + bias."""
        norm = self.__dict__["input_norm"]
        if type(norm).__name__ not in NORM_CLASSES or norm.weight.dtype != x.dtype:
            return W4A16Linear.forward(self, norm(x), residual, epilogue)   # the module itself computes it
        return W4A16Linear.forward(self, x, residual, epilogue, input_norm=(norm.weight, float(norm.variance_epsilon)))


class W4A16GatedMLP(nn.Module):
    """down(SiLU(gate(x)) * up(x)) (+ residual) in two GEMMs.

    gate_up_paired: a W4A16Linear [2I, H] whose rows are the gate and up rows in the silu_mul order
    (``w4a16.epilogue.interleave_rows``); down_proj: a W4A16Linear [H, I]."""

    def __init__(self, gate_up_paired: W4A16Linear, down_proj: W4A16Linear):
        super().__init__()
        self.gate_up_paired = gate_up_paired
        self.down_proj = down_proj
        self.intermediate_size = gate_up_paired.out_features // 2

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x [..., H] in the module's dtype -> [..., H] (+ residual [..., H])."""
        return self.down_proj(self.gate_up_paired(x, epilogue="silu_mul"), residual)


class FusedDecoderLayer(nn.Module):
    """The forward of a converted decoder layer (mixed into a subclass of the layer's own class)."""

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if args:   # positional arguments after hidden_states: by name, as the layer's own forward takes them
            bound = inspect.signature(super().forward).bind(hidden_states, *args, **kwargs).arguments
            kwargs = {**{k: v for k, v in bound.items() if k not in ("hidden_states", "kwargs")},
                      **bound.get("kwargs", {})}
        normed_in_qkv = type(getattr(self.self_attn, "qkv_proj", None)) is NormedFusedW4A16Linear
        attn_in = hidden_states if normed_in_qkv else self.input_layernorm(hidden_states)
        attn_out, _ = self.self_attn(hidden_states=attn_in, **kwargs)
        norm = self.post_attention_layernorm
        if type(norm).__name__ in NORM_CLASSES and norm.weight.dtype == attn_out.dtype:
            hidden_states, normed = self.self_attn.o_proj.project_norm(attn_out, hidden_states, norm)
        else:
            hidden_states = self.self_attn.o_proj.project(attn_out, hidden_states)
            normed = norm(hidden_states)
        return self.mlp(normed, hidden_states)


def paired_gate_up(fused: FusedW4A16Linear) -> W4A16Linear:
    """A W4A16Linear [2I, H] with the rows of a fused [gate; up] projection in the silu_mul order
    (``w4a16.epilogue.pair_gate_up`` of its two halves)."""
    I = fused.splits[0]
    w = fused.weight_q
    codes, scales, zeros = w.plain_codes(), w.params.scales, w.params.zeros
    gate, up = (QuantizedWeight.from_plain(codes[rows], scales[rows], None if zeros is None else zeros[rows],
                                           w.group_size) for rows in (slice(0, I), slice(I, 2 * I)))
    bias = None if fused.bias is None else interleave_rows(*fused.bias.detach().split(I))
    return W4A16Linear.from_quantized(pair_gate_up(gate, up), bias, backend=fused.backend)


def why_not_fused(layer: nn.Module) -> Optional[str]:
    """None when :func:`fuse_decoder_layers` converts ``layer``, else the reason."""
    if type(layer).__name__ not in LAYER_CLASSES:
        return f"{type(layer).__name__} is not one of {LAYER_CLASSES}"
    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    if attn is None or type(getattr(attn, "o_proj", None)) is not W4A16Linear:
        return "self_attn.o_proj is not a W4A16Linear"
    if type(mlp).__name__ not in MLP_CLASSES:
        return f"mlp is a {type(mlp).__name__}, not one of {MLP_CLASSES}"
    gu = getattr(mlp, "gate_up_proj", None)
    if not isinstance(gu, FusedW4A16Linear) or len(gu.splits) != 2 or gu.splits[0] != gu.splits[1]:
        return "mlp has no fused gate_up_proj of two equal halves (quantize with fuse=True first)"
    if gu.splits[0] % PAIR_ROWS:
        return f"intermediate size {gu.splits[0]} is not a multiple of {PAIR_ROWS}"
    if type(getattr(mlp, "down_proj", None)) is not W4A16Linear:
        return "mlp.down_proj is not a W4A16Linear"
    act = getattr(mlp, "act_fn", None)
    if not (isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation"):
        return f"the MLP's activation is {type(act).__name__}, not SiLU"
    return None


def fuse_decoder_layers(model: nn.Module) -> List[str]:
    """Convert, in place, every decoder layer of ``model`` that :func:`why_not_fused` accepts (see
    the module docstring); returns their names."""
    done = []
    for name, layer in list(model.named_modules()):
        if why_not_fused(layer) is not None:
            continue
        mlp = layer.mlp
        layer.mlp = W4A16GatedMLP(paired_gate_up(mlp.gate_up_proj), mlp.down_proj)
        layer.self_attn.o_proj.__class__ = DeferredW4A16Linear
        qkv = getattr(layer.self_attn, "qkv_proj", None)
        norm = getattr(layer, "input_layernorm", None)
        if (type(qkv) is FusedW4A16Linear and len(qkv.splits) == 3 and type(norm).__name__ in NORM_CLASSES
                and norm.weight.shape == (qkv.in_features,)):
            qkv.__class__ = NormedFusedW4A16Linear
            qkv.__dict__["input_norm"] = norm
        layer.__class__ = mixed_class(FusedDecoderLayer, type(layer), "W4A16Fused")
        done.append(name)
    return done
