"""Offline compilation of the Gluon kernels for sm_90a (``GPUTarget("cuda", 90, 32)``), on any
machine: no GPU is needed, Triton ships ptxas. What ``w4a16 sass``, the C library's build and the
SASS tests compile."""
from __future__ import annotations

from typing import Optional

import torch

from ...errors import expect
from ...sass import disasm
from ..triton.env import interpreter_unset
from ..triton_compat import COMPILE_OPTIONS
from .decode.config import GluonDecodeConfig
from .decode.launch import decode_constexprs
from .host import smem_layouts, stage_blocks
from .layout import half_chunk
from .prefill.config import GluonPrefillConfig
from .prefill.launch import prefill_constexprs


def compile_gluon(kernel, signature: dict, constexprs: dict, num_warps: int, maxnreg: Optional[int],
                  launch_pdl: bool = False,
                  attrs: Optional[dict] = None):
    """``triton.compile`` of a Gluon kernel for sm_90a. TRITON_INTERPRET is set aside meanwhile (the
    interpreter must not take over compiling). ``maxnreg``: registers per thread (None: ptxas's
    choice). ``attrs``: Triton's argument attributes, e.g.
    {(4,): [["tt.divisibility", 16]]} (what the JIT infers from 16-byte aligned pointers and sizes)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    with interpreter_unset():
        return triton.compile(GluonASTSource(kernel, signature, constexprs, attrs), target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": num_warps, "maxnreg": maxnreg, "launch_pdl": launch_pdl,
                                       **COMPILE_OPTIONS})


def _desc_signature(dt: str, rows: int, ks: int, mt: int, kh: int, gps: int, layouts, epi: int = 0) -> dict:
    """The kernels' leading arguments (descriptors and pointers). The residual pointer is an
    argument with the residual epilogues (epi 2, 3) only, else a constexpr None (no kernel
    parameter: the C library's parameter list does not change)."""
    cl, xl, sl = layouts
    return {"c_desc": f"tensordesc<u8[{rows // 16}, {ks // 32}, 256],{cl!r}>",
            "x_desc": f"tensordesc<{dt}[{mt}, {kh}],{xl!r}>",
            "s_desc": f"tensordesc<{dt}[{gps}, {rows}],{sl!r}>",
            "o_desc": f"tensordesc<{dt}[{gps}, {rows}],{sl!r}>",
            "y_ptr": f"*{dt}", "bias_ptr": f"*{dt}", "res_ptr": f"*{dt}" if epi in (2, 3) else "constexpr",
            "part_ptr": "*fp32", "cnt_ptr": "*i32"}


def compile_decode(cfg: GluonDecodeConfig, dtype=torch.float16, has_zeros: bool = False, group: int = 128,
                   has_bias: bool = True, split_mode: int = 1, attrs: Optional[dict] = None, epi: int = 0):
    """The decode kernel for ``cfg`` compiled for sm_90a (a stream-K config compiles the stream-K
    kernel, whose split mode is always 3); epi: the epilogue's code (w4a16.epilogue.CODES)."""
    from .decode.kernel import w4a16_decode_kernel
    from .decode.stream_k import w4a16_decode_sk_kernel
    expect(epi != 3 or cfg.norm_epilogue, "epi", f"not 3 (the RMSNorm epilogue) with config {cfg.short()} "
           "(GluonDecodeConfig.norm_epilogue)", epi)
    if cfg.sk:
        split_mode = 3
    kh = half_chunk(group)
    ks, gps, _ = stage_blocks(cfg, kh, group)
    dt = "fp16" if dtype == torch.float16 else "bf16"
    sig = _desc_signature(dt, 16 * cfg.warps, ks, cfg.mt, kh, gps, smem_layouts(cfg, kh, dtype), epi)
    sig.update({"M": "i32", "N": "i32", "group": "i32", "n_stages": "i32",
                ("n_units" if cfg.sk else "stages_per_split"): "i32", "alpha": "fp32"})
    # the RMSNorm epilogue's weight, partial sums and epsilon: constexpr None without it
    norm = {"nw_ptr": f"*{dt}", "ss_ptr": "*fp32", "eps": "fp32"}
    sig.update(norm if epi == 3 else {k: "constexpr" for k in norm})
    cx = decode_constexprs(cfg, kh, group, split_mode, has_zeros, has_bias, dtype, epi)
    sig.update({k: "constexpr" for k in cx})
    if epi != 3:
        cx = {**{k: None for k in norm}, **cx}
    cx = cx if epi in (2, 3) else {"res_ptr": None, **cx}
    return compile_gluon(w4a16_decode_sk_kernel if cfg.sk else w4a16_decode_kernel, sig, cx, cfg.warps, cfg.regs,
                         launch_pdl=cfg.pdl, attrs=attrs)


def compile_prefill(cfg: GluonPrefillConfig, dtype=torch.float16, has_zeros: bool = False, group: int = 128,
                    has_bias: bool = True, attrs: Optional[dict] = None, epi: int = 0):
    """The prefill kernel for ``cfg`` compiled for sm_90a; epi: the epilogue's code."""
    from .prefill.kernel import w4a16_prefill_kernel
    kh = half_chunk(group)
    ks, gps, _ = stage_blocks(cfg, kh, group)
    dt = "fp16" if dtype == torch.float16 else "bf16"
    sig = _desc_signature(dt, cfg.bn, ks, cfg.mt, kh, gps, smem_layouts(cfg, kh, dtype), epi)
    sig.update({"M": "i32", "N": "i32", "group": "i32", "n_k": "i32", "n_tn": "i32", "n_tm": "i32",
                "n_split": "i32", "kps": "i32", "alpha": "fp32"})
    cx = prefill_constexprs(cfg, kh, group, has_zeros, has_bias, dtype, cfg.splits > 1, epi)
    sig.update({k: "constexpr" for k in cx})
    cx = cx if epi == 2 else {"res_ptr": None, **cx}
    return compile_gluon(w4a16_prefill_kernel, sig, cx, cfg.warps, cfg.regs, attrs=attrs)


def decode_weights_per_thread(cfg: GluonDecodeConfig, group: int) -> int:
    """Weights one consumer thread dequantizes per pipeline stage (the main loop's iteration)."""
    return 16 * cfg.nch * 2 * half_chunk(group) // 32


def prefill_weights_per_thread(cfg: GluonPrefillConfig, group: int) -> int:
    """Weights one consumer thread dequantizes per stage (its warpgroup's bn rows x the stage's K)."""
    return cfg.bn * cfg.nch * 2 * half_chunk(group) // 128


def decode_stats(compiled, cfg: Optional[GluonDecodeConfig] = None, group: int = 128) -> dict:
    """SASS report of a compiled decode kernel: registers, shared bytes, spills (LDL/STL), and for the
    main loop (the longest backward branch holding HGMMA): its opcode histogram, HGMMA count, whether
    a wgmma wait sits between two consecutive HGMMAs, and instructions per weight (given cfg)."""
    cubin = compiled.asm["cubin"]
    ins = disasm.instructions(cubin)
    best = disasm.hgmma_loop(ins)
    loop = disasm.loop_stats(best, decode_weights_per_thread(cfg, group) if cfg is not None else 1)
    out = {"registers": disasm.registers(cubin), "shared_bytes": compiled.metadata.shared,
           "spills": disasm.spills(ins), "loop_instructions": loop.instructions, "loop_histogram": loop.histogram,
           "hgmma": loop.hgmma, "wait_between_hgmma": loop.wait_between_hgmma}
    if cfg is not None:
        out["weights_per_thread"] = loop.weights_per_thread
        out["instr_per_weight"] = round(loop.per_weight, 3)
    return out


def prefill_loops(ins) -> list:
    """The prefill kernel's K loops, one per consumer warpgroup: innermost backward branches that
    hold HGMMA and no global store (a tile loop holds the epilogue's STG), in address order."""
    found = [(lo, a, body) for lo, a, body in disasm.loops(ins)
             if any(o.startswith("HGMMA") for o in body) and not any(o.startswith("STG") for o in body)]
    inner = [L for L in found if not any(L[0] <= o[0] and o[1] <= L[1] and (o[0], o[1]) != (L[0], L[1])
                                         for o in found)]
    seen, mains = set(), []
    for lo, hi, body in sorted(inner):
        if (lo, hi) not in seen:
            seen.add((lo, hi))
            mains.append(body)
    return mains


def prefill_stats(compiled, cfg: Optional[GluonPrefillConfig] = None, group: int = 128) -> dict:
    """SASS report of a compiled prefill kernel: registers, shared bytes, spills (LDL/STL), setmaxnreg
    instructions, and for each consumer partition's main loop its opcode histogram, HGMMA count,
    whether a wgmma wait sits between two consecutive HGMMAs, and instructions per weight (given cfg)."""
    cubin = compiled.asm["cubin"]
    ins = disasm.instructions(cubin)
    per_thread = prefill_weights_per_thread(cfg, group) if cfg is not None else None
    loops_out = []
    for body in prefill_loops(ins):
        loop = disasm.loop_stats(body, per_thread or 1)
        d = {"instructions": loop.instructions, "spills": sum(1 for o in body if o.startswith(("LDL", "STL"))),
             "histogram": loop.histogram, "hgmma": loop.hgmma, "wait_between_hgmma": loop.wait_between_hgmma}
        if per_thread:
            d["weights_per_thread"] = per_thread
            d["instr_per_weight"] = round(loop.per_weight, 3)
        loops_out.append(d)
    return {"registers": disasm.registers(cubin), "num_warps": compiled.metadata.num_warps,
            "shared_bytes": compiled.metadata.shared, "spills": disasm.spills(ins),
            "setmaxnreg": sum(1 for _, o, _ in ins if o.startswith("USETMAXREG")), "main_loops": loops_out}


def compile_moe_decode(gate_up: bool, dtype=torch.float16, group: int = 128, split: int = 1,
                       attrs: Optional[dict] = None):
    """The mixture-of-experts decode kernel (``moe/kernel.py``) compiled for sm_90a: its gate_up
    launch (``gate_up``) or its down launch (``split``: 1 the partials summed in split order, 0 one
    K range, and for down one choice)."""
    from .moe.kernel import w4a16_moe_decode_kernel
    from .moe.launch import DOWN_CONFIG, GATE_UP_CONFIG, ROWS, box_layouts, moe_constexprs

    cfg = GATE_UP_CONFIG if gate_up else DOWN_CONFIG
    dt = "fp16" if dtype == torch.float16 else "bf16"
    cl, xl, sl = box_layouts(dtype)
    sig = {"c_desc": f"tensordesc<u8[{ROWS // 16}, 4, 256],{cl!r}>", "x_desc": f"tensordesc<{dt}[{cfg.mt}, 64],{xl!r}>",
           "s_desc": f"tensordesc<{dt}[1, {ROWS}],{sl!r}>",
           "y_ptr": f"*{dt}", "ids_ptr": "*i64", "tw_ptr": "*fp32", "part_ptr": "*fp32", "cnt_ptr": "*i32"}
    sig.update({k: "i32" for k in ("rows_per_expert", "n_out", "num_experts", "group", "n_stages", "stages_per_split",
                                   "ksplit", "tiles")})
    cx = moe_constexprs(cfg, group, dtype, gate_up, split)
    sig.update({k: "constexpr" for k in cx})
    return compile_gluon(w4a16_moe_decode_kernel, sig, cx, cfg.warps, cfg.regs, launch_pdl=cfg.pdl, attrs=attrs)


def moe_decode_weights_per_thread(gate_up: bool, group: int = 128) -> int:
    """Weights one consumer thread of the MoE decode kernel dequantizes per stage (64 rows x 128,
    twice for gate_up: the gate and the up rows)."""
    from .moe.launch import DOWN_CONFIG

    return (2 if gate_up else 1) * decode_weights_per_thread(DOWN_CONFIG, group)
