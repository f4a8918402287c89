"""A MoE router's softmax, top-k and renormalization in one launch (one program per token), where
transformers' routers run three to four kernels (softmax, torch.topk's gather and sort, the
division): the same arithmetic, fp32 throughout.

Per token: p = softmax(logits) over the E experts (fp32), the k largest p in descending order (the
lowest expert id first among equal values), w = p / sum(those k) when RENORM, cast to the output
dtype. Ids as int64, as torch.topk gives them.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .fast_launch import CachedLaunch


@triton.jit
def router_topk_kernel(logits_ptr, w_ptr, ids_ptr, E, stride_t,
                       K: tl.constexpr, E_POW: tl.constexpr, RENORM: tl.constexpr):
    """logits [T, E] (row stride stride_t, any float dtype) -> w [T, K] (its dtype), ids int64
    [T, K] (both contiguous); one program per token (module docstring)."""
    t = tl.program_id(0)
    e = tl.arange(0, E_POW)
    ok = e < E
    x = tl.load(logits_ptr + t * stride_t + e, mask=ok, other=float("-inf")).to(tl.float32)
    p = tl.exp(x - tl.max(x, 0))
    p = tl.where(ok, p / tl.sum(p, 0), -1.0)   # padding below every probability
    j = tl.arange(0, K)
    top_w = tl.zeros([K], tl.float32)
    top_i = tl.zeros([K], tl.int32)
    for i in range(K):   # the i-th largest: its value, then the lowest id holding it
        best = tl.max(p, 0)
        idx = tl.min(tl.where(p == best, e, E_POW), 0)
        top_w = tl.where(j == i, best, top_w)
        top_i = tl.where(j == i, idx, top_i)
        p = tl.where(e == idx, -2.0, p)
    if RENORM:
        top_w = top_w / tl.sum(top_w, 0)
    tl.store(w_ptr + t * K + j, top_w.to(w_ptr.dtype.element_ty))
    tl.store(ids_ptr + t * K + j, top_i.to(tl.int64))


_LAUNCH = CachedLaunch(router_topk_kernel)


def topk_constexprs(E: int, k: int, renormalize: bool) -> dict:
    """The kernel's constexprs for E experts and top k (what the offline compile builds too)."""
    return dict(K=k, E_POW=max(16, 1 << (E - 1).bit_length()), RENORM=bool(renormalize))


def router_topk(logits: torch.Tensor, k: int, renormalize: bool, out_dtype: torch.dtype, out=None) -> tuple:
    """(w [T, k] in out_dtype, ids int64 [T, k]) for logits [T, E] (last dim contiguous, k a power
    of two at most E) on the kernel (module docstring), written into ``out`` = (w, ids) when given
    (contiguous); the caller checks the arguments."""
    T, E = logits.shape
    w, ids = out if out is not None else (torch.empty(T, k, dtype=out_dtype, device=logits.device),
                                          torch.empty(T, k, dtype=torch.int64, device=logits.device))
    if T:
        _LAUNCH((T,), (logits, w, ids, E, logits.stride(0)),
                topk_constexprs(E, k, renormalize), 4, 1)
    return w, ids
