"""The kernels' private weight layout (version 2), built once per weight from the plain format.

Plain storage is uint8 [N, K/2] with k and k+1 in one byte. The kernels read whole K chunks of
KC values (KC = 64 for g = 32, else 128) and want

1. the two nibbles of a byte to feed two separate half-chunk dot products without shuffles, so
   within chunk c (KC values of K, H = KC/2 bytes per row) byte i holds k = c*KC + i (low nibble)
   and k = c*KC + H + i (high nibble): the "chunk-interleaved" order of :func:`interleave_chunks`;
2. each thread to load, 16 bytes at a time, exactly its share of the tensor-core operand fragment
   (m16n8k16 / wgmma A pattern: lane 4g + t holds rows g and g+8 and K pairs 2t, 2t+1, +8, +16, ...),
   so no byte has to move between threads or registers after the load.

So the chunk-interleaved bytes are regrouped per block of 16 rows and one chunk (16 * H bytes,
contiguous): within the block of rows [16b, 16b + 16) and chunk c, byte

    p = 512*sh + 64*g + 16*t + 8*sl + 4*h + 2*r8 + j      (sh < H/32; g < 8; t < 4; sl, h, r8, j < 2)

holds the chunk-interleaved byte 32*sh + 16*sl + 8*h + 2*t + j of row 16b + 8*r8 + g
(:func:`fragment_blocks`). A kernel loads a [4, 8, BN/16, H/32, 16] tile and reshapes and
permutes it back to [BN, H] with register renames only (``w4a16.backends.triton.tiles.unswizzle``).
N is padded with zero rows to a multiple of 16, K with zeros to a multiple of KC (the kernels
mask x past K to 0).

Scales and zeros are stored transposed, [G_pad, N] contiguous (one group's N values adjacent,
so a program's BN scales are one coalesced load), with zero rows past the real groups, in the
activation dtype; :func:`widen_scales` gives the same weight with fp32 scales and zeros (4-byte
loads, which Triton's pipeline stages with cp.async like the codes).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import torch

from ...pack import unpack_nibbles

LAYOUT_VERSION = 2


@dataclass(frozen=True, eq=False)
class PreparedWeight:
    """A weight in layout version 2.

    qk:        uint8 [ceil(N / 16), K_pad * 8]: the codes in 16-row fragment blocks.
    scales_t:  [G_pad, N] in the activation dtype (or fp32, see :func:`widen_scales`).
    zeros_t:   None (symmetric, z = 8) or [G_pad, N], the dtype of scales_t.
    N, K:      logical shape; K_pad is a multiple of kc.
    kc:        chunk length along K (64 for g = 32, else 128).
    group:     effective group size (K for per-channel).

    Compared and hashed by identity (the launcher caches its launch plans per prepared weight).
    """

    qk: torch.Tensor
    scales_t: torch.Tensor
    zeros_t: Optional[torch.Tensor]
    N: int
    K: int
    K_pad: int
    kc: int
    group: int
    version: int = LAYOUT_VERSION


def widen_scales(pw: PreparedWeight) -> PreparedWeight:
    """``pw`` with fp32 copies of its scales and zeros (codes shared)."""
    return replace(pw, scales_t=pw.scales_t.float(), zeros_t=None if pw.zeros_t is None else pw.zeros_t.float())


def chunk_length(group: int) -> int:
    """KC for an effective group size g: 64 for g = 32, else 128.

    Every half chunk then starts at a multiple of min(g, 64) and so lies inside one group; for
    per-channel weights (g = K, any even K) a half chunk that crosses K holds only padding past K,
    which meets zeros in x.
    """
    return 64 if group == 32 else 128


def interleave_chunks(codes: torch.Tensor, kc: int) -> torch.Tensor:
    """codes uint8 [N, K_pad] (K_pad % kc == 0) -> uint8 [N, K_pad // 2], chunk-interleaved."""
    N, K_pad = codes.shape
    c = codes.reshape(N, K_pad // kc, 2, kc // 2)
    return (c[:, :, 0, :] | (c[:, :, 1, :] << 4)).reshape(N, K_pad // 2).contiguous()


def fragment_blocks(qk: torch.Tensor, kc: int) -> torch.Tensor:
    """Chunk-interleaved uint8 [N, K_pad // 2] -> uint8 [ceil(N / 16), K_pad * 8] fragment blocks."""
    N, KB = qk.shape
    nb, sh = -(-N // 16), kc // 64
    if nb * 16 != N:
        qk = torch.nn.functional.pad(qk, (0, 0, 0, nb * 16 - N))
    v = qk.reshape(nb, 2, 8, KB // (kc // 2), sh, 2, 2, 4, 2)        # b r8 g c sh sl h t j
    return v.permute(0, 3, 4, 2, 7, 5, 6, 1, 8).reshape(nb, KB * 16).contiguous()


def transpose_pad(t: torch.Tensor, G_pad: int) -> torch.Tensor:
    """[N, G] per-group parameters -> [G_pad, N] contiguous, zero rows past G."""
    out = torch.zeros((G_pad, t.shape[0]), dtype=t.dtype, device=t.device)
    out[:t.shape[1]] = t.t()
    return out


def padded_groups(K: int, group: int) -> int:
    """Rows of scales_t: the groups of K padded to a multiple of the chunk length."""
    kc = chunk_length(group)
    return -(-(-(-K // kc) * kc) // group)


def prepare_codes(qweight: torch.Tensor, group: int) -> torch.Tensor:
    """Plain uint8 [N, K/2] codes -> layout-2 fragment blocks uint8 [ceil(N/16), K_pad * 8]."""
    K = qweight.shape[1] * 2
    kc = chunk_length(group)
    K_pad = -(-K // kc) * kc
    codes = unpack_nibbles(qweight)
    if K_pad != K:
        codes = torch.nn.functional.pad(codes, (0, K_pad - K))
    return fragment_blocks(interleave_chunks(codes, kc), kc)


def prepare_layout(w, qweight: Optional[torch.Tensor] = None) -> PreparedWeight:
    """Repack a QuantizedWeight (codes: ``qweight``, default ``w.qweight``) into layout version 2
    on its own device."""
    N, K = w.shape
    g = w.group_size_effective
    kc = chunk_length(g)
    qk = prepare_codes(w.qweight if qweight is None else qweight, g)
    return with_params(PreparedWeight(qk, None, None, N, K, -(-K // kc) * kc, kc, g), w)


def with_params(pw: PreparedWeight, w) -> PreparedWeight:
    """``pw`` with the scales and zeros of ``w`` in the layout's [G_pad, N] form."""
    G_pad = padded_groups(pw.K, pw.group)
    zeros_t = None if w.params.zeros is None else transpose_pad(w.params.zeros, G_pad)
    return replace(pw, scales_t=transpose_pad(w.params.scales, G_pad), zeros_t=zeros_t)


def unpack_layout(pw: PreparedWeight) -> torch.Tensor:
    """The plain uint8 [N, K/2] codes of a layout-2 weight (inverse of :func:`prepare_codes`)."""
    nb, sh = pw.qk.shape[0], pw.kc // 64
    KB = pw.K_pad // 2
    v = pw.qk.reshape(nb, KB // (pw.kc // 2), sh, 8, 4, 2, 2, 2, 2)   # b c sh g t sl h r8 j
    il = v.permute(0, 7, 3, 1, 2, 5, 6, 4, 8).reshape(nb * 16, KB)[:pw.N]  # chunk-interleaved rows
    c = il.reshape(pw.N, KB // (pw.kc // 2), 1, pw.kc // 2)
    codes = torch.cat((c & 0xF, c >> 4), dim=2).reshape(pw.N, pw.K_pad)[:, :pw.K]
    return (codes[:, 0::2] | (codes[:, 1::2] << 4)).contiguous()
