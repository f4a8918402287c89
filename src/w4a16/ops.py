"""The public GEMM entry point: validation, backend choice, and the torch.library custom op.

``gemm`` validates, asks :mod:`w4a16.backends.selection` which backend and config run the call
(``backend=`` and ``config=`` are the user's settings), takes the weight in that backend's
layout (``QuantizedWeight.prepared``) and runs it. Eager calls without autograd go straight to
the backend; under ``torch.compile``, or when x or bias needs a gradient, the call goes through
the custom op ``w4a16::gemm``, whose schema is backend-neutral (the prepared tensors as a list,
the backend and its config by name) and which has autograd registered (dX = alpha * dY @ W,
dbias = sum of dY; the int4 weight is frozen).
"""
from __future__ import annotations

import contextlib
import weakref
from typing import Any, Callable, List, NamedTuple, Optional

import torch

from .backends.base import Problem
from .backends.selection import Choice, availability_key, choose_nonfinite, problem_of, registry
from .backends.selection import choose as choose_backend
from .backends.selection import get as get_backend
from .backends.workspace import recall
from .epilogue import (Norm, check_epilogue_args, check_input_norm, check_norm_args, chosen_as, out_features,
                       out_shape, rms_norm, rms_norm_backward, run_as, silu_mul_backward)
from .epilogue import resolve as resolve_epilogue
from .tuning_cache import generation
from .validate import check_gemm_args
from .weight import QuantizedWeight

_CHOICES: dict = {}
MAX_CACHED = 4096
MAX_CALLS_PER_WEIGHT = 64
# Per weight: (its epoch, {call key: _Call}): the bound eager calls of the fast path (see gemm).
_CALLS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def choose(x: torch.Tensor, w: QuantizedWeight, config="auto", backend: str = "auto",
           epilogue: Optional[str] = None) -> Choice:
    """The :class:`~w4a16.backends.selection.Choice` (backend, config, reason) that
    ``gemm(x, w, config=config, backend=backend, epilogue=epilogue)`` runs.

    With ``config="auto"`` and ``backend="auto"``, a weight whose scales or zeros hold NaN or an
    infinity runs a config that follows the README's non-finite rule (``Backend.nonfinite_config``:
    the Triton tile config "128" where it runs, else the reference); the configs that apply a
    scale after a group's dot product, and the Gluon kernels, which fold the zero point into an
    offset, would not."""
    K = x.shape[-1]
    M = x.numel() // K if K else 0
    dev = x.device
    non_finite = (config == "auto" and backend == "auto" and isinstance(w, QuantizedWeight)
                  and not torch.compiler.is_compiling() and not w.params_finite())
    key = (M, w.shape, w.group_size_effective, x.dtype, w.params.zeros is not None, dev, config, backend,
           availability_key(dev), non_finite, epilogue)
    hit = _CHOICES.get(key)
    if hit is None or hit[1] != generation():
        if len(_CHOICES) >= MAX_CACHED:
            _CHOICES.clear()
        p = problem_of(x, w, epilogue)
        c = choose_nonfinite(p) if non_finite else choose_backend(p, backend, config)
        hit = _CHOICES[key] = (c, generation())
    return hit[0]


def describe_path(device) -> tuple:
    """(path, reason) for a decode-sized fp16 call on ``device``: path is the first backend that
    runs it, by ``Backend.path_label`` ("gluon", "triton", "triton-interpreter" for the Triton
    kernel in Triton's CPU interpreter, "reference")."""
    device = torch.device(device)
    p = Problem(1, 4096, 4096, 128, torch.float16, False, device)
    skipped = []
    for b in registry().values():
        reason = b.available(device) or b.supports(p)
        if reason is None:
            label = b.path_label(device)
            why = ("kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1)" if label == "triton-interpreter"
                   else f"{b.name} runs on {device}")
            return label, why + (f"; skipped: {'; '.join(skipped)}" if skipped else "")
        skipped.append(f"{b.name}: {reason}")
    return "none", "; ".join(skipped)  # pragma: no cover - the reference runs everywhere


def prepare(w: QuantizedWeight, backend: str = "auto"):
    """The weight in the layout of ``backend`` ("auto": the backend a one-row call on w's device
    would run), built now and kept on ``w``: calling it ahead of time moves that cost out of the
    first ``gemm``."""
    b = get_backend(backend) if backend != "auto" else choose_backend(
        Problem(1, w.shape[0], w.shape[1], w.group_size_effective, w.dtype, w.params.zeros is not None, w.device)).backend
    return w.prepared(b)


