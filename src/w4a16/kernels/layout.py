"""The kernels' private weight layout (version 1), built once per weight from the plain format.

Plain storage is uint8 [N, K/2] with k and k+1 in one byte. The kernels read whole K chunks of
KC values instead, and want the two nibbles of a byte to feed two separate half-chunk dot
products without any shuffling in registers, so chunk c (KC values of K, KC/2 bytes) stores

    byte i of chunk c = q[n, c*KC + i] | q[n, c*KC + KC/2 + i] << 4         (0 <= i < KC/2)

The low nibbles of a loaded [BN, KC/2] tile are then the weight tile of K range
[c*KC, c*KC + KC/2) and the high nibbles that of [c*KC + KC/2, (c+1)*KC), both in natural order.
KC = 64 for g = 32 and 128 otherwise, so that every half chunk lies inside one quantization group and takes one
scale per row. K is zero-padded to a multiple of KC (the kernels mask x past K to 0).

Scales and zeros are stored transposed, [G_pad, N] contiguous (one group's N values adjacent,
so a program's BN scales are one coalesced load), with zero rows past the real groups.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..pack import unpack_nibbles

LAYOUT_VERSION = 1


@dataclass(frozen=True)
class PreparedWeight:
    """A weight in layout version 1.

    qk:        uint8 [N, K_pad // 2] chunk-interleaved codes (see module docstring).
    scales_t:  [G_pad, N] in the activation dtype.
    zeros_t:   None (symmetric, z = 8) or [G_pad, N] in the activation dtype.
    N, K:      logical shape; K_pad is a multiple of kc.
    kc:        chunk length along K (64 for g = 32, else 128).
    group:     effective group size (K for per-channel).
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

    @property
    def dtype(self) -> torch.dtype:
        return self.scales_t.dtype


def chunk_length(group: int) -> int:
    """KC for an effective group size g: 64 for g = 32, else 128.

    Every half chunk then starts at a multiple of min(g, 64) and so lies inside one group; for
    per-channel weights (g = K, any even K) a half chunk that crosses K holds only padding past K,
    which meets zeros in x.
    """
    return 64 if group == 32 else 128


def interleave_chunks(codes: torch.Tensor, kc: int) -> torch.Tensor:
    """codes uint8 [N, K_pad] (K_pad % kc == 0) -> uint8 [N, K_pad // 2] in layout version 1."""
    N, K_pad = codes.shape
    c = codes.reshape(N, K_pad // kc, 2, kc // 2)
    return (c[:, :, 0, :] | (c[:, :, 1, :] << 4)).reshape(N, K_pad // 2).contiguous()


def prepare_layout(w) -> PreparedWeight:
    """Repack a QuantizedWeight into layout version 1 on its own device."""
    N, K = w.shape
    g = w.group_size_effective
    kc = chunk_length(g)
    K_pad = -(-K // kc) * kc
    codes = unpack_nibbles(w.qweight)
    if K_pad != K:
        codes = torch.nn.functional.pad(codes, (0, K_pad - K))
    G = K // g
    G_pad = -(-K_pad // g)

    def transpose_pad(t: torch.Tensor) -> torch.Tensor:
        out = torch.zeros((G_pad, N), dtype=t.dtype, device=t.device)
        out[:G] = t.t()
        return out.contiguous()

    zeros_t = None if w.zeros is None else transpose_pad(w.zeros)
    return PreparedWeight(interleave_chunks(codes, kc), transpose_pad(w.scales), zeros_t,
                          N, K, K_pad, kc, g)
