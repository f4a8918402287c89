"""The mixture-of-experts entry points: ``grouped_gemm`` (one projection over the routed experts)
and ``fused_moe`` (the expert layer: gate_up, SiLU(gate)*up, down, the weighted sum over the k
choices). Backends: "triton" (a GPU, or Triton's CPU interpreter), "gluon" (on Hopper: one token's
layer on the Gluon decode kernel, :mod:`w4a16.backends.gluon.moe`, wherever it applies, the Triton
kernels for the rest) and "reference" (plain torch); "auto" takes "gluon" on a Hopper GPU whose
Triton builds the Gluon kernels (once ``AUTO_TAKES_GLUON``), else "triton" wherever it runs."""
from __future__ import annotations

from typing import List, Optional

import torch

from .. import spec
from ..errors import BackendRefused, expect, fail
from . import reference
from .routing import align, check_topk, direct
from .weights import QuantizedExperts

BACKENDS = ("auto", "triton", "gluon", "reference")
# Whether "auto" takes the Gluon MoE decode kernel on Hopper: once its GPU tests
# (tests/backends/gluon/test_moe_decode_gpu.py) have passed on a card (an H100, 2026-12-07:
# BENCHMARKS.md). Off, "gluon" must be asked for by name.
AUTO_TAKES_GLUON = True
# Whether calls of more than ALIGN_MAX_SLOTS slots group them with the two-launch align kernels
# (``moe_route.align_wide``: prefill's twenty-odd torch operations, each a launch and host time,
# down to two launches) instead of :func:`w4a16.moe.routing.align`. Their results equal it element
# for element (tests/moe/test_route_kernels.py: Triton's interpreter, and an H100, where the MoE
# tests passed and a Qwen3-30B-A3B-shaped prefill gave the same logits both ways, its host time
# 31.7 -> 16.4 ms: BENCHMARKS.md, 2026-12-07).
WIDE_ALIGN = True


_GLUON_REASONS: dict = {}


def _gluon_unavailable(device: str) -> Optional[str]:
    """Why the Gluon kernels do not run on ``device`` (e.g. "cuda:0"), or None: the dense Gluon
    backend's rule, asked once per device. A constant to torch.compile (see :func:`_loaded`)."""
    from ..backends.selection import get

    if device not in _GLUON_REASONS:
        _GLUON_REASONS[device] = get("gluon").available(torch.device(device))
    return _GLUON_REASONS[device]


_gluon_unavailable._dynamo_marked_constant = True


def _backend(x: torch.Tensor, backend: str) -> str:
    from ..backends.triton.env import interpreting

    expect(backend in BACKENDS, "backend", f"one of {BACKENDS}", repr(backend))
    runs = x.is_cuda or interpreting()
    if backend == "auto":
        if not runs:
            return "reference"
        gluon = AUTO_TAKES_GLUON and x.is_cuda and _gluon_unavailable(str(x.device)) is None
        return "gluon" if gluon else "triton"
    if backend == "triton" and not runs:
        raise BackendRefused("backend: expected a backend that runs this call, got 'triton' "
                             "(a CPU tensor without TRITON_INTERPRET=1)")
    if backend == "gluon":
        why = _gluon_unavailable(str(x.device))
        if why:
            raise BackendRefused(f"backend: expected a backend that runs this call, got 'gluon' ({why})")
    return backend


def block_m_for(slots: int, num_experts: int) -> int:
    """Rows per block of the grouped order: 16 when experts get few slots each (decode), 64 up to
    128 slots per expert on average, else 128."""
    if slots <= 16 * num_experts:
        return 16
    return 64 if slots <= 128 * num_experts else 128


def _route(topk_ids: torch.Tensor, num_experts: int):
    """The grouped order of topk_ids [T, k] for the Triton kernels: none for one token (``direct``:
    its k choices are k experts), one launch of the align kernel for the few slots of a decode
    step; above that two launches (``moe_route.align_wide``, with :data:`WIDE_ALIGN`) or the
    torch version, :func:`w4a16.moe.routing.align` (the same result)."""
    from ..backends.triton import moe_route

    if topk_ids.shape[0] == 1:
        return direct(topk_ids.contiguous())
    S = topk_ids.numel()
    bm = block_m_for(S, num_experts)
    if S <= moe_route.ALIGN_MAX_SLOTS:
        return moe_route.align(topk_ids.contiguous(), num_experts, bm)
    if WIDE_ALIGN:
        return moe_route.align_wide(topk_ids.contiguous(), num_experts, bm)
    return align(topk_ids, num_experts, bm)