def _op_prepared(b, weight: List[torch.Tensor], shape: List[int]):
    """The prepared weight the op's tensors belong to (its launch plans are cached on it), or a
    new view of them when no live weight owns exactly these tensors."""
    return recall(b, weight) or b.from_op_tensors(list(weight), *shape)


@torch.library.custom_op("w4a16::gemm", mutates_args=())
def gemm_op(x: torch.Tensor, weight: List[torch.Tensor], bias: Optional[torch.Tensor], alpha: float,
            shape: List[int], backend: str, config: str, deterministic: bool, epilogue: str = "",
            residual: Optional[torch.Tensor] = None, norm_weight: Optional[torch.Tensor] = None,
            norm_eps: float = 0.0, in_norm_weight: Optional[torch.Tensor] = None,
            in_norm_eps: float = 0.0) -> torch.Tensor:
    """The GEMM as a custom op. x [M, K] fp16/bf16 contiguous (in the weight's stored K order);
    weight: the backend's prepared tensors (``Backend.op_tensors``); bias [N] or None;
    shape: [N, K, effective group size]; backend: its name; config: ``Backend.config_key``;
    epilogue: "" (none), "silu_mul", "residual" or "residual_rmsnorm"; residual: [M, N]
    contiguous with the last two; norm_weight [N] contiguous and norm_eps with "residual_rmsnorm";
    in_norm_weight [K] contiguous (in x's K order) and in_norm_eps: x is read RMS-normalized.
    -> y [M, N] in x's dtype ([M, N / 2] with "silu_mul", [2, M, N] (h, n) with "residual_rmsnorm")."""
    b = get_backend(backend)
    norm = None if norm_weight is None else Norm(norm_weight, norm_eps)
    in_norm = None if in_norm_weight is None else Norm(in_norm_weight, in_norm_eps)
    with _on_device_of(x):
        run = bound_run(b, _op_prepared(b, weight, shape), x.shape[0], x.dtype, bias is not None, alpha,
                        b.config_from_key(config), deterministic, epilogue or None, packed=True,
                        input_norm=in_norm is not None, N=shape[0])
        return run(x, bias, residual, norm, in_norm)


def bound_run(b, prepared, M: int, dtype: torch.dtype, has_bias: bool, alpha: float, cfg, deterministic: bool,
              epilogue: Optional[str], packed: bool = False, input_norm: bool = False, N: int = 0) -> Callable:
    """``b.bind(...)`` for ``epilogue`` as a callable ``run(x2, bias, residual=None, norm=None,
    input_norm=None)``. With "residual_rmsnorm" it returns (h, n) ([2, M, N] when ``packed``); a
    backend whose kernels lack that epilogue runs "residual" and the norm after it
    (:func:`eager_rms_norm`). ``input_norm``: each call passes the Norm x2 is normalized with, by
    the kernel where the backend does it (``Backend.input_norm``), else before it. ``N``:
    the weight's rows (0: not known), for :meth:`Backend.config_epilogues`."""
    if input_norm and not b.input_norm:
        inner = bound_run(b, prepared, M, dtype, has_bias, alpha, cfg, deterministic, epilogue, packed, N=N)

        def normalized(x2, bias, residual=None, norm=None, input_norm=None):
            return inner(eager_rms_norm(x2, input_norm), bias, residual, norm)
        return normalized
    kernel_epilogue = run_as(epilogue, b.config_epilogues(cfg, M, N))
    run = b.bind(prepared, M, dtype, has_bias, alpha, cfg, deterministic, kernel_epilogue, input_norm)
    if epilogue != "residual_rmsnorm":
        return run
    if kernel_epilogue == epilogue:
        if packed:
            return run

        def native(x2, bias, residual=None, norm=None, input_norm=None):
            y = run(x2, bias, residual, norm, input_norm)
            return y[0], y[1]
        return native

    def composed(x2, bias, residual=None, norm=None, input_norm=None):
        h = run(x2, bias, residual, None, input_norm)
        n = eager_rms_norm(h, norm)
        return torch.stack([h, n]) if packed else (h, n)
    return composed


