"""GPTQ checkpoints (AutoGPTQ / GPTQModel, ``quant_method == "gptq"``), 4-bit.

Layout (K = in_features, N = out_features, G = K / g groups)::

    qweight  int32 [K / 8, N]         packed along K: nibble j of row r is k = 8 r + j
    qzeros   int32 [G, ceil(N / 8)]   packed along N, same nibble order
    scales   fp16/bf16 [G, N]
    g_idx    int32 [K]                group of input feature k (default k // g)

    W[n, k] = (q[k, n] - z[g_idx[k], n]) * scales[g_idx[k], n]

``checkpoint_format="gptq"`` (v1) stores z - 1 (the true zero is stored + 1, so a symmetric model
stores 7); ``"gptq_v2"`` stores z itself.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch

from ..errors import expect
from ..pack import pack_nibbles
from ..weight import QuantizedWeight
from ._common import (check_scales, check_weight, codes_in_input_order, g_idx_of, group_size_from_count,
                      integer_zeros, perm_from_g_idx, zeros_or_none)
from ._int32 import check_int32, pack_int32, unpack_int32

CHECKPOINT_FORMATS = ("gptq", "gptq_v2")


def _zero_offset(checkpoint_format: str) -> int:
    expect(checkpoint_format in CHECKPOINT_FORMATS, "checkpoint_format", f"one of {CHECKPOINT_FORMATS}",
           repr(checkpoint_format))
    return 1 if checkpoint_format == "gptq" else 0


def from_gptq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
              g_idx: Optional[torch.Tensor] = None, checkpoint_format: str = "gptq",
              bits: int = 4) -> QuantizedWeight:
    """Import one GPTQ linear layer.

    Args:
        qweight: int32 [K / 8, N].
        qzeros: int32 [G, ceil(N / 8)].
        scales: fp16/bf16 [G, N]; G = 1 means per-channel (group_size -1), else g = K / G.
        g_idx: None or integer [K]. A g_idx other than ``arange(K) // g`` (act-order) must put
            exactly g input features in every group; the weight then gets
            ``perm = argsort(g_idx, stable=True)`` and stores its columns in that order.
        checkpoint_format: "gptq" (v1, zeros stored minus one) or "gptq_v2".
        bits: must be 4.

    Returns:
        QuantizedWeight (N, K) with scales in ``scales``' dtype; symmetric (zeros None) when every
        true zero point is 8.
    """
    expect(bits == 4, "bits", 4, bits)
    offset = _zero_offset(checkpoint_format)
    check_int32(qweight, "qweight")
    check_int32(qzeros, "qzeros")
    check_scales(scales, "scales")
    K, N = qweight.shape[0] * 8, qweight.shape[1]
    expect(K >= 8 and N >= 1, "qweight.shape", "[K / 8 >= 1, N >= 1]", tuple(qweight.shape))
    expect(scales.shape[1] == N, "scales.shape[1]", f"N = {N} (qweight.shape[1])", scales.shape[1])
    n_groups = scales.shape[0]
    group_size = group_size_from_count(K, n_groups, "scales.shape[0]")
    g = K if group_size == -1 else group_size
    zshape = (n_groups, -(-N // 8))
    expect(tuple(qzeros.shape) == zshape, "qzeros.shape", zshape, tuple(qzeros.shape))
    expect(qzeros.device == qweight.device, "qzeros.device", qweight.device, qzeros.device)

    codes = unpack_int32(qweight, dim=0).t()                           # [N, K]
    zeros = unpack_int32(qzeros, dim=1, count=N).t().to(torch.int32) + offset  # [N, G]
    perm = perm_from_g_idx(g_idx, K, n_groups, g, "g_idx")
    if perm is not None:
        perm = perm.to(qweight.device)
        codes = codes[:, perm]
    return QuantizedWeight.from_plain(pack_nibbles(codes), scales.t(), zeros_or_none(zeros, scales.dtype),
                                      group_size, perm)


def to_gptq(w: QuantizedWeight, checkpoint_format: str = "gptq") -> Dict[str, torch.Tensor]:
    """Export ``w`` as GPTQ tensors: ``{"qweight", "qzeros", "scales", "g_idx"}`` (layout above).

    K must be a multiple of 8; zero points must be integers (0..15, or 1..16 for v1, where the
    stored value is z - 1). An act-order weight (``perm`` set) gets its permuted ``g_idx`` and
    its columns back in input-feature order.
    """
    check_weight(w)
    offset = _zero_offset(checkpoint_format)
    N, K = w.shape
    expect(K % 8 == 0, "w.shape[1] (K)", "a multiple of 8", K)
    zeros = integer_zeros(w, offset, 15 + offset, "w.zeros") - offset   # [N, G]
    return {
        "qweight": pack_int32(codes_in_input_order(w).t(), dim=0),
        "qzeros": pack_int32(zeros.t(), dim=1),
        "scales": w.scales.t().contiguous(),
        "g_idx": g_idx_of(w),
    }
