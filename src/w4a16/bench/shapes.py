"""What is measured: the layer shapes (presets and custom), the M values, and one point of the grid."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import spec
from ..errors import expect


@dataclass(frozen=True)
class Shape:
    """One linear layer: y [M, N] = x [M, K] @ W^T, W [N, K].

    model: "8B", "70B" or "custom"; name: "qkv", "o", "gate_up", "down" or "NxK".
    """

    model: str
    name: str
    N: int
    K: int

    @property
    def label(self) -> str:
        """'70B gate_up' for a preset layer, 'custom 4096x4096' for a --shape."""
        return f"{self.model} {self.name}"


def _llama(model: str, hidden: int, qkv: int, ffn: int) -> tuple:
    return (Shape(model, "qkv", qkv, hidden), Shape(model, "o", hidden, hidden),
            Shape(model, "gate_up", 2 * ffn, hidden), Shape(model, "down", hidden, ffn))


# Llama-3 layers, (N, K): qkv = q + k + v heads, gate_up = the fused gate and up projections.
PRESETS = {
    "llama3-8b": _llama("8B", hidden=4096, qkv=6144, ffn=14336),
    "llama3-70b": _llama("70B", hidden=8192, qkv=10240, ffn=28672),
}

# Other model families' layers, (N, K), from each model's published config.json (hidden size,
# attention heads x head dim, key/value heads, intermediate size): for tuning sweeps and for
# measuring how a choice made on some families holds on others. Not measured by default.
FAMILIES = {
    "llama3.2-3b": _llama("3B", hidden=3072, qkv=5120, ffn=8192),       # 24 x 128 q, 8 kv heads
    "phi3-mini": _llama("Phi3", hidden=3072, qkv=9216, ffn=8192),       # 32 x 96 q, 32 kv heads
    "qwen2.5-7b": _llama("Qwen7B", hidden=3584, qkv=4608, ffn=18944),   # 28 x 128 q, 4 kv heads
    "gemma2-9b": (Shape("Gemma9B", "qkv", 8192, 3584), Shape("Gemma9B", "o", 3584, 4096),   # 16 x 256 q, 8 kv
                  Shape("Gemma9B", "gate_up", 28672, 3584), Shape("Gemma9B", "down", 3584, 14336)),
    "nemo-12b": (Shape("Nemo12B", "qkv", 6144, 5120), Shape("Nemo12B", "o", 5120, 4096),    # 32 x 128 q, 8 kv
                 Shape("Nemo12B", "gate_up", 28672, 5120), Shape("Nemo12B", "down", 5120, 14336)),
    # DeepSeek-V3's dense layers: MLA's q up-projection (128 heads x 192 from a 1536 rank), its output
    # projection (128 x 128 -> 7168) and the dense MLP of the first three layers (intermediate 18432).
    "deepseek-v3-dense": (Shape("DSV3", "q_b", 24576, 1536), Shape("DSV3", "o", 7168, 16384),
                          Shape("DSV3", "gate_up", 36864, 7168), Shape("DSV3", "down", 7168, 18432)),
}


def preset_layers(cli: bool = False, families: bool = False) -> dict:
    """(N, K) of every preset layer in preset order, by label ("8B qkv", ..., "70B down") or, with
    ``cli``, by command-line key ("8b.qkv", ..., "70b.down"); with ``families``, the layers of
    FAMILIES after them ("Qwen7B qkv" / "qwen7b.qkv", ...)."""
    groups = list(PRESETS.values()) + (list(FAMILIES.values()) if families else [])
    return {(s.label.lower().replace(" ", ".") if cli else s.label): (s.N, s.K)
            for layers in groups for s in layers}


DEFAULT_M = (1, 16, 64, 256, 1024, 4096)
QUICK_M = (1, 16, 1024)
QUICK_PRESET = "llama3-8b"

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class Point:
    """One measured GEMM: a layer at one M, activation dtype, group size and zero-point choice."""

    shape: Shape
    M: int
    dtype: torch.dtype
    group_size: int
    zeros: bool

    @property
    def N(self) -> int:
        return self.shape.N

    @property
    def K(self) -> int:
        return self.shape.K

    @property
    def group_size_effective(self) -> int:
        return self.K if self.group_size == -1 else self.group_size

    @property
    def dtype_name(self) -> str:
        return spec.dtype_name(self.dtype)


def _ints(text: str, arg: str) -> list:
    parts = [p.strip() for p in str(text).split(",") if p.strip()]
    expect(len(parts) > 0, arg, "a comma-separated list of integers", repr(text))
    try:
        return [int(p) for p in parts]
    except ValueError:
        expect(False, arg, "a comma-separated list of integers", repr(text))


def parse_shape(text: str) -> Shape:
    """'N,K' -> Shape('custom', 'NxK', N, K); N >= 1, K >= 2 and even."""
    vals = _ints(text, "--shape")
    expect(len(vals) == 2, "--shape", "N,K (two integers)", repr(text))
    N, K = vals
    expect(N >= 1 and K >= 2 and K % 2 == 0, "--shape", "N >= 1 and an even K >= 2", f"N={N}, K={K}")
    return Shape("custom", f"{N}x{K}", N, K)


def parse_m(text: str) -> tuple:
    """'1,16,64' -> (1, 16, 64): positive, de-duplicated, in the given order."""
    vals = _ints(text, "--m")
    expect(all(v >= 1 for v in vals), "--m", "positive integers", repr(text))
    return tuple(dict.fromkeys(vals))


def parse_dtypes(text: str) -> tuple:
    """'fp16' or 'fp16,bf16' -> the torch dtypes."""
    names = [p.strip() for p in str(text).split(",") if p.strip()]
    expect(len(names) > 0 and all(n in DTYPES for n in names), "--dtype",
           f"a comma-separated list of {tuple(DTYPES)}", repr(text))
    return tuple(DTYPES[n] for n in dict.fromkeys(names))


def parse_group_sizes(text: str) -> tuple:
    """'128' or '64,128' -> (64, 128); each one of spec.SUPPORTED_GROUP_SIZES."""
    vals = _ints(text, "--group-size")
    expect(all(v in spec.SUPPORTED_GROUP_SIZES for v in vals), "--group-size",
           f"values in {spec.SUPPORTED_GROUP_SIZES}", repr(text))
    return tuple(dict.fromkeys(vals))


def preset_shapes(names) -> tuple:
    """The layers of the named presets, in order, without repeats."""
    out = []
    for name in names:
        known = {**PRESETS, **FAMILIES}
        expect(name in known, "--preset", f"one of {tuple(known)}", repr(name))
        out.extend(s for s in known[name] if s not in out)
    return tuple(out)


def grid(shapes, ms, dtypes, group_sizes, zeros: bool) -> list:
    """Every Point, ordered shape-major so each weight is built once per (dtype, group size)."""
    return [Point(s, m, dt, g, zeros) for s in shapes for dt in dtypes for g in group_sizes for m in ms]
