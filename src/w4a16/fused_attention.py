"""A decode step's attention in one kernel: rotary embedding, cache write and attention fused.

In transformers' Llama-style attention, one decode token costs about five small kernels besides
the attention itself: the rotary embedding of q and of k, the two ``index_copy_`` writes into the
static cache, and the cache's position counter (``cumulative_length += 1``), each a launch and a
ramp. :func:`decode_attention` does all of it in one launch
(``w4a16.backends.triton.decode_attention``), on the cache's own grouped heads.

    from w4a16.fused_attention import use_fused_decode_attention
    use_fused_decode_attention(model)   # a transformers Llama / Qwen2 / Qwen3 / Mistral model

converts every attention module of :data:`ATTENTION_CLASSES` in place (the 16-bit and the W4A16
model alike: q, k and v come from the module's own projections, views of one GEMM where they are
fused; Qwen3's per-head RMSNorms of q and k run in the kernel too). Its forward takes the fused
path for one query token on an initialized static cache layer (transformers' ``StaticLayer``)
with a mask shared by the heads; every other call (prefill, a dynamic cache, training, ...) is
the model's own forward. The attended slots are 0..pos (pos the
new token's slot, kept by the cache): a causal step; a mask, where the model gives one, is applied
on top (padding, sliding windows).
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import nn

from .errors import expect, fail
from .mixins import mixed_class

ATTENTION_CLASSES = ("LlamaAttention", "Qwen2Attention", "MistralAttention", "Qwen3Attention", "Qwen3MoeAttention")
# per-head RMSNorms of q and k (Qwen3) computing weight * (x * rsqrt(mean(x^2) + eps)).to(x.dtype)
HEAD_NORM_CLASSES = ("Qwen3RMSNorm", "Qwen3MoeRMSNorm")
_MASKED_IMPLEMENTATIONS = ("sdpa", "eager", "w4a16_packed_gqa")   # 4-D [B, 1, Q, S] masks or None
HEAD_DIMS = (16, 32, 64, 128, 256)


def _fits(q, k, v, cos, sin, keys, values, length, mask, q_norm, k_norm) -> bool:
    """Whether every check of :func:`check_decode_attention` holds (no message formatted: an eager
    decode step calls this once per layer)."""
    if keys.dim() != 4 or keys.dtype not in (torch.float16, torch.bfloat16) or keys.stride(3) != 1:
        return False
    B, Hkv, S, D = keys.shape
    dt, dev = keys.dtype, keys.device
    if (D not in HEAD_DIMS or values.shape != keys.shape or values.stride() != keys.stride() or q.dim() != 2
            or q.shape[0] != B or q.shape[1] % (Hkv * D)):
        return False
    if k.shape != (B, Hkv * D) or v.shape != (B, Hkv * D) or cos.shape != (B, D) or sin.shape != (B, D):
        return False
    if any(t.dtype != dt or t.stride(-1) != 1 or t.device != dev for t in (q, k, v, cos, sin, values)):
        return False
    if length.dtype != torch.int64 or length.dim() != 0 or length.device != dev:
        return False
    if mask is not None and (mask.dim() != 2 or mask.shape[0] not in (1, B) or mask.shape[1] != S
                             or mask.stride(1) != 1 or not (mask.dtype == torch.bool or mask.dtype.is_floating_point)
                             or mask.device != dev):
        return False
    if (q_norm is None) != (k_norm is None):
        return False
    return q_norm is None or all(t.shape == (D,) and t.stride(0) == 1 and t.dtype == dt and t.device == dev
                                 for t in (q_norm, k_norm))


def check_decode_attention(q, k, v, cos, sin, keys, values, length, mask, q_norm=None, k_norm=None) -> None:
    """Raise W4A16Error unless the arguments fit :func:`decode_attention` (see there)."""
    if _fits(q, k, v, cos, sin, keys, values, length, mask, q_norm, k_norm):
        return
    expect(keys.dim() == 4, "keys", "a 4-D tensor [B, Hkv, S, D]", tuple(keys.shape))
    B, Hkv, S, D = keys.shape
    expect(D in HEAD_DIMS, "keys.shape[3] (head dim)", f"one of {HEAD_DIMS}", D)
    expect(keys.dtype in (torch.float16, torch.bfloat16), "keys.dtype", "float16 or bfloat16", keys.dtype)
    expect(values.shape == keys.shape and values.stride() == keys.stride(), "values",
           f"shape {tuple(keys.shape)} and strides {keys.stride()} (those of keys)",
           f"{tuple(values.shape)}, {values.stride()}")
    expect(keys.stride(3) == 1, "keys.stride(3)", 1, keys.stride(3))
    expect(q.dim() == 2 and q.shape[0] == B and q.shape[1] % (Hkv * D) == 0, "q",
           f"[{B}, Hq * {D}] with Hq a multiple of {Hkv}", tuple(q.shape))
    for name, t, shape in (("k", k, (B, Hkv * D)), ("v", v, (B, Hkv * D)), ("cos", cos, (B, D)),
                           ("sin", sin, (B, D))):
        expect(tuple(t.shape) == shape, f"{name}.shape", shape, tuple(t.shape))
    for name, t in (("q", q), ("k", k), ("v", v), ("cos", cos), ("sin", sin), ("values", values)):
        expect(t.dtype == keys.dtype, f"{name}.dtype", keys.dtype, t.dtype)
        expect(t.stride(-1) == 1, f"{name}.stride(-1)", 1, t.stride(-1))
        expect(t.device == keys.device, f"{name}.device", keys.device, t.device)
    expect(length.dtype == torch.int64 and length.dim() == 0 and length.device == keys.device, "length",
           f"an int64 scalar tensor on {keys.device}", f"{length.dtype} [{list(length.shape)}] on {length.device}")
    if mask is not None:
        expect(mask.dim() == 2 and mask.shape[0] in (1, B) and mask.shape[1] == S and mask.stride(1) == 1,
               "mask", f"[{B} or 1, {S}] with contiguous rows", f"{tuple(mask.shape)}, strides {mask.stride()}")
        expect(mask.dtype == torch.bool or mask.dtype.is_floating_point, "mask.dtype", "bool or floating",
               mask.dtype)
        expect(mask.device == keys.device, "mask.device", keys.device, mask.device)
    expect((q_norm is None) == (k_norm is None), "q_norm, k_norm", "both given or neither",
           f"q_norm {'given' if q_norm is not None else 'None'}, k_norm {'given' if k_norm is not None else 'None'}")
    for name, t in (("q_norm", q_norm), ("k_norm", k_norm)):
        if t is not None:
            expect(tuple(t.shape) == (D,) and t.stride(0) == 1, f"{name}.shape", f"({D},) contiguous", tuple(t.shape))
            expect(t.dtype == keys.dtype and t.device == keys.device, name, f"{keys.dtype} on {keys.device}",
                   f"{t.dtype} on {t.device}")
    fail("decode_attention's arguments", "the shapes, dtypes, strides and devices of its docstring",
         "a combination the checks above do not name")   # _fits and the checks disagree: never silent


def decode_attention_reference(q, k, v, cos, sin, keys, values, length, mask, scale: float, q_norm=None,
                               k_norm=None, norm_eps=(0.0, 0.0)) -> torch.Tensor:
    """:func:`decode_attention` in torch (fp32 arithmetic, the rounding points of the kernel;
    reads ``length`` on the host)."""
    B, Hkv, S, D = keys.shape
    G = q.shape[1] // (Hkv * D)
    pos = int(length)
    if pos >= S:   # no slot left (the kernel's answer: nothing written, NaN)
        length += 1
        return torch.full((B, Hkv * G * D), float("nan"), dtype=keys.dtype, device=keys.device)
    cos32, sin32 = cos.float()[:, None, :], sin.float()[:, None, :]

    def rope(x, w, eps):   # [B, H, D], the head norm's weight [D] or None
        if w is not None:
            x32 = x.float()
            x = (w.float() * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype).float())
            x = x.to(keys.dtype)
        x = x.float()
        return (x * cos32 + torch.cat([-x[..., D // 2:], x[..., :D // 2]], -1) * sin32).to(keys.dtype)

    keys[:, :, pos] = rope(k.view(B, Hkv, D), k_norm, norm_eps[1])
    values[:, :, pos] = v.view(B, Hkv, D)
    qr = rope(q.view(B, Hkv * G, D), q_norm, norm_eps[0]).view(B, Hkv, G, D).float()
    s = qr @ keys[:, :, :pos + 1].float().transpose(-1, -2) * scale          # [B, Hkv, G, pos + 1]
    if mask is not None:
        m = mask[:, :pos + 1].expand(B, pos + 1)[:, None, None, :]
        s = s.masked_fill(~m, float("-inf")) if mask.dtype == torch.bool else s + m.float()
    p = torch.softmax(s, -1)
    out = p.to(keys.dtype).float() @ values[:, :, :pos + 1].float()
    length += 1
    return out.to(keys.dtype).reshape(B, Hkv * G * D)


@torch.library.custom_op("w4a16::decode_attention", mutates_args=("keys", "values", "length"))
def decode_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                        keys: torch.Tensor, values: torch.Tensor, length: torch.Tensor, mask: Optional[torch.Tensor],
                        scale: float, q_norm: Optional[torch.Tensor], k_norm: Optional[torch.Tensor],
                        norm_eps: List[float]) -> torch.Tensor:
    """:func:`decode_attention` as a custom op (opaque to torch.compile, captured by CUDA graphs)."""
    from .backends.triton.env import interpreting

    if q.is_cuda or interpreting():
        from .backends.triton.decode_attention import decode_attention as kernel

        return kernel(q, k, v, cos, sin, keys, values, length, mask, scale, q_norm, k_norm, norm_eps)
    return decode_attention_reference(q, k, v, cos, sin, keys, values, length, mask, scale, q_norm, k_norm, norm_eps)


@decode_attention_op.register_fake
def _decode_attention_fake(q, k, v, cos, sin, keys, values, length, mask, scale, q_norm, k_norm, norm_eps):
    return q.new_empty(q.shape)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     keys: torch.Tensor, values: torch.Tensor, length: torch.Tensor,
                     mask: Optional[torch.Tensor] = None, scale: Optional[float] = None,
                     q_norm: Optional[torch.Tensor] = None, k_norm: Optional[torch.Tensor] = None,
                     norm_eps: Tuple[float, float] = (1e-6, 1e-6)) -> torch.Tensor:
    """One decode token's attention with its rotary embedding and cache write (module docstring).

    q [B, Hq*D], k and v [B, Hkv*D] (the projections' outputs, heads in order, last dim
    contiguous), cos and sin [B, D] (the rotary embedding at the new token's position, rows may
    share one), keys and values [B, Hkv, S, D] (the static cache, updated in place at slot
    ``length``), length int64 [] (the new token's slot; advanced by one; a full cache, length >= S,
    gives NaN and writes nothing), mask None or [B or 1, S] (bool, True attends; or additive),
    scale (default D ** -0.5); all fp16 or all bf16 (the mask aside), one device, D in
    :data:`HEAD_DIMS`; q_norm and k_norm (both or neither) [D]: each head of q and of k
    RMS-normalized with these weights before the rotary embedding, eps ``norm_eps`` (q's, k's), as
    Qwen3's attention does -> out [B, Hq*D]: softmax(q_r k_r^T * scale + mask) V
    over slots 0..length, q_r and k_r roped (rotate_half convention)."""
    check_decode_attention(q, k, v, cos, sin, keys, values, length, mask, q_norm, k_norm)
    scale = keys.shape[-1] ** -0.5 if scale is None else float(scale)
    return decode_attention_op(q, k, v, cos, sin, keys, values, length, mask, scale, q_norm, k_norm,
                               [float(e) for e in norm_eps])


class FusedDecodeAttention(nn.Module):
    """The forward of a converted attention module (mixed into a subclass of its own class):
    :func:`decode_attention` for one query token on a static cache, else the class's own."""

    def forward(self, hidden_states: torch.Tensor, position_embeddings=None, attention_mask=None, *args, **kwargs):
        """hidden_states [B, Q, H] -> (attention output after o_proj [B, Q, H], None on the fused path)."""
        fast = None if args else _fused_inputs(self, hidden_states, position_embeddings, attention_mask, kwargs)
        if fast is None:
            return super().forward(hidden_states, position_embeddings, attention_mask, *args, **kwargs)
        layer, mask = fast
        B = hidden_states.shape[0]
        q, k, v = (proj(hidden_states).reshape(B, -1) for proj in (self.q_proj, self.k_proj, self.v_proj))
        cos, sin = (t.reshape(t.shape[0], -1).expand(B, -1) for t in position_embeddings)
        qn, kn = getattr(self, "q_norm", None), getattr(self, "k_norm", None)
        norms = {} if qn is None else dict(q_norm=qn.weight, k_norm=kn.weight,
                                           norm_eps=(qn.variance_epsilon, kn.variance_epsilon))
        out = decode_attention(q, k, v, cos, sin, layer.keys, layer.values, layer.cumulative_length, mask,
                               self.scaling, **norms)
        return self.o_proj(out.view(B, 1, -1)), None


