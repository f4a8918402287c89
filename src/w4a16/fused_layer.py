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
  and the attention module gets the layer's input as it is;
* the norm that reads a layer's output (the next layer's norm1, or the model's final norm after
  the last layer; of a class in :data:`NORM_CLASSES`) moves into the layer's down projection: the
  "residual_rmsnorm" epilogue writes the layer's output y and that norm of it, and hands
  (y, norm(y)) to the norm module (its class gets :class:`HandedRMSNorm` mixed in), which returns
  the handed norm when it is called with exactly that y (the fused q/k/v projection asks it first).
  Anything else between the layers (a hook that replaces the output, a layer called on its own)
  finds nothing handed for its tensor, and the norm is computed as before.

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


def is_rms_norm(module) -> bool:
    """Whether ``module`` is an RMSNorm of :data:`NORM_CLASSES` (handed or not)."""
    return getattr(type(module), "norm_class", type(module).__name__) in NORM_CLASSES


class HandedRMSNorm(nn.Module):
    """Mixed into an RMSNorm of :data:`NORM_CLASSES` whose input a fused layer's down projection
    normalizes in its epilogue: ``forward(x)`` returns the norm handed for x (:func:`take_handed`),
    else computes it."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        n = take_handed(self, hidden_states)
        return n if n is not None else super().forward(hidden_states)


def take_handed(norm: nn.Module, x: torch.Tensor) -> Optional[torch.Tensor]:
    """The normalized tensor handed to ``norm`` together with exactly ``x`` (the same tensor object),
    else None; what was handed is dropped either way (nothing is held between calls)."""
    if not isinstance(norm, HandedRMSNorm):
        return None
    pair = norm.__dict__["w4a16_handed"]
    if pair is None:
        return None
    norm.__dict__["w4a16_handed"] = None
    return pair[1] if pair[0] is x else None


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
        normed = take_handed(norm, x)
        if normed is not None:   # the previous layer's down projection normalized x
            return W4A16Linear.forward(self, normed, residual, epilogue)
        if not is_rms_norm(norm) or norm.weight.dtype != x.dtype:
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

    def forward_norm(self, x: torch.Tensor, residual: torch.Tensor, norm: nn.Module) -> tuple:
        """(y, norm(y)) for y = forward(x, residual): x, residual, both results [..., H]; ``norm`` an
        RMSNorm of :data:`NORM_CLASSES` (weight [H] in x's dtype), run in the down GEMM's epilogue."""
        return self.down_proj(self.gate_up_paired(x, epilogue="silu_mul"), residual, "residual_rmsnorm", norm.weight,
                              float(norm.variance_epsilon))


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
        if is_rms_norm(norm) and norm.weight.dtype == attn_out.dtype:
            hidden_states, normed = self.self_attn.o_proj.project_norm(attn_out, hidden_states, norm)
        else:
            hidden_states = self.self_attn.o_proj.project(attn_out, hidden_states)
            normed = norm(hidden_states)
        nxt = self.__dict__["w4a16_next_norm"]
        if isinstance(nxt, HandedRMSNorm) and nxt.weight.dtype == normed.dtype:
            out, out_normed = self.mlp.forward_norm(normed, hidden_states, nxt)
            nxt.__dict__["w4a16_handed"] = (out, out_normed)
            return out
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
        if (type(qkv) is FusedW4A16Linear and len(qkv.splits) == 3 and is_rms_norm(norm)
                and norm.weight.shape == (qkv.in_features,)):
            qkv.__class__ = NormedFusedW4A16Linear
            qkv.__dict__["input_norm"] = norm
        layer.__class__ = mixed_class(FusedDecoderLayer, type(layer), "W4A16Fused")
        layer.__dict__["w4a16_next_norm"] = None   # hand_over_norms links the layers of a list
        done.append(name)
    hand_over_norms(model)
    return done


def hand_over_norms(model: nn.Module) -> None:
    """Link each converted layer in a ``layers`` list to the norm that reads its output (see the
    module docstring): the next layer's ``input_layernorm`` when that layer is converted, or the
    list's owner's ``norm`` after the last layer, where it is an RMSNorm of :data:`NORM_CLASSES`
    over the layer's hidden size."""
    for owner in model.modules():
        layers = getattr(owner, "layers", None)
        if not isinstance(layers, nn.ModuleList):
            continue
        for i, layer in enumerate(layers):
            if not isinstance(layer, FusedDecoderLayer):
                continue
            if i + 1 < len(layers):
                nxt = layers[i + 1].input_layernorm if isinstance(layers[i + 1], FusedDecoderLayer) else None
            else:
                nxt = getattr(owner, "norm", None)
            hidden = layer.mlp.down_proj.out_features
            if nxt is None or not is_rms_norm(nxt) or tuple(nxt.weight.shape) != (hidden,):
                continue
            if not isinstance(nxt, HandedRMSNorm):
                nxt.__class__ = mixed_class(HandedRMSNorm, type(nxt), "W4A16Handed", norm_class=type(nxt).__name__)
                nxt.__dict__["w4a16_handed"] = None
            layer.__dict__["w4a16_next_norm"] = nxt   # not a submodule: its owner registers it
