"""The implementations compared side by side, each behind one interface.

A peer reports why it cannot run a point (``unavailable`` -> reason, shown as "n/a: reason");
otherwise ``build(w, copies)`` prepares its form of the weight once per layer (``copies`` copies in
fresh memory, rotated past the L2), and ``Built.bind(x)`` gives one zero-argument callable per copy,
each returning y [M, N]. The runner checks the first call against ``w4a16.reference.gemm`` before
timing any.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

import w4a16

from .. import config as config_mod
from .. import ops
from ..backends.selection import ENTRIES
from ..errors import expect
from ..weight import QuantizedWeight
from . import roofline
from .shapes import Point

TINYGEMM_INNER_K_TILES = 8


@dataclass
class Built:
    """A peer made ready for one weight (all its copies), reused for every M.

    bind:  x [M, K] (the point's dtype) -> one zero-argument callable per weight copy, each
           returning y [M, N];
    label: x -> the configuration the peer runs for that x;
    keep:  what the callables need alive (the weight copies).
    """

    bind: Callable[[torch.Tensor], list]
    label: Callable[[torch.Tensor], str]
    keep: list = field(default_factory=list)


def clone_weight(w: QuantizedWeight) -> QuantizedWeight:
    """A copy of ``w`` in fresh memory (same values, its own prepared-layout cache)."""
    z = None if w.zeros is None else w.zeros.clone()
    return QuantizedWeight(w.qweight.clone(), w.scales.clone(), z, w.group_size, w.perm)


class Peer:
    """Base: name, compute dtype, modelled bytes, availability and build."""

    name = "peer"

    def dtype(self, p: Point) -> torch.dtype:
        """The activation dtype the peer computes in (its tolerance follows it)."""
        return p.dtype

    def weight_bytes(self, p: Point) -> int:
        """Bytes of one weight copy as the peer reads it (sets the number of rotating copies)."""
        return roofline.w4_bytes(0, p.N, p.K, p.group_size, p.zeros)

    def nbytes(self, p: Point) -> int:
        """Bytes one call moves: the weight plus x and y."""
        return self.weight_bytes(p) + roofline.activation_bytes(p.M, p.N, p.K)

    def unavailable(self, p: Point, device: torch.device) -> Optional[str]:
        """A reason this peer cannot run ``p`` on ``device``, or None."""
        return None

    def build(self, w: QuantizedWeight, copies: int) -> Built:
        """w: the weight (N, K), scales in the point's dtype; copies >= 1 weight copies to rotate."""
        raise NotImplementedError


class W4A16Peer(Peer):
    """``w4a16.gemm(x, w, config=..., backend=...)``: "w4a16" is the automatic choice,
    "w4a16[name]" a named config, "w4a16-<backend>" a forced backend."""

    def __init__(self, config: str = "auto", backend: str = "auto"):
        self.config = config
        self.backend = backend
        self.name = "w4a16" if backend == "auto" else f"w4a16-{backend}"
        if config != "auto":
            self.name += f"[{config}]"

    def _label(self, x, w) -> str:
        """What gemm runs for x, e.g. 'triton: splitk 16x64 k8 w4 s1 sa' ('128: reference: ...'
        for a named config that falls back)."""
        label = ops.choose(x, w, self.config, self.backend).label
        return label if self.config == "auto" else f"{self.config}: {label}"

    def build(self, w, copies):
        ws = [w] + [clone_weight(w) for _ in range(copies - 1)]
        cfg, backend = self.config, self.backend

        def bind(x):
            # w4a16.gemm is looked up at call time so a replaced entry point is what gets measured.
            return [lambda wi=wi: w4a16.gemm(x, wi, config=cfg, backend=backend) for wi in ws]

        return Built(bind, lambda x: self._label(x, w), ws)


class CublasPeer(Peer):
    """``torch.nn.functional.linear`` on the weight dequantized to fp16 or bf16 (cuBLAS on a GPU)."""

    def __init__(self, dtype: torch.dtype):
        self._dtype = dtype
        self.name = "cublas-fp16" if dtype == torch.float16 else "cublas-bf16"

    def dtype(self, p):
        return self._dtype

    def weight_bytes(self, p):
        return roofline.fp16_bytes(0, p.N, p.K)

    def build(self, w, copies):
        W = w.dequantize(self._dtype)  # [N, K]
        ws = [W] + [W.clone() for _ in range(copies - 1)]

        def bind(x):
            xd = x.to(self._dtype)
            return [lambda Wi=Wi: torch.nn.functional.linear(xd, Wi) for Wi in ws]

        return Built(bind, lambda x: "cuBLAS" if x.is_cuda else f"torch {x.device.type}", ws)


def tinygemm_scales_and_zeros(w: QuantizedWeight) -> torch.Tensor:
    """bf16 [K/g, N, 2] for ``aten._weight_int4pack_mm``: (s, zero_t) with W = (q - 8) * s + zero_t.

    Our weight is W = (q - z) * s, so zero_t = (8 - z) * s (z = 8 for a symmetric weight).
    """
    s = w.scales.float()
    z = 8.0 if w.zeros is None else w.zeros.float()
    return torch.stack([s, (8.0 - z) * s], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)


def tinygemm_pack(codes: torch.Tensor) -> torch.Tensor:
    """codes uint8 [N, K] (0..15) -> the packed int32 tiles of ``aten._convert_weight_to_int4pack``.

    On CUDA torch >= 2.5 takes uint8 [N, K/2] with element 2j in the HIGH nibble (the opposite of
    the plain format); older torch takes int32 [N, K]. On CPU the ``_for_cpu`` op takes int32 [N, K].
    """
    if codes.device.type != "cuda":
        return torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).contiguous(),
                                                                 TINYGEMM_INNER_K_TILES)
    c = codes.to(torch.int32)
    u8 = ((c[:, 0::2] << 4) | c[:, 1::2]).to(torch.uint8).contiguous()
    try:
        return torch.ops.aten._convert_weight_to_int4pack(u8, TINYGEMM_INNER_K_TILES)
    except RuntimeError as first:
        try:
            return torch.ops.aten._convert_weight_to_int4pack(c.contiguous(), TINYGEMM_INNER_K_TILES)
        except RuntimeError:
            raise first from None


