"""compressed-tensors checkpoints (``format: "pack-quantized"``, 4-bit integer weights).

Layout (nn.Linear orientation; K = in_features, N = out_features, G = K / g groups)::

    weight_packed      int32 [N, ceil(K / 8)]   element k of row n at bits 4 (k % 8) of word k // 8
    weight_scale       fp16/bf16 [N, G]
    weight_shape       integer [2] = (N, K)
    weight_zero_point  int32 [ceil(N / 8), G]   optional (asymmetric), packed along dim 0 (N)
    weight_g_idx       integer [K]              optional (actorder): group of input feature k

Every stored nibble is a signed int4 value v plus 8 (so 0..15), the zero point likewise, and
``W = (v - zp) * scale = (stored - stored_zp) * scale``: the stored nibbles are this project's
codes and zero points directly (a symmetric weight has zp = 0, i.e. z = 8).
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Union

import torch

from ..errors import expect
from ..pack import pack_nibbles
from ..weight import QuantizedWeight
from ._common import (check_scales, check_weight, codes_in_input_order, g_idx_of, group_size_from_count,
                      integer_zeros, perm_from_g_idx, zeros_or_none)
from ._int32 import check_int32, pack_int32, unpack_int32


def _shape_pair(weight_shape) -> tuple:
    if isinstance(weight_shape, torch.Tensor):
        ok = weight_shape.numel() == 2 and not weight_shape.dtype.is_floating_point
        expect(ok, "weight_shape", "an integer tensor [2] = (N, K)",
               f"{weight_shape.dtype} of shape {tuple(weight_shape.shape)}")
        return tuple(int(v) for v in weight_shape.flatten().tolist())
    ok = isinstance(weight_shape, (tuple, list, torch.Size)) and len(weight_shape) == 2 \
        and all(isinstance(v, int) for v in weight_shape)
    expect(ok, "weight_shape", "(N, K) as two ints or an integer tensor [2]", weight_shape)
    return tuple(weight_shape)


def from_compressed_tensors(weight_packed: torch.Tensor, weight_scale: torch.Tensor,
                            weight_shape: Union[torch.Tensor, Sequence[int]],
                            weight_zero_point: Optional[torch.Tensor] = None,
                            weight_g_idx: Optional[torch.Tensor] = None) -> QuantizedWeight:
    """Import one pack-quantized 4-bit linear layer.

    Args:
        weight_packed: int32 [N, ceil(K / 8)].
        weight_scale: fp16/bf16 [N, G]; G = 1 means per-channel (group_size -1), else g = K / G.
        weight_shape: (N, K), an integer tensor [2] or two ints; K must be even.
        weight_zero_point: None (symmetric) or int32 [ceil(N / 8), G].
        weight_g_idx: None or integer [K] (actorder "group"); a non-default one must put exactly
            g input features in every group and gives the weight ``perm = argsort(g_idx)``.

    Returns:
        QuantizedWeight (N, K); symmetric (zeros None) when there is no zero point or all are 8.
    """
    N, K = _shape_pair(weight_shape)
    expect(N >= 1 and K >= 2 and K % 2 == 0, "weight_shape", "(N >= 1, K) with K even and >= 2", (N, K))
    check_int32(weight_packed, "weight_packed")
    pshape = (N, -(-K // 8))
    expect(tuple(weight_packed.shape) == pshape, "weight_packed.shape", pshape, tuple(weight_packed.shape))
    check_scales(weight_scale, "weight_scale")
    expect(weight_scale.shape[0] == N, "weight_scale.shape[0]", f"N = {N}", weight_scale.shape[0])
    n_groups = weight_scale.shape[1]
    group_size = group_size_from_count(K, n_groups, "weight_scale.shape[1]")
    g = K if group_size == -1 else group_size

    codes = unpack_int32(weight_packed, dim=1, count=K)                 # [N, K]
    zeros = None
    if weight_zero_point is not None:
        check_int32(weight_zero_point, "weight_zero_point")
        zshape = (-(-N // 8), n_groups)
        expect(tuple(weight_zero_point.shape) == zshape, "weight_zero_point.shape", zshape,
               tuple(weight_zero_point.shape))
        expect(weight_zero_point.device == weight_packed.device, "weight_zero_point.device",
               weight_packed.device, weight_zero_point.device)
        zeros = zeros_or_none(unpack_int32(weight_zero_point, dim=0, count=N), weight_scale.dtype)
    perm = perm_from_g_idx(weight_g_idx, K, n_groups, g, "weight_g_idx")
    if perm is not None:
        perm = perm.to(weight_packed.device)
        codes = codes[:, perm]
    return QuantizedWeight.from_plain(pack_nibbles(codes), weight_scale, zeros, group_size, perm)


def to_compressed_tensors(w: QuantizedWeight) -> Dict[str, torch.Tensor]:
    """Export ``w`` as pack-quantized tensors (layout above): ``weight_packed``, ``weight_scale``,
    ``weight_shape`` (int64 [2]), plus ``weight_zero_point`` for an asymmetric weight (integer zero
    points in 0..15) and ``weight_g_idx`` (int32 [K]) for an act-order one."""
    check_weight(w)
    N, K = w.shape
    out = {
        "weight_packed": pack_int32(codes_in_input_order(w), dim=1),
        "weight_scale": w.scales.clone(),
        "weight_shape": torch.tensor([N, K], dtype=torch.int64),
    }
    if w.zeros is not None:
        out["weight_zero_point"] = pack_int32(integer_zeros(w, 0, 15, "w.zeros"), dim=0)
    if w.perm is not None:
        out["weight_g_idx"] = g_idx_of(w)
    return out
