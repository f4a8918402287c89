"""The public GEMM entry point: validation, kernel choice, and the torch.library custom op.

Which path runs (see :func:`describe_path`):
* CUDA tensors with Triton importable -> the Triton kernels;
* CPU tensors with TRITON_INTERPRET=1 -> the same kernels in Triton's interpreter (slow; for tests);
* otherwise -> :func:`w4a16.reference.gemm`.
"""
from __future__ import annotations

import functools
import importlib.util
from typing import List, Optional

import torch

from . import reference
from .config import DEQUANTS, KINDS, GemmConfig, resolve_named
from .dispatch import choose_config
from .backends.triton.env import interpreting  # plain Python, no Triton
from .backends.triton.layout import LAYOUT_VERSION, PreparedWeight, prepare_layout, widen_scales  # plain torch
from .validate import check_gemm_args
from .weight import QuantizedWeight


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def describe_path(device) -> tuple:
    """(path, reason) for tensors on ``device``: path is "triton", "triton-interpreter" or "reference"."""
    device = torch.device(device)
    if not triton_available():
        return "reference", "Triton is not installed"
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if major < 8:
            return "reference", f"compute capability {major}.{minor} < 8.0 (the kernels need sm_80+)"
        tuned = "tuned for sm_90 (Hopper)" if major == 9 else "runs, tuned for sm_90 (Hopper)"
        return "triton", f"CUDA device with compute capability {major}.{minor}: {tuned}"
    if device.type == "cpu" and interpreting():
        return "triton-interpreter", "CPU tensors and TRITON_INTERPRET=1: kernels run in Triton's interpreter"
    return "reference", f"{device.type} tensors (set TRITON_INTERPRET=1 to run the kernels on CPU)"


_PATH_CACHE: dict = {}
_CONFIG_CACHE: dict = {}


def _uses_kernels(device: torch.device) -> bool:
    """describe_path(device) != "reference", cached per device (TRITON_INTERPRET read each call)."""
    key = (device.type, device.index, device.type == "cpu" and interpreting())
    hit = _PATH_CACHE.get(key)
    if hit is None:
        hit = _PATH_CACHE[key] = describe_path(device)[0] != "reference"
    return hit


def prepare(w: QuantizedWeight, wide_scales: bool = False):
    """The weight in the kernels' private layout (built once, cached on ``w``); with
    ``wide_scales`` its scales and zeros in fp32 (see GemmConfig.wide_scales)."""
    key = (LAYOUT_VERSION, wide_scales)
    pw = w._prepared.get(key)
    if pw is None:
        pw = prepare_layout(w) if not wide_scales else widen_scales(prepare(w))
        w._prepared[key] = pw
    return pw


def chosen_config(x: torch.Tensor, w: QuantizedWeight, config="auto") -> "GemmConfig | str":
    """The GemmConfig ``gemm(x, w, config=config)`` would run, or "reference"."""
    cfg = config if config == "auto" else resolve_named(config)
    if cfg == "reference" or not _uses_kernels(x.device):
        return "reference"
    if cfg == "auto":
        M = x.numel() // x.shape[-1] if x.shape[-1] else 0
        N, K = w.shape
        key = (M, N, K, w.group_size_effective, x.dtype, x.device)
        hit = _CONFIG_CACHE.get(key)
        if hit is None:
            hit = _CONFIG_CACHE[key] = choose_config(M, N, K, w.group_size_effective, x.dtype, x.device)
        return hit
    return cfg


def _config_to_list(cfg: GemmConfig) -> List[int]:
    return [KINDS.index(cfg.kind), cfg.block_m, cfg.block_n, cfg.split_k, cfg.num_warps,
            cfg.num_stages, cfg.group_m, int(cfg.swap_ab), DEQUANTS.index(cfg.dequant), cfg.unroll,
            int(cfg.prefetch), int(cfg.wide_scales), int(cfg.scale_after)]


