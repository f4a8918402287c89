"""GPTQ checkpoints (AutoGPTQ / GPTQModel, ``quant_method == "gptq"``), 4-bit.

Layout (K = in_features, N = out_features, G = K / g groups)::

    qweight  int32 [K / 8, N]         packed along K: nibble j of row r is k = 8 r + j
    qzeros   int32 [G, ceil(N / 8)]   packed along N, same nibble order
    scales   fp16/bf16 [G, N]
    g_idx    int32 [K]                group of input feature k (default k // g)

    W[n, k] = (q[k, n] - z[g_idx[k], n]) * scales[g_idx[k], n]

``checkpoint_format="gptq_v2"`` stores the true zero points z (0..15) nibble by nibble.
``checkpoint_format="gptq"`` (v1) stores z - 1, and the rule is word-wise, as its writer
(GPTQModel, whose default save format is v1) and its reader apply it::

    write:  stored_word = (pack(z) - 0x11111111) mod 2**32     # one subtraction per int32 word
    read:   z = unpack((stored_word + 0x11111111) mod 2**32)

A zero point of 0 therefore borrows from the next nibble when written (true zeros (0, 15) are
stored as nibbles (15, 13), not (15, 14)); reading nibble by nibble (stored + 1 each) would give
(16, 14). For zero points in 1..15 no nibble borrows and the two readings agree.

AutoGPTQ's packer writes nibble by nibble from unsigned 32-bit values, and a zero point of 0 (its
z - 1 = -1, all bits set) spills into every higher nibble of its word: nibble j and all above
read 15; AutoGPTQ's own kernels then use (15 + 1) = 16 for each of them. A word whose lowest
nibble of 15 is not its top nibble and has only nibbles of 15 above it is read that way, as
AutoGPTQ computes it (zero points of 16); any other word word-wise. (A word-wise writer produces
that pattern only for true zero points (0, 1, 1, ..., 1) from the 15 up, which no real model has.
A zero point of 0 in a word's top nibble alone is stored alike by both writers and read as 0:
AutoGPTQ's kernels would use 16 there.) A symmetric v1 model stores 0x77777777 (z = 8
everywhere). This module writes v1 word-wise with zero points 0..15.
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


V1_WORD_OFFSET = 0x11111111  # v1 stores z - 1: one subtraction per int32 word of qzeros


def _v1_words(qzeros: torch.Tensor, sign: int) -> torch.Tensor:
    """int32 words ``(qzeros + sign * 0x11111111) mod 2**32`` (two's complement int32)."""
    words = (qzeros.to(torch.int64) + sign * V1_WORD_OFFSET) % 2 ** 32
    return torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32)


def _v1_zeros(qzeros: torch.Tensor, N: int) -> torch.Tensor:
    """True zero points [G, N] of v1 ``qzeros`` [G, ceil(N / 8)]: word-wise, except AutoGPTQ's
    spilled words (see the module docstring), read nibble by nibble plus one as its kernels do."""
    stored = unpack_int32(qzeros, dim=1)                                   # [G, 8 * words], nibbles
    G, W = qzeros.shape
    f = (stored == 15).reshape(G, W, 8)
    above_all_f = f.flip(-1).cumprod(-1).flip(-1).bool()                    # nibble j and all above are 15
    first_f = f & (f.cumsum(-1) == 1)
    first_f[..., 7] = False      # a 15 in the top nibble alone: both writers store z = 0 there alike
    spilled = (first_f & above_all_f).any(-1, keepdim=True).expand(G, W, 8).reshape(G, W * 8)
    word_wise = unpack_int32(_v1_words(qzeros, +1), dim=1)
    return torch.where(spilled, stored.to(word_wise.dtype) + 1, word_wise)[:, :N]


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
        checkpoint_format: "gptq" (v1, zeros stored minus one, word-wise: see above) or "gptq_v2".
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
    zeros = (_v1_zeros(qzeros, N) if offset else unpack_int32(qzeros, dim=1, count=N)).t()  # [N, G]
    perm = perm_from_g_idx(g_idx, K, n_groups, g, "g_idx")
    if perm is not None:
        perm = perm.to(qweight.device)
        codes = codes[:, perm]
    return QuantizedWeight.from_plain(pack_nibbles(codes), scales.t(), zeros_or_none(zeros, scales.dtype),
                                      group_size, perm)


def to_gptq(w: QuantizedWeight, checkpoint_format: str = "gptq") -> Dict[str, torch.Tensor]:
    """Export ``w`` as GPTQ tensors: ``{"qweight", "qzeros", "scales", "g_idx"}`` (layout above).

    K must be a multiple of 8; zero points must be integers in 0..15 (v1 stores each qzeros word
    minus 0x11111111, as GPTQModel does). An act-order weight (``perm`` set) gets its permuted ``g_idx`` and
    its columns back in input-feature order.
    """
    check_weight(w)
    offset = _zero_offset(checkpoint_format)
    N, K = w.shape
    expect(K % 8 == 0, "w.shape[1] (K)", "a multiple of 8", K)
    qzeros = pack_int32(integer_zeros(w, 0, 15, "w.zeros").t(), dim=1)   # true zeros [G, N/8]
    return {
        "qweight": pack_int32(codes_in_input_order(w).t(), dim=0),
        "qzeros": _v1_words(qzeros, -1) if offset else qzeros,
        "scales": w.scales.t().contiguous(),
        "g_idx": g_idx_of(w),
    }