def eager_rms_norm(h: torch.Tensor, norm: Norm) -> torch.Tensor:
    """``w4a16.epilogue.rms_norm`` of h [M, N] (contiguous, fp16/bf16) with ``norm`` (weight [N]
    contiguous in h's dtype) for an eager call: one Triton launch on a GPU
    (``backends/triton/rms_norm.py``), torch's operations elsewhere."""
    if h.is_cuda:
        from .backends.triton.rms_norm import rms_norm_rows
        return rms_norm_rows(h, norm.weight, norm.eps)
    return rms_norm(h, norm.weight, norm.eps)


def _on_device_of(x: torch.Tensor):
    """A context making x's CUDA device the current one when it is not (kernels launch on the
    current device); a no-op otherwise."""
    index = x.get_device()
    if index >= 0 and index != torch._C._cuda_getDevice():
        return torch.cuda.device(index)
    return contextlib.nullcontext()


@gemm_op.register_fake
def _gemm_fake(x, weight, bias, alpha, shape, backend, config, deterministic, epilogue="", residual=None,
               norm_weight=None, norm_eps=0.0, in_norm_weight=None, in_norm_eps=0.0):
    return x.new_empty(out_shape(x.shape[0], shape[0], epilogue or None))


# The op's optional trailing arguments (epilogue, residual, norm_weight, norm_eps, in_norm_weight,
# in_norm_eps) and their defaults.
OP_DEFAULTS = ("", None, None, 0.0, None, 0.0)


def _setup_backward(ctx, inputs, output):
    x, weight, bias, alpha, shape, backend, config, deterministic = inputs[:8]
    optional = (*inputs[8:], *OP_DEFAULTS[len(inputs) - 8:])
    epilogue, residual, norm_weight, norm_eps, in_norm_weight, in_norm_eps = optional
    # silu_mul's gradient needs the pre-activations (x and bias kept to recompute them), the norm's
    # h and its weight, the input norm's x and its weight
    extra = (x, bias) if epilogue == "silu_mul" else (output[0], norm_weight) if epilogue == "residual_rmsnorm" else ()
    if in_norm_weight is not None:
        extra = (*extra, x, in_norm_weight)
    ctx.save_for_backward(*weight, *extra)
    # torch hands backward the structure of the arguments as passed, trailing defaults dropped
    given = [i for i, (v, d) in enumerate(zip(optional, OP_DEFAULTS)) if ((v is not None) if d is None else v != d)]
    n_inputs = 9 + given[-1] if given else 8
    ctx.meta = (list(shape), backend, float(alpha), bias is not None, epilogue, len(weight), residual is not None,
                n_inputs, float(norm_eps), in_norm_weight is not None, float(in_norm_eps))


def _backward(ctx, grad):
    shape, backend, alpha, has_bias, epilogue, n_weight, has_residual, n_inputs, eps, has_in_norm, in_eps = ctx.meta
    saved = list(ctx.saved_tensors)
    b = get_backend(backend)
    W = b.dequantize(b.from_op_tensors(saved[:n_weight], *shape), grad.dtype)   # [N, K]
    gn = gin = None
    if epilogue == "residual_rmsnorm":
        h, norm_weight = saved[n_weight], saved[n_weight + 1]
        dh, dw = rms_norm_backward(grad[1], h, norm_weight, eps)
        grad = (grad[0].float() + dh).to(grad.dtype)                 # [M, N]: d loss / d h
        gn = dw.to(norm_weight.dtype)
    if epilogue == "silu_mul":
        x, bias = saved[n_weight], saved[n_weight + 1]
        if has_in_norm:
            x = rms_norm(x, saved[-1], in_eps)
        pre = torch.mm(x.float(), W.float().t()) * alpha
        if bias is not None:
            pre = pre + bias.float()
        grad = silu_mul_backward(grad.float(), pre).to(grad.dtype)    # [M, N]: d loss / d pre-activation
    gx = torch.mm(grad, W)
    if alpha != 1.0:
        gx = gx * alpha
    if has_in_norm:   # gx is d loss / d (the normalized x): through the norm to x and its weight
        x, in_weight = saved[-2], saved[-1]
        dx, dw = rms_norm_backward(gx, x, in_weight, in_eps)
        gx, gin = dx.to(x.dtype), dw.to(in_weight.dtype)
    gb = grad.float().sum(0).to(grad.dtype) if has_bias else None
    gr = grad if has_residual else None
    return (gx, [None] * n_weight, gb, None, None, None, None, None, None, gr, gn, None, gin, None)[:n_inputs]


