"""GEMM epilogues: what a kernel does to ``alpha * x @ W^T + bias`` before it casts and stores.

``gemm(..., epilogue=...)`` takes one of:

* ``None``: y = alpha * x @ W^T + bias, [M, N].
* ``"silu_mul"``: for a fused gate/up weight, y = SiLU(gate) * up, [M, N / 2]. The weight's rows
  hold gate and up rows interleaved in blocks of :data:`PAIR_ROWS` (8): rows 16b .. 16b + 7 are
  gate rows 8b .. 8b + 7, rows 16b + 8 .. 16b + 15 are up rows 8b .. 8b + 7, so every kernel finds
  a gate value and its up value in the same thread. :func:`interleave_rows` (and
  :func:`pair_gate_up` for quantized weights) builds that order from the two projections;
  N must be a multiple of 16. Bias, when given, is [N] in the same interleaved order.
* ``"residual"``: y = alpha * x @ W^T + bias + residual, the residual [M, N] (x's dtype) added in
  fp32 before the cast (the o and down projections of a decoder layer).
* ``"residual_rmsnorm"``: the residual epilogue's h [M, N] and, from h as stored (x's dtype), the
  RMSNorm of the projection that reads it: n = weight * (h * rsqrt(mean(h^2) + eps)) with
  the mean over each row of h in fp32, the product with rsqrt rounded to x's dtype before the norm
  weight [N] multiplies it (in x's dtype), as Llama-, Qwen- and Mistral-style RMSNorm modules do.
  The kernels write both into one [2, M, N] tensor (h, then n); ``gemm`` returns the pair (h, n).
  A kernel computes the norm after the last tile of a row block is stored (each tile's
  per-row sums of squares are added in tile order: deterministic); a backend without it runs the
  residual epilogue and the norm in torch (:func:`rms_norm`).

The epilogue is applied after the whole K reduction (split-K partials are summed first).
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch

from .errors import expect, fail
from .weight import QuantizedWeight, join_parts

PAIR_ROWS = 8
NAMES = (None, "silu_mul", "residual", "residual_rmsnorm")
# The kernels' constexpr code of each epilogue.
CODES = {None: 0, "silu_mul": 1, "residual": 2, "residual_rmsnorm": 3}
WITH_RESIDUAL = ("residual", "residual_rmsnorm")


class Norm(NamedTuple):
    """An RMSNorm's weight (x's dtype) and epsilon: the "residual_rmsnorm" epilogue's (weight [N])
    or the input norm's (``gemm(input_norm=...)``, weight [K])."""

    weight: torch.Tensor
    eps: float


def code_of(epilogue: Optional[str]) -> int:
    """The kernels' code of ``epilogue`` (0 none, 1 silu_mul, 2 residual, 3 residual_rmsnorm)."""
    expect(epilogue in CODES, "epilogue", " or ".join(repr(n) for n in NAMES), repr(epilogue))
    return CODES[epilogue]


def resolve(epilogue: Optional[str], residual: Optional[torch.Tensor]) -> Optional[str]:
    """The epilogue a call runs: ``residual`` given without an epilogue means "residual"; an
    epilogue name that needs a residual without one, or a residual with another epilogue, is an
    error."""
    code_of(epilogue)
    if residual is not None:
        if epilogue is None:
            return "residual"
        expect(epilogue in WITH_RESIDUAL, "residual", f"None with epilogue={epilogue!r} (they do not combine)",
               "a tensor")
    elif epilogue in WITH_RESIDUAL:
        fail("residual", f"a tensor [..., N] with epilogue={epilogue!r}", "None")
    return epilogue


def chosen_as(epilogue: Optional[str]) -> Optional[str]:
    """The epilogue a backend and config are chosen for: "residual_rmsnorm" is chosen as
    "residual" (the GEMM is the same; a backend without the norm runs it afterwards in torch)."""
    return "residual" if epilogue == "residual_rmsnorm" else epilogue


def run_as(epilogue: Optional[str], native: tuple) -> Optional[str]:
    """The epilogue a backend whose kernels apply ``native`` runs for ``epilogue``."""
    return epilogue if epilogue in native else chosen_as(epilogue)


def out_shape(M: int, N: int, epilogue: Optional[str]) -> tuple:
    """Shape of a kernel's output for x [M, K] and a weight of N rows: [M, N], [M, N / 2] with
    "silu_mul", [2, M, N] (h, n) with "residual_rmsnorm"."""
    if epilogue == "residual_rmsnorm":
        return (2, M, N)
    return (M, out_features(N, epilogue))


