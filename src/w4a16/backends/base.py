"""The seam between the public API and the kernel implementations.

A :class:`Backend` is one implementation of the GEMM contract (``w4a16.spec``): the portable
Triton kernel, a Hopper-only Gluon kernel, the pure-torch reference. It says whether it can run
on a device and whether it supports a :class:`Problem` (each with the reason when not), repacks a
weight into its own private layout (``prepare``, versioned by ``layout_version``), names its
configs and tuning candidates, runs, and describes a launch. ``w4a16.ops`` and the tuner only
talk to this interface, so a new implementation is a folder under ``w4a16/backends/`` and one
entry in :mod:`.registry`.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any, List, Optional

import torch


@dataclass(frozen=True)
class Problem:
    """One GEMM call's shape: x [M, K] @ W[N, K]^T.

    group: the effective group size (K for per-channel weights); dtype: x's dtype (fp16/bf16);
    has_zeros: the weight carries zero points; device: x's device; epilogue: None, "silu_mul" or
    "residual" (``w4a16.epilogue``).
    """

    M: int
    N: int
    K: int
    group: int
    dtype: torch.dtype
    has_zeros: bool
    device: torch.device
    epilogue: Optional[str] = None

    @property
    def capability(self) -> Optional[tuple]:
        """(major, minor) of a CUDA device, None elsewhere."""
        if self.device.type != "cuda":
            return None
        return torch.cuda.get_device_capability(self.device)


class Backend(abc.ABC):
    """One implementation of ``y = alpha * (x @ dequant(W)^T) + bias``.

    Subclasses set ``name`` (what ``backend=`` takes), ``layout_version`` (bumped whenever the
    prepared layout changes; tuning entries and prepared copies are keyed on it) and
    ``config_type`` (the class of its configs, or None when it has none).
    """

    name: str = ""
    layout_version: int = 0
    config_type: Optional[type] = None
    #: True when ``prepare`` makes a full copy of the codes: the weight then drops its plain
    #: codes (rebuilt on demand with :meth:`unpack_codes`), so the codes are held once.
    owns_codes: bool = True
    #: The epilogues ``run`` applies (``w4a16.epilogue``); the others are refused with a reason.
    epilogues: tuple = (None,)
    #: True when ``run`` normalizes x itself (``input_norm``); otherwise ``w4a16.gemm`` normalizes x
    #: before the call.
    input_norm: bool = False

    # ------------------------------------------------------------------ where it runs
    @abc.abstractmethod
    def available(self, device: torch.device) -> Optional[str]:
        """None when the backend can run on ``device``, else the reason it cannot."""

    @abc.abstractmethod
    def supports(self, p: Problem) -> Optional[str]:
        """None when the backend computes ``p`` correctly, else the reason it does not."""

    def availability_key(self, device: torch.device) -> Any:
        """A value that changes whenever :meth:`available` on ``device`` may change its answer
        within a process (None: it never does); callers cache choices under it."""
        return None

    def path_label(self, device: torch.device) -> str:
        """How ``describe_path`` names this backend running on ``device``."""
        return self.name

    def nonfinite_config(self, p: Problem) -> Any:
        """A config that computes ``p`` by the contract's term-by-term IEEE rule when scales or
        zeros hold NaN or an infinity (README, "Non-finite values"), or None when none does."""
        return None

    # ------------------------------------------------------------------ the weight
    @abc.abstractmethod
    def prepare(self, qweight: torch.Tensor, w) -> Any:
        """The weight ``w`` (a QuantizedWeight) in this backend's layout. ``qweight`` is its plain
        uint8 [N, K/2] codes (``w.qweight`` may already be gone)."""

    def prepare_params(self, prepared: Any, w) -> Any:
        """``prepared`` with the scales and zeros of ``w`` (its codes unchanged)."""
        return self.prepare(self.unpack_codes(prepared), w)

    @abc.abstractmethod
    def unpack_codes(self, prepared: Any) -> torch.Tensor:
        """The plain uint8 [N, K/2] codes of a prepared weight (inverse of the repack)."""

    def op_tensors(self, prepared: Any) -> List[torch.Tensor]:
        """The tensors of a prepared weight, for the custom op's ``weight`` list."""
        return []

    def from_op_tensors(self, tensors: List[torch.Tensor], N: int, K: int, group: int) -> Any:
        """Inverse of :meth:`op_tensors`."""
        raise NotImplementedError(self.name)

    # ------------------------------------------------------------------ configs
    def named_configs(self) -> dict:
        """Configs users can ask for by name (``gemm(config="128")``)."""
        return {}

    def default_config(self, p: Problem) -> Any:
        """The untuned choice for ``p`` (a heuristic), or None when this backend should be chosen
        for ``p`` only by a measurement (a tuning entry)."""
        return None

    def candidates(self, p: Problem) -> list:
        """Configs ``w4a16.tune`` times for ``p``."""
        return []

    def config_supports(self, cfg: Any, p: Problem) -> Optional[str]:
        """None when ``cfg`` can run ``p`` (shared by the tuner and the heuristic), else why not."""
        return None

    def config_key(self, cfg: Any) -> str:
        """A string that :meth:`config_from_key` turns back into ``cfg`` (the custom op and the
        tuning cache carry configs as strings)."""
        return ""

    def config_from_key(self, key: str) -> Any:
        return None

    def config_label(self, cfg: Any) -> str:
        """A short human label of a config, for tables."""
        return self.name

    # ------------------------------------------------------------------ running
    def config_epilogues(self, cfg: Any, M: int = 0, N: int = 0) -> tuple:
        """The epilogues ``run`` applies with ``cfg`` to an output of M rows and N columns (0:
        not known) (by default :attr:`epilogues`, which a backend's selection goes by; one whose
        configs or sizes differ narrows it)."""
        return self.epilogues

    @abc.abstractmethod
    def run(self, x2: torch.Tensor, prepared: Any, bias: Optional[torch.Tensor], alpha: float, cfg: Any,
            deterministic: bool = True, out: Optional[torch.Tensor] = None, epilogue: Optional[str] = None,
            residual: Optional[torch.Tensor] = None, norm=None, input_norm=None) -> torch.Tensor:
        """y [M, N] = alpha * x2 @ W^T + bias, then the epilogue. x2 [M, K] contiguous fp16/bf16
        (already gathered by the weight's ``perm``); bias None or [N] contiguous; epilogue one of
        :attr:`epilogues`; residual [M, N] contiguous in x2's dtype with "residual" and
        "residual_rmsnorm"; norm a ``w4a16.epilogue.Norm`` (weight [N] contiguous) with
        "residual_rmsnorm"; input_norm None or the Norm (weight [K] in x2's K order, contiguous) x2
        is read RMS-normalized with (backends with :attr:`input_norm` only); out None or a
        contiguous tensor of y's shape (``epilogue.out_shape``: [M, N / 2] with "silu_mul",
        [2, M, N] with "residual_rmsnorm") and x2's dtype to write into. Launches on torch's
        current stream."""

    def bind(self, prepared: Any, M: int, dtype: torch.dtype, has_bias: bool, alpha: float, cfg: Any,
             deterministic: bool = True, epilogue: Optional[str] = None, input_norm: bool = False):
        """``run`` for repeated calls of one shape: a callable ``f(x2 [M, K], bias, residual=None,
        norm=None, input_norm=None) -> y`` (``w4a16.gemm`` keeps it for the next eager call like this
        one; ``input_norm`` True: each call passes one). A backend that can resolve its launch once
        overrides this to cut the host time per call."""
        return lambda x2, bias, residual=None, norm=None, input_norm=None: self.run(
            x2, prepared, bias, alpha, cfg, deterministic, None, epilogue, residual, norm, input_norm)

    def dequantize(self, prepared: Any, dtype: torch.dtype) -> torch.Tensor:
        """W [N, K] in stored K order, in ``dtype``, from the prepared weight alone (the custom
        op's backward pass computes dX = dY @ W with it)."""
        raise NotImplementedError(f"{self.name} cannot dequantize its prepared weight")

    def kernel_info(self, x2: torch.Tensor, prepared: Any, bias: Optional[torch.Tensor], cfg: Any) -> dict:
        """Resources of the launch ``run`` makes for these arguments (it runs it once):
        keys registers, shared_bytes, spills, num_warps, grid; empty when there is no kernel."""
        return {}