gemm_op.register_autograd(_backward, setup_context=_setup_backward)


def gemm(x: torch.Tensor, w: QuantizedWeight, bias: Optional[torch.Tensor] = None, alpha: float = 1.0,
         config="auto", deterministic: bool = True, backend: str = "auto", epilogue: Optional[str] = None,
         residual: Optional[torch.Tensor] = None, norm_weight: Optional[torch.Tensor] = None,
         norm_eps: float = 1e-6, input_norm: Optional[tuple] = None):
    """y = alpha * (x @ W^T) + bias, W = w.dequantize(), then the epilogue.

    Args:
        x: fp16/bf16 [..., K] (any leading dims; non-contiguous x is copied).
        w: QuantizedWeight (N, K) whose scales have x's dtype, on x's device.
        bias: None or [N] in x's dtype.
        alpha: float scale of the product (applied in fp32 before bias).
        config: "auto" (measured choice), a named config ("128", "64", "decode", "reference", ...:
            ``w4a16.config_names()``) or a backend's config object (e.g. a GemmConfig).
        deterministic: True (default) combines split-K partial sums in a fixed order, so results
            are bitwise reproducible; False lets split-K configs add them with fp32 atomics.
        backend: "auto" or a name from ``w4a16.backends.registry()`` ("gluon", "triton",
            "reference"); a forced backend that cannot run the call raises W4A16Error with the reason.
        epilogue: None, "silu_mul" (y = SiLU(gate) * up of a weight whose gate and up rows are
            interleaved as ``w4a16.epilogue`` describes: y [..., N / 2]), "residual" or
            "residual_rmsnorm" (h = the residual epilogue's y, and n = its RMSNorm).
        residual: None or [..., N] in x's dtype, added in fp32 before the cast (implies
            epilogue="residual"; needed by "residual_rmsnorm").
        norm_weight: with "residual_rmsnorm" the RMSNorm's weight [N] in x's dtype; norm_eps its
            epsilon (``w4a16.epilogue.rms_norm``).
        input_norm: None or (weight [K] in x's dtype, eps): x is RMS-normalized first
            (``w4a16.epilogue.rms_norm(x, weight, eps)``), by the kernel where the backend reads x
            normalized (``Backend.input_norm``), else in torch before it.
    Returns:
        y [..., N] in x's dtype ([..., N / 2] with "silu_mul"); with "residual_rmsnorm" the pair
        (h, n), each [..., N]. Gradients flow to x, bias, residual and the norm weights.
    """
    compiling = torch.compiler.is_compiling()
    key = None
    if not compiling:
        if isinstance(x, torch.Tensor) and x.is_cuda and x.get_device() != torch._C._cuda_getDevice():
            with _on_device_of(x):  # weights on cuda:1 and so on
                return gemm(x, w, bias, alpha, config, deterministic, backend, epilogue, residual, norm_weight,
                            norm_eps, input_norm)
        # The eager fast path: a call like an earlier one on this weight (same x shape, dtype and
        # device, same kind of bias, alpha and settings, nothing needing a gradient, the weight
        # unchanged) reuses that call's validation, choice and bound launch.
        key = _call_key(x, bias, alpha, config, backend, deterministic, epilogue, residual, norm_weight, norm_eps,
                        input_norm)
        calls = _calls_of(w) if key is not None and isinstance(w, QuantizedWeight) else None
        hit = None if calls is None else calls.get(key)
        if hit is not None and hit.config_arg is config and w.prepared(hit.backend) is hit.prepared:
            x2 = x if hit.rows is None else x.view(hit.rows)
            if w.params.perm is not None:
                x2 = x2.index_select(1, w.params.perm)
            if residual is None and input_norm is None:
                y = hit.run(x2, bias)
            else:
                y = hit.run(x2, bias, None if residual is None else residual.view(x2.shape[0], -1),
                            None if norm_weight is None else Norm(norm_weight, norm_eps),
                            None if input_norm is None else Norm(*input_norm))
            return _shaped(y, hit.out)
    check_gemm_args(x, w, bias, alpha)
    epilogue = resolve_epilogue(epilogue, residual)
    N, K = w.shape
    check_epilogue_args(x, N, epilogue, residual)
    norm = check_norm_args(x, N, epilogue, norm_weight, norm_eps)
    in_norm = check_input_norm(x, K, input_norm)
    n_out = out_features(N, epilogue)
    M = x.numel() // K
    if compiling and isinstance(M, int) and isinstance(config, str):
        # Traced: the choice is computed once, at trace time, outside the graph (no graph break
        # in the selection code, which reads files and device properties).
        name, config_key, kernel_epilogue = _traced_choice(M, N, K, w.group_size_effective, x.dtype,
                                                           w.params.zeros is not None, x.device, config, backend,
                                                           epilogue)
        choice = None
        b = get_backend(name)
    else:
        choice = choose(x, w, config, backend, chosen_as(epilogue))
        b, config_key = choice.backend, choice.config_key
        kernel_epilogue = run_as(epilogue, b.config_epilogues(choice.config, M, N))
    x2 = x if x.dim() == 2 else x.reshape(-1, K)
    if w.params.perm is not None:
        x2 = x2.index_select(1, w.params.perm)
        if in_norm is not None:   # the norm weight follows x's columns
            in_norm = Norm(in_norm.weight.index_select(0, w.params.perm), in_norm.eps)
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    if bias is not None and not bias.is_contiguous():
        bias = bias.contiguous()
    r2 = None if residual is None else residual.reshape(-1, N).contiguous()
    out = (*x.shape[:-1], n_out) if x.dim() != 2 else None
    prepared = w.traced_prepared(b) if compiling else w.prepared(b)
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                                 for t in (x, bias, residual, norm_weight,
                                                           None if in_norm is None else in_norm.weight))
    if in_norm is not None and (compiling or needs_grad) and not b.input_norm:
        # traced torch code before the op (Inductor fuses it; autograd differentiates it)
        x2, in_norm = rms_norm(x2, in_norm.weight, in_norm.eps), None
    if compiling or needs_grad:
        # a backend without the norm runs the residual epilogue in the op and the norm as traced torch
        # code after it (Inductor fuses it into one kernel; autograd differentiates it)
        extra = (norm.weight, norm.eps) if kernel_epilogue == "residual_rmsnorm" else ()
        if in_norm is not None:
            extra = (*(extra or (None, 0.0)), in_norm.weight, in_norm.eps)
        y = gemm_op(x2, b.op_tensors(prepared), bias, float(alpha), [N, K, w.group_size_effective], b.name,
                    config_key, bool(deterministic), kernel_epilogue or "", r2, *extra)
        if norm is not None:
            y = (y[0], y[1]) if kernel_epilogue == epilogue else (y, rms_norm(y, norm.weight, norm.eps))
        return _shaped(y, out)
    run = bound_run(b, prepared, x2.shape[0], x2.dtype, bias is not None, float(alpha), choice.config,
                    bool(deterministic), epilogue, input_norm=in_norm is not None, N=N)
    y = run(x2, bias) if r2 is None and in_norm is None else run(x2, bias, r2, norm, in_norm)
    if key is not None and x.is_contiguous() and (in_norm is None or w.params.perm is None):
        calls = _calls_of(w)
        if len(calls) >= MAX_CALLS_PER_WEIGHT:
            calls.clear()
        calls[key] = _Call(b, prepared, config, (x2.shape[0], K) if out is not None else None, out, run)
    return _shaped(y, out)


