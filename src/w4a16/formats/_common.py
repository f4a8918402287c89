"""Checks and conversions shared by the importers: group size, act-order, zero points."""
from __future__ import annotations

from typing import Optional

import torch

from .. import spec
from ..errors import expect, fail
from ..weight import QuantizedWeight

_GROUPED = tuple(g for g in spec.SUPPORTED_GROUP_SIZES if g > 0)


def check_scales(scales, arg: str, shape: Optional[tuple] = None) -> None:
    """Raise unless ``scales`` is a 2-D fp16/bf16 tensor (of ``shape`` when given)."""
    expect(isinstance(scales, torch.Tensor), arg, "a torch.Tensor", type(scales).__name__)
    spec.check_activation_dtype(scales.dtype, arg)
    expect(scales.dim() == 2, arg, "a 2-D tensor", f"{scales.dim()}-D of shape {tuple(scales.shape)}")
    if shape is not None:
        expect(tuple(scales.shape) == tuple(shape), f"{arg}.shape", tuple(shape), tuple(scales.shape))


def group_size_from_count(K: int, n_groups: int, arg: str) -> int:
    """The group size implied by ``n_groups`` groups over K: -1 (per-channel) for one group."""
    if n_groups == 1:
        return -1
    ok = n_groups >= 1 and K % n_groups == 0 and K // n_groups in _GROUPED
    expect(ok, arg, f"K / g groups with g in {_GROUPED}, or 1 (per-channel), for K = {K}", n_groups)
    return K // n_groups


def perm_from_g_idx(g_idx, K: int, n_groups: int, group: int, arg: str) -> Optional[torch.Tensor]:
    """Turn a group index (int [K], column k in group g_idx[k]) into the weight's ``perm``.

    Returns None when ``g_idx`` is None or the default ``arange(K) // group``; otherwise the
    stable ``argsort(g_idx)`` (int64 [K]), which makes every group contiguous in stored order.
    Each group must then hold exactly ``group`` columns.
    """
    if g_idx is None:
        return None
    expect(isinstance(g_idx, torch.Tensor), arg, "a torch.Tensor or None", type(g_idx).__name__)
    expect(not g_idx.dtype.is_floating_point and g_idx.dtype != torch.bool, f"{arg}.dtype",
           "an integer dtype", g_idx.dtype)
    expect(tuple(g_idx.shape) == (K,), f"{arg}.shape", (K,), tuple(g_idx.shape))
    gi = g_idx.to(torch.int64)
    if torch.equal(gi.cpu(), torch.arange(K) // group):
        return None
    lo, hi = int(gi.min()), int(gi.max())
    expect(lo >= 0 and hi < n_groups, arg, f"group indices in 0..{n_groups - 1}", f"range {lo}..{hi}")
    counts = torch.bincount(gi.cpu(), minlength=n_groups)
    bad = (counts != group).nonzero().flatten()
    if bad.numel():
        b = int(bad[0])
        fail(arg, f"exactly {group} columns in every group", f"{int(counts[b])} columns in group {b}")
    return torch.argsort(gi, stable=True)


def zeros_or_none(zeros: torch.Tensor, dtype: torch.dtype) -> Optional[torch.Tensor]:
    """None (symmetric) when every zero point equals 8, else ``zeros`` in ``dtype``."""
    if bool((zeros == spec.SYMMETRIC_ZERO).all()):
        return None
    return zeros.to(dtype)


# ---------------------------------------------------------------------- writers' side
def codes_in_input_order(w: QuantizedWeight) -> torch.Tensor:
    """Codes uint8 [N, K] with column k belonging to input feature k (``perm`` undone)."""
    codes = w.unpack()
    if w.perm is None:
        return codes
    return torch.empty_like(codes).index_copy_(1, w.perm, codes)


def g_idx_of(w: QuantizedWeight) -> torch.Tensor:
    """int32 [K]: the group of every input feature (``arange(K) // g`` without ``perm``)."""
    K = w.shape[1]
    stored_group = torch.arange(K, device=w.device) // w.group_size_effective
    if w.perm is None:
        return stored_group.to(torch.int32)
    return torch.empty_like(stored_group).index_copy_(0, w.perm, stored_group).to(torch.int32)


def integer_zeros(w: QuantizedWeight, lo: int, hi: int, arg: str) -> torch.Tensor:
    """Zero points as int64 [N, K // g] (8 for a symmetric weight); each must be an integer in lo..hi."""
    if w.zeros is None:
        return torch.full(w.scales.shape, spec.SYMMETRIC_ZERO, dtype=torch.int64, device=w.device)
    z = w.zeros.float()
    ok = bool((z == z.round()).all()) and bool(((z >= lo) & (z <= hi)).all())
    expect(ok, arg, f"integer zero points in {lo}..{hi}",
           f"values in {float(z.min())}..{float(z.max())}" + ("" if bool((z == z.round()).all())
                                                           else " (not all integers)"))
    return z.to(torch.int64)


def no_perm(w: QuantizedWeight, fmt: str) -> None:
    """Raise for an act-order weight in a format that cannot store one."""
    expect(w.perm is None, "w.perm", f"None ({fmt} has no act-order)", "a permutation")


def check_weight(w) -> None:
    expect(isinstance(w, QuantizedWeight), "w", "a w4a16.QuantizedWeight", type(w).__name__)
