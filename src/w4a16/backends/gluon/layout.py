"""The Gluon decode kernel's private weight layout (``GLUON_LAYOUT_VERSION`` 1).

Plain storage is uint8 [N, K/2] (element k in byte k // 2, even k in the low nibble). The kernel
reads K in *chunks* of KC = 2 * KH values, KH = min(g, 64): the low nibbles of a chunk's bytes are
the weights of its first half (KH values of K), the high nibbles those of its second half, so one
16-byte shared-memory load feeds two wgmma A tiles ([16 rows, KH] each) and the dequant needs no
byte permute.

Within one block of 16 rows (rows 16b .. 16b + 15) and one chunk c there are 16 * KH bytes: lane
``l = 4 * gr + t`` of a warp owns the KH / 2 contiguous bytes ``[l * KH/2, (l + 1) * KH/2)``; they
are exactly its wgmma register-A fragment (m64nNk16, 16-bit A) of both half tiles: register ``r``
of the fragment (Gluon's ``DotOperandLayout(0, NVMMA v3, k_width=2)``) holds row
``gr + 8 * r[1]`` and half-chunk K index ``2t + r[0] + 8 r[2] + 16 r[3] + 32 r[4]``. Registers come
in quads (r = 4j .. 4j + 3: (gr, k), (gr, k+1), (gr+8, k), (gr+8, k+1)) that one 32-bit word
carries; inside a word the bytes are ordered (e0, e2, e1, e3), so that ``lop3(w, 0x000F000F, magic)``
yields the fp16x2 pair (e0, e1) and ``lop3(w >> 8, ...)`` the pair (e2, e3) with no ``prmt``
(see ``decode.py``).

Global tensor: ``codes`` uint8 [ceil(N / 16), K_pad / 32, 256]: block b, then the chunks in K
order (16 * KH bytes each = KH / 16 rows of 256 bytes), so a TMA box [W, KS / 32, 256] is the
codes of W row blocks (16 W rows) and KS values of K. N is padded with zero rows to a multiple
of 16, K with zero codes to a multiple of KC (x is zero past K through TMA's out-of-bounds fill).

Scales and offsets are stored transposed, [G, N8] (N8 = N rounded up to 8, for TMA's 16-byte
row pitch), in the activation dtype: ``scales_t[j, n] = s[n, j]`` and, with zero points,
``offs_t[j, n] = -z[n, j] * s[n, j]`` (computed in fp32, rounded once), so the kernel computes
``w = q * s + o`` with q exact. Symmetric weights store no offsets (o = -8 s in the kernel).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

GLUON_LAYOUT_VERSION = 1


def half_chunk(group: int) -> int:
    """KH, the half-chunk length along K, for effective group size ``group``: 32 for g = 32 (and a
    per-channel K below 32, padded), 64 otherwise (g = 64, 128, 256, per-channel K)."""
    return 32 if group <= 32 else 64


@dataclass(frozen=True, eq=False)
class GluonPrepared:
    """A weight in the Gluon decode layout.

    codes:    uint8 [ceil(N / 16), K_pad / 32, 256] (see the module docstring).
    scales_t: [G, N8] in the activation dtype (fp16 / bf16), G = K / group.
    offs_t:   None (symmetric, z = 8) or [G, N8], same dtype: -z * s.
    N, K:     logical shape; K_pad: K rounded up to a multiple of 2 * kh.
    group:    effective group size (K for per-channel); kh: the half-chunk length.
    Compared and hashed by identity (the launcher caches its plans per prepared weight).
    """

    codes: torch.Tensor
    scales_t: torch.Tensor
    offs_t: Optional[torch.Tensor]
    N: int
    K: int
    K_pad: int
    group: int
    kh: int
    version: int = GLUON_LAYOUT_VERSION

    @property
    def dtype(self) -> torch.dtype:
        return self.scales_t.dtype

    @property
    def has_zeros(self) -> bool:
        return self.offs_t is not None


def _fragment_map(kh: int, device=None):
    """(row, k) within a (16-row block, chunk) of each of its 16 * kh byte positions: the low
    nibble of byte p holds weight (row[p], k[p]) of the first half chunk, the high nibble
    (row[p], kh + k[p])."""
    p = torch.arange(16 * kh, device=device)
    lane, pos = p // (kh // 2), p % (kh // 2)
    gr, t = lane // 4, lane % 4
    # byte order inside a word: (e0, e2, e1, e3) -> register index
    q = pos % 4
    r = (pos - q) + torch.tensor([0, 2, 1, 3], device=device)[q]
    row = gr + 8 * ((r >> 1) & 1)
    k = 2 * t + (r & 1) + 8 * ((r >> 2) & 1) + 16 * ((r >> 3) & 1) + 32 * ((r >> 4) & 1)
    return row, k


def _plain_codes(qweight: torch.Tensor) -> torch.Tensor:
    q = torch.empty(qweight.shape[0], qweight.shape[1] * 2, dtype=torch.uint8, device=qweight.device)
    q[:, 0::2] = qweight & 0xF
    q[:, 1::2] = qweight >> 4
    return q


def prepare_decode(qweight: torch.Tensor, scales: torch.Tensor, zeros: Optional[torch.Tensor],
                   group: int) -> GluonPrepared:
    """Repack a plain weight (uint8 [N, K/2], scales [N, K/g], zeros [N, K/g] or None, effective
    group size g) into the Gluon decode layout. Pure torch: runs on any device."""
    N, K = qweight.shape[0], qweight.shape[1] * 2
    kh = half_chunk(group)
    kc = 2 * kh
    K_pad = -(-K // kc) * kc
    NB = -(-N // 16)
    dev = qweight.device
    q = torch.zeros(NB * 16, K_pad, dtype=torch.uint8, device=dev)
    q[:N, :K] = _plain_codes(qweight)
    row, k = _fragment_map(kh, dev)
    chunks = K_pad // kc
    # q4 [NB, 16, chunks, kc] -> gather per (block, chunk) the 16*kh bytes
    q4 = q.view(NB, 16, chunks, kc)
    lo = q4[:, row, :, k]            # [16*kh, NB, chunks]  (advanced indexing moves dims first)
    hi = q4[:, row, :, k + kh]
    b = (lo | (hi << 4)).permute(1, 2, 0).contiguous()    # [NB, chunks, 16*kh]
    codes = b.view(NB, K_pad // 32, 256)
    s_t, o_t = decode_params(scales, zeros, N)
    return GluonPrepared(codes.contiguous(), s_t, o_t, N, K, K_pad, int(group), kh)


def prepare_weight(w, device="cuda") -> GluonPrepared:
    """The Gluon layout of QuantizedWeight ``w`` on ``device`` (its plain codes, scales and zeros
    are copied there first if they live elsewhere): what the session scripts and GPU tests run
    the kernels on directly."""
    zeros = None if w.params.zeros is None else w.params.zeros.to(device)
    return prepare_decode(w.qweight.to(device), w.params.scales.to(device), zeros, w.group_size_effective)


def decode_params(scales: torch.Tensor, zeros: Optional[torch.Tensor], N: int) -> tuple:
    """(scales_t, offs_t): scales [N, G] -> [G, N8] (N padded to a multiple of 8 with zeros), and
    for zero points the offsets -z * s in the same form (computed in fp32, rounded once), or None."""
    G, dev = scales.shape[1], scales.device
    N8 = -(-N // 8) * 8
    s_t = torch.zeros(G, N8, dtype=scales.dtype, device=dev)
    s_t[:, :N] = scales.t()
    o_t = None
    if zeros is not None:
        o_t = torch.zeros(G, N8, dtype=scales.dtype, device=dev)
        o_t[:, :N] = (-(zeros.float() * scales.float())).t().to(scales.dtype)
    return s_t, o_t


def unpack_decode(pw: GluonPrepared) -> torch.Tensor:
    """The plain codes uint8 [N, K] (0..15) back from ``pw.codes`` (for tests)."""
    kh, kc = pw.kh, 2 * pw.kh
    NB = pw.codes.shape[0]
    chunks = pw.K_pad // kc
    b = pw.codes.reshape(NB, chunks, 16 * kh)
    row, k = _fragment_map(kh, b.device)
    q4 = torch.zeros(NB, 16, chunks, kc, dtype=torch.uint8, device=b.device)
    q4[:, row, :, k] = (b & 0xF).permute(2, 0, 1)
    q4[:, row, :, k + kh] = (b >> 4).permute(2, 0, 1)
    return q4.reshape(NB * 16, pw.K_pad)[:pw.N, :pw.K]
