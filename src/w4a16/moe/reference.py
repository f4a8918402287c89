"""The mixture-of-experts layer in plain torch: what the kernels are checked against.

Contract (x's dtype for every tensor stored between the steps, fp32 inside each step):
    h[s]   = x[s // k] @ W_gate_up[e_s]^T                  [T*k, 2I]   slot s = t*k + j, e_s = topk_ids[t, j]
    a[s]   = silu(h[s, :I]) * h[s, I:]                      [T*k, I]
    y[t]   = sum_j topk_weights[t, j] * (a[t*k + j] @ W_down[e_{t*k+j}]^T)   [T, H], summed in fp32
A choice whose id is outside [0, E) contributes nothing (transformers marks a choice that another
rank's experts serve with the id E).
"""
from __future__ import annotations

import torch



def grouped_gemm(x: torch.Tensor, experts, topk_ids: torch.Tensor, gather: bool = True,
                 topk_weights=None) -> torch.Tensor:
    """[T*k, N] fp32: row s = x[s // k if gather else s] @ W[e_s]^T (times topk_weights[s]); a row
    of zeros for an id outside [0, E)."""
    E, N, K = experts.shape
    ids = topk_ids.reshape(-1).long()
    k = topk_ids.shape[1]
    rows = torch.arange(ids.numel(), device=ids.device)
    xr = x[rows // k] if gather else x
    out = torch.zeros(ids.numel(), N, dtype=torch.float32, device=x.device)
    for e in torch.unique(ids).tolist():
        if not 0 <= e < E:
            continue
        sel = (ids == e).nonzero().flatten()
        W = experts.dequantize(torch.float32, experts=[e])[0]
        out[sel] = xr[sel].float() @ W.t()
    if topk_weights is not None:
        out = out * topk_weights.reshape(-1, 1).float()
    return out


def silu_mul(h: torch.Tensor) -> torch.Tensor:
    """h [S, 2I] -> silu(h[:, :I]) * h[:, I:] computed in fp32, in h's dtype."""
    I = h.shape[1] // 2
    hf = h.float()
    return (torch.nn.functional.silu(hf[:, :I]) * hf[:, I:]).to(h.dtype)


def fused_moe(x: torch.Tensor, gate_up, down, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
    """The whole expert layer, [T, H] in x's dtype (module docstring)."""
    T, k = topk_ids.shape
    h = grouped_gemm(x, gate_up, topk_ids).to(x.dtype)
    y = grouped_gemm(silu_mul(h), down, topk_ids, gather=False, topk_weights=topk_weights)
    return y.reshape(T, k, down.shape[1]).sum(1).to(x.dtype)