def _check(x: torch.Tensor, experts, arg: str, K_name: str) -> None:
    """x [T, K] against ``experts`` (named ``arg``; K named ``K_name``). The messages are formatted
    only on failure (every eager MoE layer call runs these checks)."""
    expect(isinstance(experts, QuantizedExperts), arg, "a w4a16.moe.QuantizedExperts", type(experts).__name__)
    if not (isinstance(x, torch.Tensor) and x.dim() == 2):
        fail("x", "a 2-D tensor [T, K]", f"{x.dim()}-D" if isinstance(x, torch.Tensor) else type(x).__name__)
    spec.check_activation_dtype(x.dtype, "x")
    if x.dtype != experts.dtype:
        fail("x.dtype", f"{arg}'s scales dtype {experts.dtype}", x.dtype)
    if x.device != experts.device:
        fail("x.device", f"{arg}'s device {experts.device}", x.device)
    if x.shape[1] != experts.shape[2]:
        fail(f"x.shape[1] ({K_name})", f"{arg}'s K = {experts.shape[2]}", x.shape[1])


def grouped_gemm(x: torch.Tensor, experts: QuantizedExperts, topk_ids: torch.Tensor,
                 topk_weights: Optional[torch.Tensor] = None, gather: bool = True, backend: str = "auto",
                 out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """One projection over the routed experts: y [T*k, N], row s = x[s // k] @ W[e_s]^T (``gather``)
    or x[s] @ W[e_s]^T (x [T*k, K]), times topk_weights[s] when given; fp32 accumulation, cast to
    ``out_dtype`` (default x's dtype).

    x: fp16/bf16 [T, K] (or [T*k, K] without gather); experts: QuantizedExperts [E, N, K] of x's
    dtype; topk_ids: integer [T, k]; topk_weights: float [T, k] or None. A slot whose id is outside
    [0, E) (transformers passes E for a choice another rank owns) gets a row of zeros.
    """
    _check(x, experts, "experts", "K")
    T = x.shape[0] if gather else None
    E, N, K = experts.shape
    expect(isinstance(topk_ids, torch.Tensor) and topk_ids.dim() == 2, "topk_ids", "a 2-D tensor [T, k]",
           getattr(topk_ids, "shape", type(topk_ids).__name__))
    if T is None:
        T = topk_ids.shape[0]
        expect(x.shape[0] == topk_ids.numel(), "x.shape[0]", f"T*k = {topk_ids.numel()} rows (gather=False)", x.shape[0])
    check_topk(topk_ids, topk_weights if topk_weights is not None else topk_ids.float(), T, E)
    expect(topk_ids.device == x.device, "topk_ids.device", x.device, topk_ids.device)
    if topk_weights is not None:
        expect(topk_weights.device == x.device, "topk_weights.device", x.device, topk_weights.device)
    expect(out_dtype in (None, torch.float16, torch.bfloat16, torch.float32), "out_dtype",
           "None, torch.float16, torch.bfloat16 or torch.float32", out_dtype)
    out_dtype = out_dtype or x.dtype
    if _backend(x, backend) == "reference":   # "gluon": one projection runs on the Triton kernels
        return reference.grouped_gemm(x, experts, topk_ids, gather, topk_weights).to(out_dtype)
    S = topk_ids.numel()
    routing = _route(topk_ids, E)
    out = torch.zeros(S, N, dtype=out_dtype, device=x.device)   # slots of ids outside [0, E) stay 0
    tw = None if topk_weights is None else topk_weights.reshape(-1).contiguous()
    layout, tensors = kernel_tensors(experts, False)
    return _launch(x.contiguous(), layout, tensors, experts.shape, experts.group_size_effective, routing,
                   topk_ids.shape[1], gather, out, tw, False)


def kernel_tensors(experts: QuantizedExperts, silu_mul: bool):
    """(layout, [codes, scales, zeros]) of ``experts`` as the Triton kernels read them: layout 2
    (the dense kernels' layout of the experts as one weight [E * N, K], built on first use and then
    the only copy of the codes: :mod:`w4a16.backends.triton.moe_packed`) where every expert (and a
    gate_up weight's up half) starts on a 16-row block, else 0 (the plain tensors, read by
    :mod:`w4a16.backends.triton.moe`)."""
    from ..backends.selection import get
    from ..backends.triton.moe_packed import packable

    E, N, K = experts.shape
    if not packable(N, silu_mul):
        return 0, list(experts.plain_parts())
    w, backend = experts.weight, get(_loaded("triton"))
    pw = w.traced_prepared(backend) if torch.compiler.is_compiling() else w.prepared(backend)
    return 2, [pw.qk, pw.scales_t, pw.zeros_t]


def _loaded(name: str) -> str:
    """``name`` once its backend is loaded: run by Dynamo at trace time and taken as a constant,
    so that traced code asks the registry only for loaded backends (loading imports modules,
    which Dynamo does not trace). Marked as ``torch._dynamo.assume_constant_result`` marks (see
    ``w4a16.ops``: Dynamo is not imported with w4a16)."""
    from ..backends.selection import get

    get(name)
    return name


_loaded._dynamo_marked_constant = True


def _plain_experts(tensors: list, group: int) -> QuantizedExperts:
    """The experts of the plain tensors [codes [E, N, K/2], scales, zeros or None] (layout 0) with
    effective group size ``group`` (K: per channel)."""
    K = tensors[0].shape[2] * 2
    return QuantizedExperts(tensors[0], tensors[1], tensors[2], -1 if group == K else group)


def _launch(x: torch.Tensor, layout: int, tensors: list, shape: tuple, group: int, routing, top_k: int, gather: bool,
            out, tw: Optional[torch.Tensor], silu_mul: bool) -> torch.Tensor:
    """One grouped GEMM on the kernel of ``layout`` (:func:`kernel_tensors`); experts ``shape``
    (E, N, K) with effective group size ``group``. ``out``: the output tensor, or for a projection
    with the routing weights (``tw``) a callable that allocates the fp32 rows for a number of
    K splits ([splits, T*k, N]; the packed kernel splits K when its grid is small)."""
    E, N, K = shape
    if layout == 0:
        from ..backends.triton import moe as kernel

        experts = _plain_experts(tensors, group)
        if not callable(out):
            return kernel.grouped_gemm(x, experts, routing, top_k, gather, out, tw, silu_mul=silu_mul)
        planes = out(1)          # one plane [1, T*k, N]: the kernel writes its rows
        kernel.grouped_gemm(x, experts, routing, top_k, gather, planes[0], tw, silu_mul=silu_mul)
        return planes
    from ..backends.selection import get
    from ..backends.triton import moe_packed

    pw = get("triton").from_op_tensors([t for t in tensors if t is not None], E * N, K, group)
    n_out = N // 2 if silu_mul else N
    tile, splits = moe_packed.launch_plan(routing, n_out, pw.K_pad // pw.kc, E, x.device, silu_mul,
                                          may_split=callable(out))
    return moe_packed.grouped_gemm(x, pw, E, routing, top_k, gather, out(splits) if callable(out) else out, tw,
                                   silu_mul=silu_mul, tile=tile, splits=splits)


def fused_moe(x: torch.Tensor, gate_up: QuantizedExperts, down: QuantizedExperts, topk_ids: torch.Tensor,
              topk_weights: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """The expert layer of a mixture of experts, y [T, H] in x's dtype (:mod:`w4a16.moe.reference`
    has the contract): gate_up QuantizedExperts [E, 2I, H] (gate rows first, then up), down
    [E, H, I], the router's topk_ids integer [T, k] and topk_weights float [T, k]. The slots are
    grouped by expert on the device once and both GEMMs use that order. A choice whose id is
    outside [0, E) contributes nothing (transformers' experts modules skip the id E, which marks
    a choice another rank owns); ids are not read on the host (no sync). ``backend`` "gluon" (and
    "auto" on Hopper with ``AUTO_TAKES_GLUON``) runs one token's layer on the Gluon decode kernel
    where :func:`gluon_refusal` is None: two launches, no routing or combine kernel."""
    _check(x, gate_up, "gate_up", "H")
    E, I2, H = gate_up.shape
    expect(I2 % 2 == 0, "gate_up.shape[1]", "an even 2*I (gate rows, then up rows)", I2)
    expect(isinstance(down, QuantizedExperts), "down", "a w4a16.moe.QuantizedExperts", type(down).__name__)
    expect(tuple(down.shape) == (E, H, I2 // 2), "down.shape", (E, H, I2 // 2), tuple(down.shape))
    if not (down.dtype == x.dtype and down.device == x.device):
        fail("down", f"{x.dtype} on {x.device}", f"{down.dtype} on {down.device}")
    T = x.shape[0]
    check_topk(topk_ids, topk_weights, T, E)
    if not (topk_ids.device == x.device and topk_weights.device == x.device):
        fail("topk_ids/topk_weights device", x.device, f"{topk_ids.device} / {topk_weights.device}")
    # Traced calls go through the custom op; eager ones call its body directly (the same
    # computation without the op's dispatch, tens of microseconds per layer on the host).
    run = fused_moe_op if torch.compiler.is_compiling() else _fused_moe
    backend = _backend(x, backend)
    if backend == "reference":
        (gl, gt), (dl, dt) = ((0, list(w.plain_parts())) for w in (gate_up, down))
    else:
        (gl, gt), (dl, dt) = kernel_tensors(gate_up, True), kernel_tensors(down, False)
    dims = [E, I2 // 2, H, gate_up.group_size_effective, down.group_size_effective, gl, dl]
    return run(x, *gt, *dt, topk_ids, topk_weights, dims, backend)


def _fused_moe(x: torch.Tensor, gu_q: torch.Tensor, gu_s: torch.Tensor, gu_z: Optional[torch.Tensor],
               dn_q: torch.Tensor, dn_s: torch.Tensor, dn_z: Optional[torch.Tensor], topk_ids: torch.Tensor,
               topk_weights: torch.Tensor, dims: List[int], backend: str) -> torch.Tensor:
    """The body of :func:`fused_moe_op` (the arguments are described there)."""
    E, I, H, g_gu, g_dn, gu_layout, dn_layout = dims
    if backend == "reference":
        return reference.fused_moe(x, _plain_experts([gu_q, gu_s, gu_z], g_gu),
                                   _plain_experts([dn_q, dn_s, dn_z], g_dn),
                                   topk_ids, topk_weights)
    from ..backends.triton.moe_route import combine

    T, k = topk_ids.shape
    S = T * k
    if S == 0:
        return x.new_zeros((T, H))
    if backend == "gluon" and gluon_refusal(x, gu_s, gu_z, dn_s, dn_z, T, dims) is None:
        from ..backends.gluon.moe.launch import fused_moe_one_token

        return fused_moe_one_token(x, gu_q, gu_s, dn_q, dn_s, topk_ids, topk_weights, E, I, H, g_gu, g_dn)
    ids = topk_ids.contiguous()
    routing = _route(ids, E)
    a = _launch(x.contiguous(), gu_layout, [gu_q, gu_s, gu_z], (E, 2 * I, H), g_gu, routing, k, True,
                torch.empty(S, I, dtype=x.dtype, device=x.device), None, True)
    # fp32 rows per slot (per K split); rows of ids outside [0, E) are not read
    ys = _launch(a, dn_layout, [dn_q, dn_s, dn_z], (E, H, I), g_dn, routing, k, False,
                 lambda splits: torch.empty(splits, S, H, dtype=torch.float32, device=x.device),
                 topk_weights.reshape(-1).contiguous(), False)
    return combine(ys, ids, E, x.dtype)


def gluon_refusal(x: torch.Tensor, gu_s: torch.Tensor, gu_z: Optional[torch.Tensor], dn_s: torch.Tensor,
                  dn_z: Optional[torch.Tensor], T: int, dims: List[int]) -> Optional[str]:
    """None when the Gluon decode kernel computes this :func:`fused_moe_op` call (the arguments as
    there), else why not (``backends.gluon.moe.launch.refusal``; decided on the host, no sync)."""
    from ..backends.gluon.moe.launch import refusal

    E, I, H, g_gu, g_dn, gu_layout, dn_layout = dims
    return refusal(T, E, I, H, g_gu, g_dn, x.dtype, (gu_layout, dn_layout), gu_z is not None or dn_z is not None,
                   (gu_s.dtype, dn_s.dtype))


@torch.library.custom_op("w4a16::fused_moe", mutates_args=())
def fused_moe_op(x: torch.Tensor, gu_q: torch.Tensor, gu_s: torch.Tensor, gu_z: Optional[torch.Tensor],
                 dn_q: torch.Tensor, dn_s: torch.Tensor, dn_z: Optional[torch.Tensor], topk_ids: torch.Tensor,
                 topk_weights: torch.Tensor, dims: List[int], backend: str) -> torch.Tensor:
    """:func:`fused_moe` as a custom op (opaque to torch.compile, captured whole by CUDA graphs):
    the two projections' tensors as :func:`kernel_tensors` gives them (codes, scales, zeros or
    None), dims [E, I, H, gate_up's and down's effective group sizes, gate_up's and down's
    layouts (0 plain, 2 packed)], backend "triton", "gluon" (one token on the Gluon kernel where it
    applies, else as "triton") or "reference" (plain tensors).
    -> y [T, H] in x's dtype."""
    return _fused_moe(x, gu_q, gu_s, gu_z, dn_q, dn_s, dn_z, topk_ids, topk_weights, dims, backend)


@fused_moe_op.register_fake
def _fused_moe_fake(x, gu_q, gu_s, gu_z, dn_q, dn_s, dn_z, topk_ids, topk_weights, dims, backend):
    return x.new_empty((x.shape[0], dims[2]))