def out_features(N: int, epilogue: Optional[str]) -> int:
    """Columns of y for a weight of N rows."""
    return N // 2 if epilogue == "silu_mul" else N


def check_epilogue_args(x: torch.Tensor, N: int, epilogue: Optional[str], residual: Optional[torch.Tensor]) -> None:
    """Validate the epilogue arguments of ``gemm`` for x [..., K] and a weight of N rows."""
    if epilogue == "silu_mul":
        expect(N % (2 * PAIR_ROWS) == 0, "w.shape[0] (N) with epilogue='silu_mul'",
               f"a multiple of {2 * PAIR_ROWS} (gate and up rows interleaved in blocks of {PAIR_ROWS})", N)
    if residual is not None:
        expect(isinstance(residual, torch.Tensor), "residual", "a torch.Tensor", type(residual).__name__)
        want = (*x.shape[:-1], N)
        expect(tuple(residual.shape) == want, "residual.shape", want, tuple(residual.shape))
        expect(residual.dtype == x.dtype, "residual.dtype", x.dtype, residual.dtype)
        expect(residual.device == x.device, "residual.device", x.device, residual.device)


def _checked_norm(x: torch.Tensor, size: int, weight, eps, weight_name: str, eps_name: str, what: str) -> Norm:
    """The Norm of ``weight`` ([size] in x's dtype, on x's device) and ``eps`` (a finite float >= 0),
    or a W4A16Error naming the argument (``what`` describes the expected weight)."""
    expect(isinstance(weight, torch.Tensor), weight_name, what, type(weight).__name__)
    expect(tuple(weight.shape) == (size,), f"{weight_name}.shape", (size,), tuple(weight.shape))
    expect(weight.dtype == x.dtype, f"{weight_name}.dtype", x.dtype, weight.dtype)
    expect(weight.device == x.device, f"{weight_name}.device", x.device, weight.device)
    expect(isinstance(eps, (float, int)) and not isinstance(eps, bool) and 0 <= eps < float("inf"),
           eps_name, "a finite float >= 0", repr(eps))
    return Norm(weight if weight.is_contiguous() else weight.contiguous(), float(eps))


def check_norm_args(x: torch.Tensor, N: int, epilogue: Optional[str], norm_weight, norm_eps) -> Optional[Norm]:
    """Validate the RMSNorm arguments of ``gemm`` (x [..., K], a weight of N rows): a Norm with
    "residual_rmsnorm", None otherwise (where norm_weight must be None)."""
    if epilogue != "residual_rmsnorm":
        expect(norm_weight is None, "norm_weight", f"None with epilogue={epilogue!r}", "a tensor")
        return None
    return _checked_norm(x, N, norm_weight, norm_eps, "norm_weight", "norm_eps",
                         "a tensor [N] with epilogue='residual_rmsnorm'")


def check_input_norm(x: torch.Tensor, K: int, input_norm) -> Optional[Norm]:
    """Validate ``gemm``'s ``input_norm`` (None, or (weight [K] in x's dtype, eps)) for x [..., K]."""
    if input_norm is None:
        return None
    expect(isinstance(input_norm, tuple) and len(input_norm) == 2, "input_norm", "None or (weight [K], eps)",
           type(input_norm).__name__)
    return _checked_norm(x, K, input_norm[0], input_norm[1], "input_norm[0]", "input_norm[1] (eps)", "a tensor [K]")