def _shaped(y, out: Optional[tuple]):
    """y [M, n] (or the pair (h, n) of "residual_rmsnorm") viewed as ``out`` (None: as it is)."""
    if out is None:
        return y
    if isinstance(y, tuple):
        return y[0].view(out), y[1].view(out)
    return y.view(out)


def _assume_constant_result(fn):
    """``torch._dynamo.assume_constant_result`` without importing Dynamo when w4a16 is imported:
    Dynamo imports Triton, which must not be imported before the command line has set
    TRITON_INTERPRET on a machine without a GPU. The decorator only sets this attribute
    (tests/test_compile_model.py checks both that and that the traced choice leaves no graph break)."""
    fn._dynamo_marked_constant = True
    return fn


@_assume_constant_result
def _traced_choice(M: int, N: int, K: int, group: int, dtype: torch.dtype, zeros: bool, device: torch.device,
                   config, backend: str, epilogue: Optional[str] = None) -> tuple:
    """(backend name, config key, the epilogue its kernel runs: ``run_as``) for a call torch.compile
    is tracing: run by Dynamo at trace time and taken as a constant. The graph is specialized on
    the shapes it depends on."""
    c = choose_backend(Problem(M, N, K, group, dtype, zeros, device, chosen_as(epilogue)), backend, config)
    return c.backend.name, c.config_key, run_as(epilogue, c.backend.config_epilogues(c.config, M, N))


