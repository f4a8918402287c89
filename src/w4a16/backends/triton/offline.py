"""Offline compilation of the Triton GEMM kernel (``gemm.py``), the grouped MoE kernel
(``moe.py``) and the MoE layer's align kernels (``moe_route.py``) for sm_90a (``GPUTarget("cuda", 90, 32)``) on any machine: what ``w4a16 sass`` reads
and the C library bakes (the dense kernel)."""
from __future__ import annotations

from typing import Iterable

from .config import GemmConfig

GEMM_ARGS = ("x_ptr", "qk_ptr", "s_ptr", "z_ptr", "bias_ptr", "y_ptr", "part_ptr", "counter_ptr",
             "M", "N", "K", "chunks", "chunks_per_split", "n_blocks", "alpha")
ALIGNED_ARGS = ("x_ptr", "qk_ptr", "s_ptr", "z_ptr", "bias_ptr", "y_ptr", "part_ptr", "counter_ptr", "N", "K")


def chunk_of(group: int) -> int:
    """The layout's K chunk: 128 values, 64 for group size 32."""
    return 64 if group == 32 else 128


def compile_gemm(cfg: GemmConfig, dtype: str = "fp16", group: int = 128, has_zeros: bool = False,
                 has_bias: bool = True, epilogue: bool = True, even_k: bool = True,
                 aligned: Iterable[str] = ALIGNED_ARGS, epi: int = 0, input_norm: bool = False):
    """The kernel for ``cfg`` compiled for sm_90a (as :meth:`GemmConfig.for_wgmma` runs it).

    dtype: "fp16" or "bf16"; group: 32..256 or -1 (per channel); epilogue: the single-split kernel
    (alpha, bias and the store in the kernel) rather than one writing fp32 partials; even_k: K a
    multiple of the chunk; aligned: the arguments compiled as divisible by 16 (16-byte aligned
    pointers, sizes that are multiples of 16), as the launcher's real problems usually are; epi: the
    kernel's EPI (w4a16.epilogue.CODES; with 2 and 3 the residual pointer is an argument after
    bias_ptr, with 3 the norm's weight, scratch and epsilon after alpha, else they are constexpr
    None, so the C library's parameter list stays as it is); input_norm: the RMSNorm prologue (its
    weight and epsilon arguments after those, else constexpr None)."""
    import triton.language as tl

    from .gemm import w4a16_gemm_kernel

    cfg = cfg.for_wgmma()   # what a launch on the GPU this compiles for runs

    st = "*fp32" if cfg.wide_scales else f"*{dtype}"
    types = (f"*{dtype}", "*u8", st, st, f"*{dtype}", f"*{dtype}", "*fp32", "*i32",
             "i32", "i32", "i32", "i32", "i32", "i32", "fp32")
    kc = chunk_of(group)
    cx = dict(GROUP_LOG2=-1 if group == -1 else group.bit_length() - 1, KC=kc,
              ONE_SCALE=group == -1 or group % kc == 0, EVEN_K=even_k, BM=cfg.block_m, BN=cfg.block_n,
              EPILOGUE=epilogue, GROUP_M=cfg.group_m, SWAP_AB=cfg.swap_ab, UNROLL=cfg.unroll,
              PREFETCH=cfg.prefetch, SCALE_AFTER=cfg.scale_after, HAS_ZEROS=has_zeros, HAS_BIAS=has_bias,
              ATOMIC=False, USE_ASM=cfg.dequant == "magic", DTYPE=tl.float16 if dtype == "fp16" else tl.bfloat16,
              EPI=epi, PRO=input_norm)
    names = GEMM_ARGS
    if epi >= 2:
        names = names[:5] + ("res_ptr",) + names[5:]
        types = types[:5] + (f"*{dtype}",) + types[5:]
    else:
        cx["res_ptr"] = None
    if epi == 3:
        names += ("nw_ptr", "ss_ptr", "eps")
        types += (f"*{dtype}", "*fp32", "fp32")
    else:
        cx.update(nw_ptr=None, ss_ptr=None, eps=None)
    if input_norm:
        names += ("pn_ptr", "pro_eps")
        types += (f"*{dtype}", "fp32")
    else:
        cx.update(pn_ptr=None, pro_eps=None)
    return _compile_sm90a(w4a16_gemm_kernel, names, types, aligned, cx, cfg.num_warps, cfg.num_stages)


