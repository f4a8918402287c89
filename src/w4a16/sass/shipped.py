"""The kernel configurations the package ships, as compile cases for ``w4a16 sass``.

Shipped means: what a user's call can run without tuning. For each kernel, its named configs and
the decode heuristic's picks for the preset Llama layers (M = 1, 8, 16, 32, 64), in fp16 and bf16
with symmetric group-128 weights; the shipped tuning table's configs (``data/tuned.json``) in the
dtype and group size they were tuned for; and each kernel's first named config over every group
size, symmetric and with zero points (fp16). The grouped MoE kernel ("triton-moe"): the tile its
heuristic picks for each block size and projection (the one-token variant too), fp16 and bf16,
symmetric group 128, and its decode gate_up tile over every group size with and without zeros;
the same for the packed grouped kernel (layout 2), over each tile its rule can pick. The Gluon MoE
decode kernel ("gluon-moe"): its gate_up and down launches, each with and without the split sum,
fp16 and bf16, group 128, and group 256 and per channel in fp16. The decode attention kernel
("triton-attention"): the head layouts of :func:`attention_cases`, fp16 and bf16 (its "weights"
per thread are the cache elements a thread loads per loop iteration).
The GEMM epilogues (``w4a16.epilogue``: SiLU(gate) * up, the residual, the residual and the rows'
RMSNorm) on the decode heuristic's picks for the preset layers at M = 1 and 16 (fp16, bf16) and the
Triton kernel's named configs (fp16, with the RMSNorm prologue too): what a fused decoder layer
runs at decode.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, replace
from typing import Any, Iterable, List, Optional, Tuple

KERNELS = ("gluon-decode", "gluon-prefill", "triton", "triton-moe", "gluon-moe", "triton-attention")
GROUPS = (32, 64, 128, 256, -1)     # -1: one group over K (compiled with K = 4096)
PER_CHANNEL_K = 4096
DECODE_M = (1, 8, 16, 32, 64)
EPILOGUE_M = (1, 16)
EPILOGUES = ("silu_mul", "residual", "residual_rmsnorm")


@dataclass(frozen=True)
class KernelCase:
    """One compile: ``kernel`` (one of KERNELS) at ``config`` (the backend's config object) for
    ``dtype`` ("fp16" / "bf16") activations and weights of ``group`` (-1: per channel), symmetric or
    with zero points; ``epilogue`` None or a name of ``w4a16.epilogue``; ``input_norm``: x read
    RMS-normalized (the Triton kernel's prologue)."""
    kernel: str
    config: Any
    dtype: str = "fp16"
    group: int = 128
    zeros: bool = False
    epilogue: Optional[str] = None
    input_norm: bool = False

    @property
    def label(self) -> str:
        return self.config.short()

    @property
    def key(self) -> str:
        """A stable name of the case: kernel, config label, dtype, group, zeros and epilogue."""
        g = "pc" if self.group == -1 else f"g{self.group}"
        return (f"{self.kernel} {self.label} {self.dtype} {g}{' zeros' if self.zeros else ''}"
                f"{' ' + self.epilogue if self.epilogue else ''}{' input_norm' if self.input_norm else ''}")


def _tuned_cases() -> List[KernelCase]:
    """A case for every entry of the shipped tuning table, in the entry's dtype and group size
    (its key: backend|layout|device|M|N|K|group|dtype)."""
    from ..backends import get
    from ..backends.gluon.prefill.config import GluonPrefillConfig
    from ..tuning_cache import SHIPPED
    out = []
    for key, v in json.loads(SHIPPED.read_text())["entries"].items():
        parts = key.split("|")
        cfg = get(parts[0]).config_from_key(v["config"])
        kernel = "triton" if parts[0] == "triton" else (
            "gluon-prefill" if isinstance(cfg, GluonPrefillConfig) else "gluon-decode")
        group = int(parts[-2])
        out.append(KernelCase(kernel, cfg, parts[-1], -1 if group == int(parts[-3]) else group))
    return out


def _compile_key(case: KernelCase):
    """What decides the compiled kernel (the Triton kernel's split count is a run-time argument:
    only whether it splits at all matters)."""
    cfg = case.config
    if case.kernel == "triton":
        cfg = replace(cfg, split_k=min(cfg.split_k, 2))
    return case.kernel, cfg, case.dtype, case.group, case.zeros, case.epilogue, case.input_norm


def _unique(cases: Iterable[KernelCase]) -> List[KernelCase]:
    seen, out = set(), []
    for c in cases:
        k = _compile_key(c)
        if k not in seen:
            seen.add(k)
            out.append(c)
    return out


def decode_picks(ms: Iterable[int]) -> list:
    """The decode heuristic's configs for the preset layers at each M of ``ms`` (132 SMs, g128)."""
    from ..backends.gluon.decode.config import heuristic
    from ..bench.shapes import preset_layers

    return [heuristic(M, N, K, 128, 132) for (N, K) in preset_layers().values() for M in ms]


def named_and_heuristic() -> List[Tuple[str, Any]]:
    """(kernel, config) of the named configs and the decode heuristic's picks on the preset layers."""
    from ..backends.gluon.decode.config import NAMED as DECODE_NAMED
    from ..backends.gluon.prefill.config import NAMED as PREFILL_NAMED
    from ..backends.triton.config import NAMED_CONFIGS

    out = [("gluon-decode", c) for c in DECODE_NAMED.values()]
    out += [("gluon-prefill", c) for c in PREFILL_NAMED.values()]
    out += [("triton", c) for c in NAMED_CONFIGS.values()]
    out += [("gluon-decode", c) for c in decode_picks(DECODE_M)]
    return out


def shipped_cases(dtypes: Iterable[str] = ("fp16", "bf16"), kernels: Iterable[str] = KERNELS) -> List[KernelCase]:
    """Every compile case of the shipped configs (see the module docstring), without duplicates."""
    kernels, dtypes = tuple(kernels), tuple(dtypes)
    configs = [(k, c) for k, c in named_and_heuristic() if k in kernels]
    cases = [KernelCase(k, c, dt) for k, c in configs for dt in dtypes]
    cases += [c for c in _tuned_cases() if c.kernel in kernels and c.dtype in dtypes]
    firsts = {}
    for k, c in configs:
        firsts.setdefault(k, c)
    cases += [KernelCase(k, c, "fp16", g, z) for k, c in firsts.items() for g in GROUPS for z in (False, True)
              if "fp16" in dtypes]
    cases += epilogue_cases(dtypes, kernels)
    if "triton-moe" in kernels:
        cases += moe_cases(dtypes)
    if "gluon-moe" in kernels:
        cases += gluon_moe_cases(dtypes)
    if "triton-attention" in kernels:
        cases += attention_cases(dtypes)
    # the Triton kernel's configs as a Hopper launch runs them (GemmConfig.for_wgmma)
    cases = [replace(c, config=c.config.for_wgmma()) if c.kernel == "triton" else c for c in cases]
    return _unique(cases)


def epilogue_cases(dtypes: Iterable[str], kernels: Iterable[str]) -> List[KernelCase]:
    """The epilogue variants (see the module docstring)."""
    from ..backends.triton.config import NAMED_CONFIGS

    out = []
    if "gluon-decode" in kernels:
        out += [KernelCase("gluon-decode", c, dt, epilogue=e) for c in decode_picks(EPILOGUE_M) for dt in dtypes
                for e in EPILOGUES if e != "residual_rmsnorm" or c.norm_epilogue]
    if "triton" in kernels and "fp16" in tuple(dtypes):
        out += [KernelCase("triton", c, "fp16", epilogue=e) for c in NAMED_CONFIGS.values()
                for e in EPILOGUES]
        # the RMSNorm prologue (alone, and with the epilogue a fused layer's o projection runs)
        out += [KernelCase("triton", c, "fp16", epilogue=e, input_norm=True) for c in NAMED_CONFIGS.values()
                for e in (None, "residual_rmsnorm")]
    return out


def moe_cases(dtypes: Iterable[str]) -> List[KernelCase]:
    """The grouped MoE kernel's shipped variants (see the module docstring)."""
    from ..backends.triton.moe import MoeKernel, tile_for

    variants = [(bm, silu, direct) for bm in (16, 64, 128) for silu in (True, False) for direct in (False, True)
                if not (direct and bm != 16)]
    out = [KernelCase("triton-moe", MoeKernel(tile_for(bm, silu, 128, False), bm, silu, direct), dt)
           for bm, silu, direct in variants for dt in dtypes]
    if "fp16" in dtypes:
        out += [KernelCase("triton-moe", MoeKernel(tile_for(16, True, g, g == -1), 16, True), "fp16", g, z)
                for g in GROUPS for z in (False, True)]
    return out + packed_moe_cases(dtypes)


def attention_cases(dtypes: Iterable[str]) -> List[KernelCase]:
    """The decode attention kernel's variants (``w4a16.fused_attention``): Llama-3's heads at batch
    1 and 16 (bool mask), Qwen3-30B-A3B's with the q/k head norms, and head widths 64 (no mask,
    batch 64) and 256 (additive mask)."""
    from ..backends.triton.decode_attention import AttentionVariant as V

    variants = [V(), V(batch=16), V(groups=8, kv_heads=4, qk_norm=True), V(head_dim=64, groups=1, batch=64, mask=0),
                V(head_dim=256, groups=8, kv_heads=1, mask=2)]
    return [KernelCase("triton-attention", v, dt) for v in variants for dt in dtypes]


def gluon_moe_cases(dtypes: Iterable[str]) -> List[KernelCase]:
    """The Gluon MoE decode kernel's variants (see the module docstring)."""
    from ..backends.gluon.moe.launch import MoeDecodeVariant

    variants = [MoeDecodeVariant(gate_up, split) for gate_up in (True, False) for split in (0, 1)]
    out = [KernelCase("gluon-moe", v, dt) for v in variants for dt in dtypes]
    if "fp16" in dtypes:   # group sizes: the gate_up launch whole, the down launch with its split sum
        out += [KernelCase("gluon-moe", v, "fp16", g) for v in (variants[0], variants[3]) for g in (256, -1)]
    return out


def packed_moe_cases(dtypes: Iterable[str]) -> List[KernelCase]:
    """The packed grouped kernel's tiles: each tile ``packed_tile_for`` can pick on this Triton (decode
    widths 16, 32 and 64, one token's narrower gate_up tiles, and the prefill tiles) for gate_up and
    down, the one-token routing on them, and
    one decode tile over every group size, symmetric and with zero points (fp16)."""
    from ..backends.triton.moe import MoeKernel
    from ..backends.triton.moe_packed import packed_tile_for

    out = []
    for silu in (True, False):
        widths = {packed_tile_for(16, n, silu, blocks) for n in (16, 32, 768, 2048, 4096) for blocks in (None, 8)}
        kernels = [MoeKernel(t, 16, silu) for t in sorted(widths)]
        kernels += [MoeKernel(packed_tile_for(16, n, silu, 8), 16, silu, True) for n in (768, 4096)]
        kernels += [MoeKernel(packed_tile_for(bm, 4096, silu), bm, silu) for bm in (64, 128)]
        out += [KernelCase("triton-moe", k, dt) for k in kernels for dt in dtypes]
    if "fp16" in dtypes:
        tile = packed_tile_for(16, 4096, True)
        out += [KernelCase("triton-moe", MoeKernel(tile, 16, True), "fp16", g, z) for g in GROUPS for z in (False, True)]
    return out
