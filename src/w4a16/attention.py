"""Decode attention on a grouped-query KV cache without repeating its heads (a transformers
attention function, for the 16-bit and the W4A16 model alike).

For one query token, transformers' SDPA attention repeats each key/value head for its group of
query heads (``repeat_kv``) whenever the step is compiled or a mask is given: two copies of the
whole cache per layer and step ([B, Hkv, S, D] -> [B, Hq, S, D], two kernels), then attention over
Hq heads. :func:`packed_gqa_sdpa` instead folds each group's query heads into the query length
([B, Hq, 1, D] -> [B, Hkv, Hq / Hkv, D]) and runs ``F.scaled_dot_product_attention`` on the cache
as it is; a mask shared by all heads ([B, 1, 1, S]) broadcasts over the folded queries. Same
arithmetic per query head (each attends over the same keys, with the same mask and scale), one
kernel. Every other call (prefill, no groups, per-head masks, dropout, extra arguments such as a
position bias or sinks) goes to transformers' own SDPA attention unchanged.

    from w4a16.attention import use_packed_gqa
    use_packed_gqa(model)            # model.config's attention implementation becomes NAME
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from .errors import expect

NAME = "w4a16_packed_gqa"
# keyword arguments of transformers' attention functions that this path does not implement
_UNSUPPORTED = ("position_bias", "s_aux", "sinks", "softcap", "sliding_window", "output_attentions")


def packed_gqa_sdpa(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: Optional[torch.Tensor], dropout: float = 0.0,
                    scaling: Optional[float] = None, **kwargs) -> Tuple[torch.Tensor, None]:
    """transformers' attention-function signature: query [B, Hq, Q, D], key / value [B, Hkv, S, D]
    (fp16 / bf16), attention_mask None or [B or 1, 1 or Hq, Q, S] (bool: True attends; or additive)
    -> ([B, Q, Hq, D] contiguous, None). One query token with Hq a multiple of Hkv > 1 heads and a
    mask shared by the heads: attention on the cache's own heads (module docstring); else
    transformers' ``sdpa_attention_forward``."""
    B, Hq, Q, D = query.shape
    Hkv = key.shape[1]
    plain = (Q != 1 or Hkv == Hq or Hq % Hkv or dropout or key.shape[-1] != value.shape[-1]
             or (attention_mask is not None and attention_mask.shape[1] != 1)
             or any(kwargs.get(k) not in (None, False) for k in _UNSUPPORTED))
    if plain:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    groups = Hq // Hkv
    out = F.scaled_dot_product_attention(query.reshape(B, Hkv, groups, D), key, value, attn_mask=attention_mask,
                                         scale=scaling)
    return out.reshape(B, Hq, 1, D).transpose(1, 2).contiguous(), None


def register() -> str:
    """Register :func:`packed_gqa_sdpa` (and SDPA's mask builder) with transformers under
    :data:`NAME`; returns NAME. Idempotent."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, packed_gqa_sdpa)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    return NAME


def use_packed_gqa(model: torch.nn.Module) -> None:
    """Run ``model``'s attention (a transformers model on SDPA attention) through
    :func:`packed_gqa_sdpa`: registers it and sets the attention implementation of the model's
    config. Raises ValueError for a model whose attention is not SDPA."""
    config = getattr(model, "config", None)
    current = getattr(config, "_attn_implementation", None)
    expect(current in ("sdpa", NAME), "model", "a transformers model with SDPA attention "
           "(config._attn_implementation 'sdpa')", f"attention implementation {current!r}")
    name = register()
    setter = getattr(model, "set_attn_implementation", None)
    if setter is not None:
        setter(name)
    else:
        config._attn_implementation = name
