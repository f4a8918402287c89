"""Host side of the Gluon mixture-of-experts decode kernel (``kernel.py``): which layers and calls
it takes (``refusal``), its launch configs, and one token's expert layer in two launches
(``fused_moe_one_token``)."""
from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import torch

from ..decode.config import GluonDecodeConfig, auto_splits
from ..host import PRODUCER_REGS, gl_dtype, k_ranges, launch, smem_layouts, stage_blocks
from ..layout import half_chunk

ROWS = 64            # weight rows per program (one warpgroup; gate_up: and the same up rows)
# one token (the wgmma N of 8), one chunk per stage (a stage then spans one group of 128 or more:
# one scale row), symmetric weights scaled after the MMA; the down launch is a programmatic
# dependent. Ring depths from benchmarks/moe_gluon_stages.py on an H100 (bf16, the four presets,
# BENCHMARKS.md): gate_up 8 stages (10.3 KB each), down 4 (6.2 KB).
GATE_UP_CONFIG = GluonDecodeConfig(mt=8, warps=ROWS // 16, nch=1, stages=8, ws=True, pdl=False)
DOWN_CONFIG = GluonDecodeConfig(mt=8, warps=ROWS // 16, nch=1, stages=4, ws=True, pdl=True)
# K ranges of the gate_up launch: None lets ``gate_up_splits``'s rule choose (it splits only
# Qwen3-30B-A3B's small layer, in two: 16.1 -> 15.6 us on an H100; 2 ranges cost the bigger
# presets 6-8%, BENCHMARKS.md); benchmarks/moe_gluon_stages.py sets a number to time it
GATE_UP_SPLITS: Optional[int] = None


class MoeDecodeVariant(NamedTuple):
    """A compile-time variant of the kernel as ``w4a16 sass`` names it: the gate_up or the down
    launch, with its partials summed in split order (split 1) or one K range (and for down one
    choice)."""

    gate_up: bool
    split: int = 1

    def short(self) -> str:
        return f"moe-{'gate_up' if self.gate_up else 'down'}{' split' if self.split else ''}"


def refusal(T: int, E: int, I: int, H: int, g_gu: int, g_dn: int, dtype: torch.dtype, layouts: tuple,
            has_zeros: bool, scale_dtypes: tuple) -> Optional[str]:
    """None when the kernel computes this expert layer call, else why not: T tokens (1 only), E
    experts of gate_up [2I, H] and down [H, I] with effective group sizes g_gu, g_dn, activations
    of ``dtype``, the experts' kernel ``layouts`` (gate_up, down: 2 is the Triton layout the kernel
    reads), zero points or not, the scales' dtypes."""
    if T != 1:
        return f"T = {T} tokens: the Gluon MoE kernel computes one token"
    if dtype not in (torch.float16, torch.bfloat16):
        return f"dtype {dtype} is not fp16/bf16"
    if tuple(layouts) != (2, 2):
        return f"expert layouts {tuple(layouts)}: the kernel reads layout 2 (I and H multiples of 16)"
    if has_zeros:
        return "zero points: the kernel takes symmetric experts"
    if any(s != dtype for s in scale_dtypes):
        return f"scales of dtype {scale_dtypes}, not the activations' {dtype}"
    if I % ROWS or H % ROWS:
        return f"I = {I}, H = {H}: the kernel takes I % {ROWS} == 0 and H % {ROWS} == 0"
    for name, g, K in (("gate_up", g_gu, H), ("down", g_dn, I)):
        if half_chunk(g) != 64 or stage_blocks(GATE_UP_CONFIG, 64, g)[1] != 1 or K % 8:
            return (f"{name}: group size {g} over K = {K}: the kernel takes groups of 128 or more (one "
                    f"scale row per 128-value stage) and K % 8 == 0 (TMA)")
    if E * 2 * I >= 2 ** 31 // 16:
        return f"E * 2I = {E * 2 * I} rows: beyond the kernel's 32-bit row coordinates"
    return None


@functools.lru_cache(maxsize=8)
def box_layouts(dtype: torch.dtype):
    """(codes, x, scales) shared layouts of the kernel's boxes: the decode kernel's
    (``host.smem_layouts``) for one token's tile and 64-value half chunks."""
    return smem_layouts(GATE_UP_CONFIG, 64, dtype)


_DESCRIPTORS: dict = {}


def _weight_descriptors(codes: torch.Tensor, scales: torch.Tensor, rows: int, dtype: torch.dtype) -> tuple:
    """(codes, scales) TMA descriptors of one projection's experts in the Triton layout, boxes of
    ``rows`` weight rows: codes uint8 [E * R / 16, K_pad * 8] seen as [E * R / 16, K_pad / 32, 256],
    scales [G_pad, E * R]. Kept per (tensor, box): a graph replays the same tensors."""
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    key = (codes.data_ptr(), tuple(codes.shape), scales.data_ptr(), tuple(scales.shape), rows, dtype)
    got = _DESCRIPTORS.get(key)
    if got is None:
        cl, _, sl = box_layouts(dtype)
        nb, kb = codes.shape
        c3 = codes.view(nb, kb // 256, 256)
        got = (TensorDescriptor.from_tensor(c3, [rows // 16, 128 // 32, 256], cl),
               TensorDescriptor.from_tensor(scales, [1, rows], sl))
        if len(_DESCRIPTORS) >= 256:
            _DESCRIPTORS.clear()
        _DESCRIPTORS[key] = got
    return got


def _x_descriptor(x: torch.Tensor):
    """TMA descriptor of x [rows, K] (contiguous, 16-byte aligned) in boxes [8, 64]."""
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    _, xl, _ = box_layouts(x.dtype)
    return TensorDescriptor(x, list(x.shape), [x.shape[1], 1], [GATE_UP_CONFIG.mt, 64], xl)


def moe_constexprs(cfg: GluonDecodeConfig, group: int, dtype: torch.dtype, gate_up: bool, split: int) -> dict:
    """The kernel's constexpr arguments, in signature order, for one launch (``split``: the
    down launch's SPLIT, 1 when its partials are summed in split order)."""
    kh = half_chunk(group)
    _, _, gdiv = stage_blocks(cfg, kh, group)
    return dict(MT=cfg.mt, W=cfg.warps, KH=kh, NCH=cfg.nch, STAGES=cfg.stages, GDIV=gdiv, DTYPE=gl_dtype(dtype),
                SA=cfg.scale_after(False, group), GATE_UP=gate_up, SPLIT=split, PDL=cfg.pdl,
                PRODUCER_REGS=PRODUCER_REGS)


def down_splits(H: int, I: int, top_k: int, device: torch.device) -> tuple:
    """(stages per K range, K ranges) of the down launch: the decode kernel's wave model over the
    H / 64 * top_k (tile, choice) units of I / 128 stages each."""
    from ...device import sms_of

    n_stages = -(-I // 128)
    slots = sms_of(device) * DOWN_CONFIG.resident(64)
    splits = auto_splits(H // ROWS * top_k, n_stages, slots, 16.0 * DOWN_CONFIG.mt / 128)
    return k_ranges(n_stages, splits)


def gate_up_resident(cfg: Optional[GluonDecodeConfig] = None) -> int:
    """gate_up programs per SM by shared memory: two rings of codes and scales (gate, up) and one
    of x per stage, 1 KB reserved per program and 1 KB of barriers and slack (228 KB per SM)."""
    cfg = cfg or GATE_UP_CONFIG
    stage = 2 * (ROWS * 128 // 2 + ROWS * 2) + cfg.mt * 128 * 2
    return max(1, (228 * 1024) // (cfg.stages * stage + 2048))


def gate_up_splits(H: int, I: int, top_k: int, device: torch.device) -> tuple:
    """(stages per K range, K ranges) of the gate_up launch: ``GATE_UP_SPLITS`` if set, else as
    many ranges (of 2 stages or more) as keep its top_k * I / 64 tiles within one wave of resident
    programs: a small layer such as Qwen3-30B-A3B's (96 tiles of 16 stages) splits K in two, a
    grid of a wave or more stays whole (no partial sums)."""
    from ...device import sms_of

    n_stages = -(-H // 128)
    splits = GATE_UP_SPLITS
    if splits is None:
        slots = sms_of(device) * gate_up_resident()
        splits = max(1, min(slots // (I // ROWS * top_k), n_stages // 2))
    return k_ranges(n_stages, splits)


def fused_moe_one_token(x: torch.Tensor, gu_q: torch.Tensor, gu_s: torch.Tensor, dn_q: torch.Tensor,
                        dn_s: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, E: int, I: int,
                        H: int, g_gu: int, g_dn: int, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """One token's expert layer, y [1, H] in x's dtype, in two launches (``kernel.py``).

    x: fp16/bf16 [1, H]; gu_q, gu_s: the gate_up experts [E, 2I, H] in the Triton layout (codes
    uint8 [E * 2I / 16, K_pad * 8], scales [G_pad, E * 2I] in x's dtype); dn_q, dn_s: the down
    experts [E, H, I] likewise; topk_ids integer [1, k]; topk_weights float [1, k]; g_gu, g_dn:
    effective group sizes; out: y's tensor (contiguous [1, H] of x's dtype) or None. The caller
    checked ``refusal``."""
    dev = x.device
    k = topk_ids.shape[1]
    ids = topk_ids.reshape(-1).contiguous()
    tw = topk_weights.reshape(-1).contiguous()
    x = x.contiguous()
    if x.data_ptr() % 16:
        x = x.clone()
    h = torch.empty(k, I, dtype=x.dtype, device=dev)
    y = torch.empty(1, H, dtype=x.dtype, device=dev) if out is None else out
    from ...device import index_of
    from ...workspace import tile_counters
    from .kernel import w4a16_moe_decode_kernel as kernel

    # both launches' K ranges and workspaces first: no kernel (a first counters' fill) between them;
    # down's tile counters first, then gate_up's (its programs may still run while down's start)
    sps, ksplit = down_splits(H, I, k, dev)
    nsplit = k * ksplit
    part = torch.empty(nsplit * H if nsplit > 1 else 1, dtype=torch.float32, device=dev)
    tiles = I // ROWS
    gu_sps, gu_split = gate_up_splits(H, I, k, dev)
    part_gu = torch.empty(gu_split * k * tiles * 2 * ROWS if gu_split > 1 else 1, dtype=torch.float32, device=dev)
    cnt = tile_counters(dev, H // ROWS + k * tiles)
    # gate_up: (choice, 64 gate + the same 64 up rows) programs over all of H, or over its K ranges
    c_desc, s_desc = _weight_descriptors(gu_q, gu_s, ROWS, x.dtype)
    n_st = -(-H // 128)
    args = (c_desc, _x_descriptor(x), s_desc, h, ids, tw, part_gu, cnt[H // ROWS:], 2 * I, I, E, g_gu, n_st,
            gu_sps, gu_split, tiles)
    cfg = GATE_UP_CONFIG
    launch(kernel, (k * tiles, gu_split), args, moe_constexprs(cfg, g_gu, x.dtype, True, 1 if gu_split > 1 else 0),
           cfg, (cfg, "moe", True, gu_q.shape[1], index_of(dev)), n_desc=3)
    # down: (64-row tile, choice x K range) programs; a tile's partials summed in order by the last
    n_st = -(-I // 128)
    c_desc, s_desc = _weight_descriptors(dn_q, dn_s, ROWS, x.dtype)
    args = (c_desc, _x_descriptor(h), s_desc, y, ids, tw, part, cnt, H, H, E, g_dn, n_st, sps, ksplit, 0)
    cfg = DOWN_CONFIG
    launch(kernel, (H // ROWS, nsplit), args, moe_constexprs(cfg, g_dn, x.dtype, False, 1 if nsplit > 1 else 0), cfg,
           (cfg, "moe", False, dn_q.shape[1], index_of(dev)), n_desc=3)
    return y
