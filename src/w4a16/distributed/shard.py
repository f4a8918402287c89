"""Which part of a quantized weight one tensor-parallel rank keeps (pure tensor code, no communication).

Column-wise (split N): rank r keeps output rows [r*N/tp, (r+1)*N/tp) of the codes, scales, zeros
and bias; perm (act-order, over K) is kept whole.

Row-wise (split K on group boundaries): rank r keeps stored K positions [r*K/tp, (r+1)*K/tp): the
code bytes [r*K/tp/2, (r+1)*K/tp/2) of every row and the scale/zero groups of those positions.
With act-order the stored K order is ``perm`` of the input features, so the rank needs the input
features ``perm[r*K/tp:(r+1)*K/tp]`` (``input_index``) and its local weight has no perm.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence, Tuple

import torch

from ..errors import expect
from ..weight import QuantizedWeight

COLWISE, ROWWISE = "colwise", "rowwise"


class Split(NamedTuple):
    """What one rank keeps of a weight of shape (N, K): ``style`` "colwise" or "rowwise", the
    ranges of N it keeps (``rows``: one slice, or one per member of a fused projection, whose
    rows are concatenated), the range of stored K (``cols``) and of scale/zero groups."""
    style: str
    rows: Tuple[slice, ...]
    cols: slice
    groups: slice


class LocalShard(NamedTuple):
    """A rank's part of a layer, as plain tensors on one device.

    weight:      QuantizedWeight of the local shape (N/tp, K) or (N, K/tp); a row-wise shard
                 carries no perm (a column-wise one keeps the whole perm over K).
    bias:        [N/tp] (column-wise), [N] (row-wise), or None.
    perm:        the whole perm int64 [K] of a row-wise act-order shard (kept as the layer's
                 replicated ``perm`` buffer), else None.
    input_index: int64 [K/tp], ``perm[r*K/tp:(r+1)*K/tp]``: the input features a row-wise
                 act-order shard reads, else None.
    """
    weight: QuantizedWeight
    bias: Optional[torch.Tensor]
    perm: Optional[torch.Tensor] = None
    input_index: Optional[torch.Tensor] = None


def check_tp(tp: int, rank: int) -> None:
    expect(isinstance(tp, int) and tp >= 1, "tp", "an int >= 1 (the mesh size)", tp)
    expect(isinstance(rank, int) and 0 <= rank < tp, "rank", f"an int in [0, {tp})", rank)


def split_for(style: str, shape: tuple, group_size: int, rank: int, tp: int, name: str = "weight",
              members: Optional[Sequence[int]] = None) -> Split:
    """The ranges rank ``rank`` of ``tp`` keeps of a weight of ``shape`` (N, K), or W4A16Error
    naming why the split is impossible.

    Column-wise needs N divisible by tp (any N/tp >= 1 works: the kernels mask rows past N and
    no format constraint applies to a local shard). Row-wise needs K divisible by tp and K/tp a
    multiple of the group size (so K/tp is even, and a multiple of 32, so also of 8 for the Gluon
    kernel's TMA rows); a per-channel weight (group_size -1) has one group over all of K and
    cannot be split row-wise. ``members``: the out_features of the projections a fused weight
    concatenates (``FusedW4A16Linear.splits``); column-wise, each is split alike and the rank
    keeps its part of each, in order.
    """
    check_tp(tp, rank)
    N, K = shape
    expect(style in (COLWISE, ROWWISE), "style", f"{COLWISE!r} or {ROWWISE!r}", repr(style))
    g = K if group_size == -1 else group_size
    if style == COLWISE:
        rows, start = [], 0
        for width in (members or (N,)):
            expect(width % tp == 0, f"{name}: tp", f"a divisor of out_features N = {width} (column-wise splits N)", tp)
            n = width // tp
            rows.append(slice(start + rank * n, start + (rank + 1) * n))
            start += width
        return Split(style, tuple(rows), slice(0, K), slice(0, K // g))
    expect(group_size != -1, f"{name}: group_size",
           "a group size other than -1 for a row-wise split (a per-channel weight has one group over all "
           "of K, which cannot be split)", group_size)
    expect(K % tp == 0, f"{name}: tp", f"a divisor of in_features K = {K} (row-wise splits K)", tp)
    k = K // tp
    expect(k % g == 0, f"{name}: tp",
           f"a split of K = {K} on group boundaries (K / tp a multiple of group_size {g})", f"{tp} (K / tp = {k})")
    return Split(style, (slice(0, N),), slice(rank * k, (rank + 1) * k), slice(rank * k // g, (rank + 1) * k // g))


def code_bytes(cols: slice) -> slice:
    """The byte columns of plain codes uint8 [N, K/2] holding stored K positions ``cols`` (even bounds)."""
    return slice(cols.start // 2, cols.stop // 2)


def take(w: QuantizedWeight, bias: Optional[torch.Tensor], split: Split) -> LocalShard:
    """The local shard of ``w`` (and of ``bias``) for ``split``: fresh contiguous tensors, so the
    full weight's storage can be freed."""
    own = lambda t: t.clone(memory_format=torch.contiguous_format)  # noqa: E731
    codes = w.plain_codes()
    if split.style == COLWISE:
        rows = lambda t: torch.cat([t[sl] for sl in split.rows])  # noqa: E731 - a fresh tensor
        local = QuantizedWeight.from_plain(rows(codes), rows(w.scales), None if w.zeros is None else rows(w.zeros),
                                           w.group_size, None if w.perm is None else own(w.perm))
        return LocalShard(local, None if bias is None else rows(bias))
    cols, groups = split.cols, split.groups
    local = QuantizedWeight.from_plain(own(codes[:, code_bytes(cols)]), own(w.scales[:, groups]),
                                       None if w.zeros is None else own(w.zeros[:, groups]), w.group_size)
    perm = None if w.perm is None else own(w.perm)
    index = None if perm is None else perm[cols].clone()
    return LocalShard(local, None if bias is None else own(bias), perm, index)