def _fused_inputs(module: nn.Module, x: torch.Tensor, position_embeddings, mask, kwargs: dict):
    """(the cache layer, the mask as [B or 1, S] or None) when ``module``'s call takes the fused
    path, else None."""
    if (module.training or x.dim() != 3 or x.shape[1] != 1 or position_embeddings is None
            or kwargs.get("output_attentions")):
        return None
    cache = kwargs.get("past_key_values", kwargs.get("cache"))
    layers = getattr(cache, "layers", None)
    if layers is None or not 0 <= module.layer_idx < len(layers):
        return None
    layer = layers[module.layer_idx]
    if type(layer).__name__ != "StaticLayer" or not getattr(layer, "is_initialized", False):
        return None
    keys = layer.keys
    if keys.dtype != x.dtype or keys.shape[0] != x.shape[0] or keys.shape[-1] not in HEAD_DIMS:
        return None
    if any(getattr(module, n, None) is not None and getattr(module, n).weight.dtype != x.dtype
           for n in ("q_norm", "k_norm")):
        return None
    if module.config._attn_implementation not in _MASKED_IMPLEMENTATIONS:
        return None
    if mask is None:
        window = getattr(module, "sliding_window", None) or getattr(module.config, "sliding_window", None)
        return None if window else (layer, None)
    if mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[2] != 1 or mask.shape[3] != keys.shape[2]:
        return None
    mask = mask[:, 0, 0, :]
    return (layer, mask) if mask.stride(-1) == 1 else None