def _config_from_list(v: List[int]) -> GemmConfig:
    return GemmConfig(KINDS[v[0]], v[1], v[2], v[3], v[4], v[5], v[6], bool(v[7]), DEQUANTS[v[8]],
                      v[9], bool(v[10]), bool(v[11]), bool(v[12]))


def _run_kernel(x2: torch.Tensor, qk: torch.Tensor, scales_t: torch.Tensor, zeros_t: Optional[torch.Tensor],
                bias: Optional[torch.Tensor], alpha: float, K: int, group: int, kc: int,
                config: List[int], deterministic: bool) -> torch.Tensor:
    pw = PreparedWeight(qk, scales_t, zeros_t, scales_t.shape[1], K, qk.shape[1] // 8, kc, group)
    return _launcher()(x2, pw, bias, alpha, _config_from_list(config), deterministic)


@functools.lru_cache(maxsize=1)
def _launcher():
    from .backends.triton.launch import launch_gemm

    return launch_gemm


@torch.library.custom_op("w4a16::gemm", mutates_args=())
def gemm_op(x2: torch.Tensor, qk: torch.Tensor, scales_t: torch.Tensor, zeros_t: Optional[torch.Tensor],
            bias: Optional[torch.Tensor], alpha: float, K: int, group: int, kc: int,
            config: List[int], deterministic: bool) -> torch.Tensor:
    """The kernel as a custom op. x2 [M, K] fp16/bf16 contiguous; qk, scales_t [G_pad, N], zeros_t:
    the prepared layout (see w4a16.backends.triton.layout); bias [N] or None; config: a GemmConfig as a
    list. -> y [M, N]."""
    return _run_kernel(x2, qk, scales_t, zeros_t, bias, alpha, K, group, kc, config, deterministic)


@gemm_op.register_fake
def _gemm_fake(x2, qk, scales_t, zeros_t, bias, alpha, K, group, kc, config, deterministic):
    return x2.new_empty((x2.shape[0], scales_t.shape[1]))


def gemm(x: torch.Tensor, w: QuantizedWeight, bias: Optional[torch.Tensor] = None, alpha: float = 1.0,
         config="auto", deterministic: bool = True) -> torch.Tensor:
    """y = alpha * (x @ W^T) + bias, W = w.dequantize().

    Args:
        x: fp16/bf16 [..., K] (any leading dims; non-contiguous x is copied).
        w: QuantizedWeight (N, K) whose scales have x's dtype, on x's device.
        bias: None or [N] in x's dtype.
        alpha: float scale of the product (applied in fp32 before bias).
        config: "auto" (measured choice), "reference" (pure torch), a named config
            ("128", "64", "decode": see w4a16.config.NAMED_CONFIGS) or a GemmConfig.
        deterministic: True (default) combines split-K partial sums in a fixed order, so results
            are bitwise reproducible; False lets split-K configs add them with fp32 atomics.
    Returns:
        y [..., N] in x's dtype.
    """
    check_gemm_args(x, w, bias, alpha)
    cfg = chosen_config(x, w, config)
    if cfg == "reference":
        return reference.gemm(x, w, bias, alpha)
    N, K = w.shape
    x2 = x if x.dim() == 2 else x.reshape(-1, K)
    if w.perm is not None:
        x2 = x2.index_select(1, w.perm)
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    if bias is not None and not bias.is_contiguous():
        bias = bias.contiguous()
    pw = prepare(w, cfg.wide_scales)
    if torch.compiler.is_compiling():
        y = gemm_op(x2, pw.qk, pw.scales_t, pw.zeros_t, bias, float(alpha), K, pw.group, pw.kc,
                    _config_to_list(cfg), bool(deterministic))
    else:
        # Eager calls skip the op dispatcher and the config round trip: less host time per call.
        y = _launcher()(x2, pw, bias, float(alpha), cfg, bool(deterministic))
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], N)
