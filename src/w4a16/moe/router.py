"""MoE routers on fewer kernels: softmax, top-k and renormalization in one launch.

transformers' top-k routers (:data:`ROUTER_CLASSES`) compute the router logits with one GEMM, then
softmax (fp32), ``torch.topk`` (a gather and a sort kernel on the GPU) and the renormalization of
the chosen weights: three or four small launches per MoE layer and decode step.
:func:`router_topk` does what follows the GEMM in one (``backends.triton.moe_topk``), the same
arithmetic in fp32. :func:`use_fused_routers` converts a model's routers in place; their forward
returns what the original returns (logits, weights, ids).

    from w4a16.moe.router import use_fused_routers
    use_fused_routers(model)    # Qwen2-MoE, Qwen3-MoE, Mixtral routers
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import expect
from ..mixins import mixed_class

# router class -> whether its weights come back in the logits' dtype (else fp32); each computes
# softmax(fp32) -> topk -> renormalize (Mixtral always, the Qwen ones when norm_topk_prob)
ROUTER_CLASSES = {"Qwen3MoeTopKRouter": True, "Qwen2MoeTopKRouter": True, "MixtralTopKRouter": False}


def router_topk_reference(logits: torch.Tensor, k: int, renormalize: bool,
                          cast: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """transformers' routing after the GEMM: (weights [T, k], ids int64 [T, k])."""
    p = torch.softmax(logits, dim=-1, dtype=torch.float)
    w, ids = torch.topk(p, k, dim=-1)
    if renormalize:
        w = w / w.sum(dim=-1, keepdim=True)
    return (w.to(logits.dtype) if cast else w), ids


def _kernel_applies(logits: torch.Tensor, k: int) -> bool:
    from ..backends.triton.env import interpreting

    return ((logits.is_cuda or interpreting()) and k & (k - 1) == 0 and logits.stride(-1) == 1
            and logits.dtype in (torch.float16, torch.bfloat16, torch.float32))


@torch.library.custom_op("w4a16::router_topk", mutates_args=())
def router_topk_op(logits: torch.Tensor, k: int, renormalize: bool, cast: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """:func:`router_topk` as a custom op (opaque to torch.compile, captured by CUDA graphs)."""
    if _kernel_applies(logits, k):
        from ..backends.triton.moe_topk import router_topk as kernel

        return kernel(logits, k, renormalize, logits.dtype if cast else torch.float32)
    return router_topk_reference(logits, k, renormalize, cast)


@router_topk_op.register_fake
def _router_topk_fake(logits, k, renormalize, cast):
    T = logits.shape[0]
    return (logits.new_empty((T, k), dtype=logits.dtype if cast else torch.float32),
            logits.new_empty((T, k), dtype=torch.int64))


def router_topk(logits: torch.Tensor, k: int, renormalize: bool = True,
                cast: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
    """logits [T, E] (fp16 / bf16 / fp32) -> (weights [T, k]: the k largest softmax probabilities
    in descending order, divided by their sum when ``renormalize``, in logits' dtype when ``cast``
    else fp32; ids int64 [T, k]). One kernel on a GPU (k a power of two), else torch's operations."""
    expect(logits.dim() == 2, "logits", "a 2-D tensor [T, E]", tuple(logits.shape))
    expect(logits.is_floating_point(), "logits.dtype", "a floating dtype", logits.dtype)
    expect(1 <= k <= logits.shape[1], "k", f"1..{logits.shape[1]} (the experts)", k)
    return router_topk_op(logits, int(k), bool(renormalize), bool(cast))


class FusedRouter(nn.Module):
    """The forward of a converted router (mixed into a subclass of its own class)."""

    def forward(self, hidden_states: torch.Tensor):
        """hidden_states [..., H] -> (logits [T, E], weights [T, k], ids int64 [T, k]), as the class's own."""
        logits = F.linear(hidden_states.reshape(-1, self.hidden_dim), self.weight)
        renorm = getattr(self, "norm_topk_prob", True)
        w, ids = router_topk(logits, self.top_k, renorm, self._cast_weights)
        return logits, w, ids


def why_not_fused_router(module: nn.Module) -> Optional[str]:
    """None when :func:`use_fused_routers` converts ``module``, else the reason."""
    name = type(module).__name__
    if name not in ROUTER_CLASSES:
        return f"{name} is not one of {tuple(ROUTER_CLASSES)}"
    for attr in ("weight", "top_k", "hidden_dim"):
        if not hasattr(module, attr):
            return f"the router has no {attr}"
    return None


def use_fused_routers(model: nn.Module) -> List[str]:
    """Convert, in place, every router of ``model`` that :func:`why_not_fused_router` accepts;
    returns their names. Converting twice changes nothing."""
    done = []
    for name, module in model.named_modules():
        if isinstance(module, FusedRouter) or why_not_fused_router(module) is not None:
            continue
        cls = type(module)
        module.__class__ = mixed_class(FusedRouter, cls, "W4A16Fused", _cast_weights=ROUTER_CLASSES[cls.__name__])
        done.append(name)
    return done