def why_not_fused_attention(module: nn.Module) -> Optional[str]:
    """None when :func:`use_fused_decode_attention` converts ``module``, else the reason."""
    name = type(module).__name__
    if name not in ATTENTION_CLASSES:
        return f"{name} is not one of {ATTENTION_CLASSES}"
    for attr in ("q_proj", "k_proj", "v_proj", "o_proj", "config", "layer_idx", "scaling", "head_dim"):
        if not hasattr(module, attr):
            return f"the module has no {attr}"
    if module.head_dim not in HEAD_DIMS:
        return f"head dim {module.head_dim} is not one of {HEAD_DIMS}"
    norms = [getattr(module, n, None) for n in ("q_norm", "k_norm")]
    if any(n is not None for n in norms):
        for n in norms:
            if type(n).__name__ not in HEAD_NORM_CLASSES or tuple(n.weight.shape) != (module.head_dim,):
                return f"q_norm / k_norm is not a per-head RMSNorm of {HEAD_NORM_CLASSES}"
    return None


def use_fused_decode_attention(model: nn.Module) -> List[str]:
    """Convert, in place, every attention module of ``model`` that :func:`why_not_fused_attention`
    accepts (module docstring); returns their names. Converting twice changes nothing."""
    done = []
    for name, module in model.named_modules():
        if isinstance(module, FusedDecodeAttention):
            continue
        if why_not_fused_attention(module) is None:
            module.__class__ = mixed_class(FusedDecodeAttention, type(module), "W4A16Decode")
            done.append(name)
    return done