class _Call(NamedTuple):
    """What an eager call bound for the next call like it (see :func:`gemm`)."""

    backend: Any
    prepared: Any
    config_arg: Any        # the caller's config argument (compared by identity)
    rows: Optional[tuple]  # (M, K) to view an x of other than 2 dims as, or None
    out: Optional[tuple]   # the shape to view y [M, N] as, or None
    run: Callable          # run(x2 [M, K] contiguous, bias[, residual [M, N], norm]) -> y (bound_run)


def _calls_of(w: QuantizedWeight) -> dict:
    """The bound calls kept for ``w`` (dropped whenever its epoch moves: a bound call holds a
    prepared copy, and a stale one must not be kept alive)."""
    entry = _CALLS.get(w)
    if entry is None or entry[0] != w.epoch:
        entry = _CALLS[w] = (w.epoch, {})
    return entry[1]


def bound_calls(w: QuantizedWeight) -> list:
    """The launches ``gemm``'s eager fast path keeps bound for ``w``, one per kind of call seen
    since a call last found the weight changed (then they are dropped): each backend's bound
    object, e.g. a Gluon ``BoundDecode``."""
    return [c.run for c in _calls_of(w).values()]


def _call_key(x, bias, alpha, config, backend, deterministic, epilogue=None, residual=None, norm_weight=None,
              norm_eps=None, input_norm=None) -> Optional[tuple]:
    """The fast path's key, or None when the call must take the full path (a gradient is needed,
    x is not contiguous, alpha is a tensor, a bias that is not contiguous, a residual or norm
    weight that is not a contiguous tensor, an epilogue name that is not one, a norm epsilon that
    is not a float, an input norm that is not (a contiguous tensor, a float)). The key holds the
    shapes, dtypes and devices the full path validated."""
    if alpha.__class__ is not float and alpha.__class__ is not int or not isinstance(x, torch.Tensor):
        return None
    if x.requires_grad and torch.is_grad_enabled() or not x.is_contiguous():
        return None
    if residual is not None:
        if (not isinstance(residual, torch.Tensor) or epilogue not in (None, "residual", "residual_rmsnorm")
                or not residual.is_contiguous() or residual.requires_grad and torch.is_grad_enabled()):
            return None
        rsig = (residual.shape, residual.dtype, residual.get_device())
        if epilogue == "residual_rmsnorm":
            if (not isinstance(norm_weight, torch.Tensor) or not norm_weight.is_contiguous() or norm_eps.__class__
                    is not float or norm_weight.requires_grad and torch.is_grad_enabled()):
                return None
            rsig += (norm_weight.shape, norm_weight.dtype, norm_weight.get_device(), norm_eps)
        elif norm_weight is not None:
            return None
    elif (epilogue is None or epilogue == "silu_mul") and norm_weight is None:
        rsig = None
    else:
        return None
    if bias is None:
        bsig = None
    else:
        if not isinstance(bias, torch.Tensor) or bias.requires_grad and torch.is_grad_enabled() or not bias.is_contiguous():
            return None
        bsig = (bias.shape, bias.dtype, bias.get_device())
    isig = None
    if input_norm is not None:
        if input_norm.__class__ is not tuple or len(input_norm) != 2:
            return None
        nw, ne = input_norm
        if (not isinstance(nw, torch.Tensor) or not nw.is_contiguous() or ne.__class__ is not float
                or nw.requires_grad and torch.is_grad_enabled()):
            return None
        isig = (nw.shape, nw.dtype, nw.get_device(), ne)
    cfg = config if config.__class__ is str else id(config)
    return x.shape, x.dtype, x.get_device(), bsig, alpha, cfg, backend, deterministic, epilogue, rsig, isig