def _compile_sm90a(fn, names, types, aligned: Iterable[str], constexprs: dict, num_warps: int, num_stages: int):
    """``fn`` compiled for sm_90a: its arguments ``names`` of Triton ``types``, those in
    ``aligned`` declared divisible by 16, then the ``constexprs``."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from ..triton_compat import COMPILE_OPTIONS
    from .env import interpreter_unset

    given = dict(zip(names, types))
    # in the kernel's parameter order (a constexpr may sit between runtime arguments)
    sig = {k: "constexpr" if k in constexprs else given[k] for k in fn.arg_names}
    attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in aligned}
    with interpreter_unset():   # the interpreter must not take over compiling
        return triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs),
                              target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": num_warps, "num_stages": num_stages, **COMPILE_OPTIONS})


def weights_per_thread(cfg: GemmConfig, group: int) -> int:
    """Weights one thread dequantizes per main-loop iteration (block_n rows x unroll chunks)."""
    return cfg.block_n * chunk_of(group) * cfg.unroll // (32 * cfg.num_warps)


MOE_ARGS = ("x_ptr", "q_ptr", "s_ptr", "z_ptr", "tw_ptr", "out_ptr", "slots_ptr", "bexp_ptr", "N", "K", "G",
            "num_slots", "top_k", "num_experts", "stride_xm", "stride_om")
MOE_ALIGNED = ("x_ptr", "q_ptr", "s_ptr", "z_ptr", "tw_ptr", "out_ptr", "slots_ptr", "bexp_ptr", "N", "K", "G",
               "stride_xm", "stride_om")


PACKED_ARGS = ("x_ptr", "qk_ptr", "s_ptr", "z_ptr", "tw_ptr", "out_ptr", "slots_ptr", "bexp_ptr", "N", "K", "rows_w",
               "chunks", "chunks_per_split", "num_slots", "top_k", "num_experts", "stride_xm", "stride_om", "stride_os")
PACKED_ALIGNED = ("x_ptr", "qk_ptr", "s_ptr", "z_ptr", "tw_ptr", "out_ptr", "slots_ptr", "bexp_ptr", "N", "K",
                  "rows_w", "stride_xm", "stride_om")


def compile_moe(kernel, dtype: str = "fp16", group: int = 128, has_zeros: bool = False):
    """The grouped MoE kernel at ``kernel`` (a MoeKernel) compiled for sm_90a: with a MoeTile
    :func:`w4a16.backends.triton.moe.w4a16_moe_gemm` (the plain layout), with a PackedTile
    :func:`w4a16.backends.triton.moe_packed.w4a16_moe_packed` (layout 2). The gate_up variant
    writes the activation dtype, down fp32 rows times the routing weights; the direct variant reads
    int64 expert ids (topk_ids). Pointers and sizes compiled as 16-byte aligned, as a real layer's
    are. group -1: one group over K (a run-time size)."""
    import triton.language as tl

    from .moe import w4a16_moe_gemm
    from .moe_packed import PackedTile, w4a16_moe_packed

    t = kernel.tile
    out_t = f"*{dtype}" if kernel.silu_mul else "*fp32"
    ids_t = "*i64" if kernel.direct else "*i32"
    tl_dtype = tl.float16 if dtype == "fp16" else tl.bfloat16
    if isinstance(kernel.tile, PackedTile):
        kc = chunk_of(group)
        types = (f"*{dtype}", "*u8", f"*{dtype}", f"*{dtype}", "*fp32", out_t, "*i32", ids_t) + ("i32",) * 11
        cx = dict(GROUP_LOG2=-1 if group == -1 else group.bit_length() - 1, KC=kc,
                  ONE_SCALE=group == -1 or group % kc == 0, EVEN_K=True, BM=kernel.block_m, BN=t.block_n,
                  SWAP_AB=t.swap_ab, SCALE_AFTER=t.scale_after, GATHER=kernel.silu_mul,
                  MUL_WEIGHT=not kernel.silu_mul, HAS_ZEROS=has_zeros, SILU_MUL=kernel.silu_mul,
                  DIRECT=kernel.direct, USE_ASM=True, DTYPE=tl_dtype)
        return _compile_sm90a(w4a16_moe_packed, PACKED_ARGS, types, PACKED_ALIGNED, cx, t.num_warps, t.num_stages)

    types = (f"*{dtype}", "*u8", f"*{dtype}", f"*{dtype}", "*fp32", out_t, "*i32", ids_t) + ("i32",) * 8
    cx = dict(BLOCK_M=kernel.block_m, BLOCK_N=t.block_n, BLOCK_K=t.block_k, ONE_GROUP=group == -1,
              GATHER=kernel.silu_mul, MUL_WEIGHT=not kernel.silu_mul, HAS_ZEROS=has_zeros, SILU_MUL=kernel.silu_mul,
              DIRECT=kernel.direct, USE_ASM=True, DTYPE=tl_dtype)
    return _compile_sm90a(w4a16_moe_gemm, MOE_ARGS, types, MOE_ALIGNED, cx, t.num_warps, t.num_stages)


def compile_route_kernels(num_experts: int = 256, block_m: int = 128) -> list:
    """The MoE align kernels (``moe_route``: the one-program align of decode, the count and place
    kernels of ``align_wide``) compiled for sm_90a for ``num_experts`` experts, launched as
    ``moe_route.route_launches`` says: a Triton release that cannot lower them fails here, on a
    machine without a GPU (the interpreter runs them without lowering)."""
    from .moe_route import route_launches

    types = {"ids_ptr": "*i64", "counts_ptr": "*i32", "sorted_ptr": "*i32", "bexp_ptr": "*i32"}
    out = []
    for fn, (cx, warps, stages) in route_launches(num_experts, block_m).items():
        names = [a for a in fn.arg_names if a not in cx]
        out.append(_compile_sm90a(fn, names, [types.get(a, "i32") for a in names], (), cx, warps, stages))
    return out


def compile_decode_attention(variant, dtype: str = "fp16", sms: int = 132):
    """The decode attention kernel (``decode_attention``) compiled for sm_90a as its launch runs
    ``variant`` (a ``decode_attention.AttentionVariant``) on ``sms`` multiprocessors. Returns
    Triton's compiled kernel (``.asm["cubin"]`` for ``w4a16.sass.disasm``)."""
    from .decode_attention import attention_launch, decode_attention_kernel

    v = variant
    _, cx, warps, stages = attention_launch(v.batch, v.kv_heads, v.groups, v.head_dim, v.slots, sms)
    cx = dict(cx, MASK_KIND=v.mask, QK_NORM=v.qk_norm)
    act = f"*{dtype}"
    types = dict(q_ptr=act, k_ptr=act, v_ptr=act, cos_ptr=act, sin_ptr=act, keys_ptr=act, values_ptr=act,
                 len_ptr="*i64", mask_ptr={0: act, 1: "*i1", 2: act}[v.mask], out_ptr=act, part_ptr="*fp32",
                 ml_ptr="*fp32", counter_ptr="*i32", qn_ptr=act, kn_ptr=act, scale="fp32", qn_eps="fp32",
                 kn_eps="fp32")
    names = [a for a in decode_attention_kernel.arg_names if a not in cx]
    # pointers and row strides 16-aligned, as Triton specializes them for a real cache (D >= 16)
    aligned = [a for a in names if a.endswith("_ptr") or a.startswith("stride")]
    return _compile_sm90a(decode_attention_kernel, names, [types.get(a, "i32") for a in names], aligned, cx,
                          warps, stages)


