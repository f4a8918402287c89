"""AWQ checkpoints (AutoAWQ ``version: "gemm"``, ``quant_method == "awq"``), 4-bit.

Layout (K = in_features, N = out_features, G = K / g groups)::

    qweight  int32 [K, N / 8]   packed along N, interleaved: nibble i of word c holds
                                output column 8 c + AWQ_ORDER[i]
    qzeros   int32 [G, N / 8]   same interleave, true zero point (no offset)
    scales   fp16/bf16 [G, N]

    W[n, k] = (q[k, n] - z[k // g, n]) * scales[k // g, n]
"""
from __future__ import annotations

from typing import Dict

import torch

from ..errors import expect
from ..pack import pack_nibbles
from ..weight import QuantizedWeight
from ._common import (check_scales, check_weight, codes_in_input_order, group_size_from_count, integer_zeros,
                      no_perm, zeros_or_none)
from ._int32 import check_int32, pack_int32, unpack_int32

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
"""Nibble i of a packed word holds column ``8 c + AWQ_ORDER[i]``; its inverse is (0, 4, 1, 5, 2, 6, 3, 7)."""


def from_awq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor) -> QuantizedWeight:
    """Import one AWQ ("gemm" layout) linear layer.

    Args:
        qweight: int32 [K, N / 8].
        qzeros: int32 [G, N / 8].
        scales: fp16/bf16 [G, N]; G = 1 means per-channel (group_size -1), else g = K / G.

    Returns:
        QuantizedWeight (N, K) with scales in ``scales``' dtype; symmetric (zeros None) when every
        zero point is 8.
    """
    check_int32(qweight, "qweight")
    check_int32(qzeros, "qzeros")
    check_scales(scales, "scales")
    K, N = qweight.shape[0], qweight.shape[1] * 8
    expect(K >= 2 and N >= 8, "qweight.shape", "[K >= 2, N / 8 >= 1]", tuple(qweight.shape))
    expect(scales.shape[1] == N, "scales.shape[1]", f"N = {N} (8 * qweight.shape[1])", scales.shape[1])
    n_groups = scales.shape[0]
    group_size = group_size_from_count(K, n_groups, "scales.shape[0]")
    zshape = (n_groups, N // 8)
    expect(tuple(qzeros.shape) == zshape, "qzeros.shape", zshape, tuple(qzeros.shape))
    expect(qzeros.device == qweight.device, "qzeros.device", qweight.device, qzeros.device)

    codes = unpack_int32(qweight, dim=1, order=AWQ_ORDER).t()    # [N, K]
    zeros = unpack_int32(qzeros, dim=1, order=AWQ_ORDER).t()     # [N, G]
    return QuantizedWeight.from_plain(pack_nibbles(codes), scales.t(), zeros_or_none(zeros, scales.dtype),
                                      group_size)


def to_awq(w: QuantizedWeight) -> Dict[str, torch.Tensor]:
    """Export ``w`` as AWQ tensors ``{"qweight", "qzeros", "scales"}`` (layout above).

    N must be a multiple of 8, zero points integers in 0..15 (a symmetric weight gets 8), and
    ``w.perm`` None (AWQ has no act-order).
    """
    check_weight(w)
    no_perm(w, "AWQ")
    N, K = w.shape
    expect(N % 8 == 0, "w.shape[0] (N)", "a multiple of 8", N)
    zeros = integer_zeros(w, 0, 15, "w.zeros")
    return {
        "qweight": pack_int32(codes_in_input_order(w).t(), dim=1, order=AWQ_ORDER),
        "qzeros": pack_int32(zeros.t(), dim=1, order=AWQ_ORDER),
        "scales": w.scales.t().contiguous(),
    }