def rms_norm(h: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * (h * rsqrt(mean(h^2) + eps)) over h's last dim: the mean and the product with
    rsqrt in fp32, rounded to h's dtype, then the weight's product in h's dtype (h [..., N],
    weight [N] in h's dtype). Llama-, Qwen- and Mistral-style RMSNorm modules compute the same."""
    h32 = h.float()
    u = h32 * torch.rsqrt(h32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * u.to(h.dtype)


def rms_norm_backward(grad: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple:
    """(d loss / d h, d loss / d weight) in fp32 from grad = d loss / d rms_norm(h, weight, eps)
    [..., N] (roundings treated as exact)."""
    h32, g = h.float(), grad.float()
    rstd = torch.rsqrt(h32.pow(2).mean(-1, keepdim=True) + eps)
    u = h32 * rstd
    du = g * weight.float()
    dh = rstd * (du - u * (du * u).mean(-1, keepdim=True))
    return dh, (g * u).reshape(-1, h.shape[-1]).sum(0)


def interleave_rows(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gate, up [I, ...] -> [2I, ...] in the silu_mul row order (blocks of PAIR_ROWS rows,
    gate first). I must be a multiple of PAIR_ROWS."""
    expect(gate.shape == up.shape, "up.shape", tuple(gate.shape), tuple(up.shape))
    I = gate.shape[0]
    expect(I % PAIR_ROWS == 0, "gate.shape[0]", f"a multiple of {PAIR_ROWS}", I)
    rest = gate.shape[1:]
    g = gate.reshape(I // PAIR_ROWS, 1, PAIR_ROWS, *rest)
    u = up.reshape(I // PAIR_ROWS, 1, PAIR_ROWS, *rest)
    return torch.cat([g, u], 1).reshape(2 * I, *rest)


def split_rows(t: torch.Tensor, dim: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`interleave_rows` along ``dim``: (gate, up), each half of t's size there."""
    t = t.movedim(dim, 0)
    n = t.shape[0]
    p = t.reshape(n // (2 * PAIR_ROWS), 2, PAIR_ROWS, *t.shape[1:])
    g = p[:, 0].reshape(n // 2, *t.shape[1:]).movedim(0, dim)
    u = p[:, 1].reshape(n // 2, *t.shape[1:]).movedim(0, dim)
    return g, u


def silu_mul(pre: torch.Tensor) -> torch.Tensor:
    """SiLU(gate) * up of pre-activations [..., N] in the silu_mul row order, in pre's dtype
    (computed as pre is: pass fp32 for the reference)."""
    g, u = split_rows(pre, -1)
    return (torch.nn.functional.silu(g) * u).contiguous()


def silu_mul_backward(grad: torch.Tensor, pre: torch.Tensor) -> torch.Tensor:
    """d loss / d pre [..., N] (silu_mul row order) from grad = d loss / d (SiLU(gate) * up)
    [..., N / 2] and the pre-activations pre [..., N]; in pre's dtype."""
    g, u = split_rows(pre, -1)
    sig = torch.sigmoid(g)
    d_gate = grad * u * sig * (1 + g * (1 - sig))
    d_up = grad * g * sig
    return interleave_rows(d_gate.movedim(-1, 0), d_up.movedim(-1, 0)).movedim(0, -1)


def apply(y32: torch.Tensor, epilogue: Optional[str], residual: Optional[torch.Tensor]) -> torch.Tensor:
    """The epilogue on fp32 results y32 [M, N] (alpha and bias applied): the reference's rule
    (for "residual_rmsnorm" its h in fp32; :func:`finish` adds the norm after the cast)."""
    if epilogue == "silu_mul":
        return silu_mul(y32)
    if epilogue in WITH_RESIDUAL:
        return y32 + residual.reshape(y32.shape).float()
    return y32


def finish(y: torch.Tensor, epilogue: Optional[str], norm: Optional[Norm]) -> torch.Tensor:
    """A kernel's output from the epilogue's result y [M, ...] in x's dtype: y itself, or with
    "residual_rmsnorm" the [2, M, N] stack of h = y and its norm (:func:`rms_norm`)."""
    if epilogue == "residual_rmsnorm":
        return torch.stack([y, rms_norm(y, norm.weight, norm.eps)])
    return y


def pair_gate_up(gate, up):
    """A QuantizedWeight [2I, K] whose rows are those of the QuantizedWeights ``gate`` and ``up``
    (each [I, K], same K, group size, dtype and device, no act-order) in the silu_mul order."""
    for name, w in (("gate", gate), ("up", up)):
        expect(isinstance(w, QuantizedWeight), name, "a QuantizedWeight", type(w).__name__)
        expect(w.params.perm is None, f"{name}.perm", "None (act-order weights are not paired)", "a permutation")
    expect(up.shape == gate.shape, "up.shape", tuple(gate.shape), tuple(up.shape))
    expect(up.group_size == gate.group_size, "up.group_size", gate.group_size, up.group_size)
    codes, scales, zeros = join_parts([gate, up], lambda ts: interleave_rows(*ts))
    return QuantizedWeight.from_plain(codes, scales, zeros, gate.group_size)