def attention_elements_per_thread(variant, sms: int = 132) -> int:
    """Cache elements (keys and values) one thread loads per main-loop iteration of the decode
    attention kernel (the "weights" of ``w4a16 sass``'s instructions-per-weight)."""
    from .decode_attention import attention_launch

    v = variant
    _, cx, warps, _ = attention_launch(v.batch, v.kv_heads, v.groups, v.head_dim, v.slots, sms)
    return 2 * cx["BLOCK_N"] * v.head_dim // (32 * warps)


def compile_router_topk(num_experts: int = 128, k: int = 8, dtype: str = "bf16"):
    """The router top-k kernel (``moe_topk``) compiled for sm_90a for ``num_experts`` experts and
    top ``k`` on ``dtype`` logits (a Triton release that cannot lower it fails here, on a machine
    without a GPU)."""
    from .moe_topk import router_topk_kernel, topk_constexprs

    cx = topk_constexprs(num_experts, k, True)
    names = [a for a in router_topk_kernel.arg_names if a not in cx]
    types = dict(logits_ptr=f"*{dtype}", w_ptr=f"*{dtype}", ids_ptr="*i64")
    return _compile_sm90a(router_topk_kernel, names, [types.get(a, "i32") for a in names], (), cx, 4, 1)


def compile_rms_norm(N: int = 4096, dtype: str = "fp16"):
    """The one-launch RMSNorm of rows (``rms_norm``) compiled for sm_90a for rows of N elements of
    ``dtype``, with the block and warps its launcher picks."""
    from .rms_norm import launch_shape, rms_norm_kernel

    block, warps = launch_shape(N)
    names = ["h_ptr", "w_ptr", "y_ptr", "N", "eps"]
    types = [f"*{dtype}"] * 3 + ["i32", "fp32"]
    return _compile_sm90a(rms_norm_kernel, names, types, ("h_ptr", "w_ptr", "y_ptr"), dict(BLOCK=block), warps, 1)


def moe_weights_per_thread(kernel, group: int = 128) -> int:
    """Weights one thread dequantizes per main-loop iteration (two tiles with SiLU*up): BK values of
    K a step for a MoeTile, one layout chunk for a PackedTile."""
    t = kernel.tile
    k = getattr(t, "block_k", None) or chunk_of(group)
    return t.block_n * k * (2 if kernel.silu_mul else 1) // (32 * t.num_warps)
