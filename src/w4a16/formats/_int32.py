"""Nibble packing inside int32 words, shared by the GPTQ, AWQ and compressed-tensors layouts.

Every one of those formats stores eight 4-bit values per int32 word along one dimension:
nibble j (bits 4j .. 4j+3) of word i holds element ``8 * i + order[j]`` along that dimension
(``order`` is the identity except for AWQ's interleave). Words are signed int32 on disk, so a
code >= 8 in the top nibble makes the word negative; masking after the shift handles that.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..errors import expect

NIBBLES = 8
_SHIFTS = torch.arange(0, 32, 4, dtype=torch.int32)  # [8]: 0, 4, ..., 28


def _check_order(order: Optional[Sequence[int]]) -> Optional[torch.Tensor]:
    if order is None:
        return None
    expect(sorted(order) == list(range(NIBBLES)), "order", "a permutation of 0..7", list(order))
    return torch.tensor(list(order), dtype=torch.int64)


def check_int32(t, arg: str, ndim: int = 2) -> None:
    """Raise unless ``t`` is an int32 tensor with ``ndim`` dimensions."""
    expect(isinstance(t, torch.Tensor), arg, "a torch.Tensor", type(t).__name__)
    expect(t.dtype == torch.int32, f"{arg}.dtype", torch.int32, t.dtype)
    expect(t.dim() == ndim, arg, f"a {ndim}-D tensor", f"{t.dim()}-D of shape {tuple(t.shape)}")


def unpack_int32(packed: torch.Tensor, dim: int, count: Optional[int] = None,
                 order: Optional[Sequence[int]] = None) -> torch.Tensor:
    """Unpack int32 words along ``dim`` into codes (uint8, 0..15).

    Args:
        packed: int32 tensor whose size along ``dim`` is P.
        dim: the packed dimension.
        count: keep the first ``count`` elements along ``dim`` (drops padding; default 8 * P).
        order: nibble j of word i holds element ``8 * i + order[j]`` (default: the identity).

    Returns:
        uint8 tensor, same shape as ``packed`` except ``count`` (or 8 * P) along ``dim``.
    """
    order_t = _check_order(order)
    words = packed.movedim(dim, -1)
    nib = (words.unsqueeze(-1) >> _SHIFTS.to(packed.device)) & 0xF  # [..., P, 8]: nibble j
    if order_t is not None:
        # element 8i + m sits in the nibble j with order[j] == m
        nib = nib[..., torch.argsort(order_t).to(packed.device)]
    codes = nib.reshape(*words.shape[:-1], words.shape[-1] * NIBBLES).to(torch.uint8)
    if count is not None:
        codes = codes[..., :count]
    return codes.movedim(-1, dim).contiguous()


def pack_int32(codes: torch.Tensor, dim: int, order: Optional[Sequence[int]] = None) -> torch.Tensor:
    """Pack codes (integers in 0..15) along ``dim`` into int32 words; the inverse of
    :func:`unpack_int32`. A size along ``dim`` that is not a multiple of 8 is padded with code 0.

    Returns:
        int32 tensor with ceil(size / 8) words along ``dim``.
    """
    order_t = _check_order(order)
    c = codes.movedim(dim, -1).to(torch.int64)
    pad = (-c.shape[-1]) % NIBBLES
    if pad:
        c = torch.nn.functional.pad(c, (0, pad))
    c = c.reshape(*c.shape[:-1], c.shape[-1] // NIBBLES, NIBBLES)
    if order_t is not None:
        c = c[..., order_t.to(c.device)]  # nibble j holds element order[j]
    words = (c << _SHIFTS.to(device=c.device, dtype=torch.int64)).sum(dim=-1)
    words = torch.where(words >= 2 ** 31, words - 2 ** 32, words)  # two's complement int32
    return words.to(torch.int32).movedim(-1, dim).contiguous()