class TorchInt4Peer(Peer):
    """torch's built-in int4 kernel (tinygemm) ``aten._weight_int4pack_mm``, bf16 only."""

    name = "torch-int4"

    def dtype(self, p):
        return torch.bfloat16

    def weight_bytes(self, p):
        return roofline.w4_bytes(0, p.N, p.K, p.group_size, zeros=True)  # always scales and zeros

    def unavailable(self, p, device):
        op = "_weight_int4pack_mm" if device.type == "cuda" else "_weight_int4pack_mm_for_cpu"
        if not hasattr(torch.ops.aten, op):
            return f"torch {torch.__version__} has no aten.{op}"
        if p.group_size not in (32, 64, 128, 256):
            return f"group_size {p.group_size} unsupported (32, 64, 128 or 256)"
        if p.N % 8 or p.K % (16 * TINYGEMM_INNER_K_TILES):
            return f"needs N % 8 == 0 and K % {16 * TINYGEMM_INNER_K_TILES} == 0, got N={p.N}, K={p.K}"
        return None

    def build(self, w, copies):
        expect(w.perm is None, "w.perm", "None (torch-int4 has no act-order)", "a permutation")
        g = w.group_size_effective
        packed = tinygemm_pack(w.unpack())
        sz = tinygemm_scales_and_zeros(w)
        mm = (torch.ops.aten._weight_int4pack_mm if packed.is_cuda else torch.ops.aten._weight_int4pack_mm_for_cpu)
        pairs = [(packed, sz)] + [(packed.clone(), sz.clone()) for _ in range(copies - 1)]

        def bind(x):
            xb = x.to(torch.bfloat16)
            return [lambda p=p, s=s: mm(xb, p, g, s) for p, s in pairs]

        return Built(bind, lambda x: f"tinygemm inner_k_tiles={TINYGEMM_INNER_K_TILES}", pairs)


def _gemlite():
    """(GemLiteLinear class, DType enum) from an installed gemlite, or None."""
    try:
        from gemlite import core
    except Exception:  # noqa: BLE001 - an optional peer may fail to import in any way
        return None
    cls = getattr(core, "GemLiteLinear", None) or getattr(core, "GemLiteLinearTriton", None)
    dt = getattr(core, "DType", None)
    return (cls, dt) if cls is not None and dt is not None else None


class GemlitePeer(Peer):
    """gemlite's Triton W4A16 layer (optional: only if installed), default settings."""

    name = "gemlite"

    def weight_bytes(self, p):
        return roofline.w4_bytes(0, p.N, p.K, p.group_size, zeros=True)

    def unavailable(self, p, device):
        if importlib.util.find_spec("gemlite") is None:
            return "gemlite not installed"
        if device.type != "cuda":
            return "gemlite needs a CUDA device"
        if _gemlite() is None:
            return "gemlite: import failed or no GemLiteLinear / DType in gemlite.core"
        return None

    def build(self, w, copies):
        expect(w.perm is None, "w.perm", "None", "a permutation")
        cls, DType = _gemlite()
        N, K = w.shape
        dt = DType.FP16 if w.dtype == torch.float16 else DType.BF16
        codes = w.unpack()  # uint8 [N, K]
        zeros = torch.full_like(w.scales, 8.0) if w.zeros is None else w.zeros
        layers = []
        for _ in range(copies):
            lin = cls(4, group_size=w.group_size_effective, in_features=K, out_features=N,
                      input_dtype=dt, output_dtype=dt)
            lin.pack(codes, w.scales, zeros, None)
            layers.append(lin)
        return Built(lambda x: [lambda lin=lin: lin(x) for lin in layers], lambda x: "default", layers)


PEER_NAMES = ("w4a16", "cublas-fp16", "cublas-bf16", "torch-int4", "gemlite")
BACKEND_NAMES = tuple(ENTRIES)


def make_peer(name: str) -> Peer:
    """One peer by its ``--peers`` name (see PEER_NAMES); "w4a16-<backend>" forces a backend."""
    if name.startswith("w4a16-") and name[6:] in BACKEND_NAMES:
        return W4A16Peer("auto", name[6:])
    factories: dict = {
        "w4a16": lambda: W4A16Peer("auto"),
        "cublas-fp16": lambda: CublasPeer(torch.float16),
        "cublas-bf16": lambda: CublasPeer(torch.bfloat16),
        "torch-int4": TorchInt4Peer,
        "gemlite": GemlitePeer,
    }
    expect(name in factories, "--peers",
           f"names from {PEER_NAMES} or w4a16-<backend> ({', '.join(BACKEND_NAMES)})", repr(name))
    return factories[name]()


def make_peers(names=PEER_NAMES, configs: bool = False) -> list:
    """The peers to run: by name, or with ``configs`` w4a16 "auto", every named config and cuBLAS fp16."""
    if configs:
        named = [W4A16Peer(n) for n in config_mod.NAMED_CONFIGS]
        return [W4A16Peer("auto")] + named + [CublasPeer(torch.float16)]
    return [make_peer(n) for n in dict.fromkeys(names)]

