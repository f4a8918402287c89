"""The portable backend: one Triton kernel (``gemm.py``) for sm_80 and newer, tuned on sm_90, and
the same kernel in Triton's CPU interpreter (``TRITON_INTERPRET=1``) for CI.

This module imports no Triton: the launcher is imported on the first ``run``.
"""
from __future__ import annotations

import functools
import importlib.util
from typing import List, Optional

import torch

from ...epilogue import NAMES as EPILOGUES
from ...pack import unpack_nibbles
from ...weight import dequantize_codes
from ..base import Backend, Problem
from ..device import sms_of
from .config import NAMED_CONFIGS, GemmConfig, config_from_key
from .env import interpreting
from .heuristics import candidate_configs, heuristic_config
from .layout import (LAYOUT_VERSION, PreparedWeight, chunk_length, prepare_layout, unpack_layout,
                     with_params)

INT32_LIMIT = 2**31


@functools.lru_cache(maxsize=1)
def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


@functools.lru_cache(maxsize=1)
def _launcher():
    from .launch import launch_gemm, launch_gemm_compiled

    return launch_gemm, launch_gemm_compiled


class TritonBackend(Backend):
    name = "triton"
    layout_version = LAYOUT_VERSION
    config_type = GemmConfig
    epilogues = EPILOGUES
    input_norm = True

    def available(self, device: torch.device) -> Optional[str]:
        if not triton_installed():
            return "Triton is not installed"
        if device.type == "cuda":
            major, minor = torch.cuda.get_device_capability(device)
            if major < 8:
                return f"compute capability {major}.{minor} < 8.0 (the Triton kernel needs sm_80+)"
            return None
        if device.type == "cpu":
            if interpreting():
                return None
            return "CPU tensors without TRITON_INTERPRET=1 (set it before Triton is imported)"
        return f"{device.type} tensors"

    def availability_key(self, device: torch.device):
        return interpreting() if device.type == "cpu" else None   # the CPU's answer follows TRITON_INTERPRET

    def path_label(self, device: torch.device) -> str:
        return "triton-interpreter" if device.type == "cpu" else self.name

    def nonfinite_config(self, p: Problem):
        # the tile config: every weight scaled per element before its dot product (the split-K
        # configs that scale a group's sum afterwards do not follow the rule with infinite scales)
        return NAMED_CONFIGS["128"]

    def supports(self, p: Problem) -> Optional[str]:
        if p.device.type == "cpu" and p.dtype == torch.bfloat16:
            return ("bf16 in Triton's CPU interpreter: the interpreter computes bf16 dots wrongly "
                    "(use fp16 on the CPU, or the reference backend)")
        kc = chunk_length(p.group)
        K_pad = -(-p.K // kc) * kc
        if p.N * K_pad // 2 >= INT32_LIMIT:
            return f"codes of {p.N} x {p.K} take >= 2**31 bytes (32-bit offsets)"
        return None

    # ------------------------------------------------------------------ the weight
    def prepare(self, qweight: torch.Tensor, w) -> PreparedWeight:
        return prepare_layout(w, qweight)

    def prepare_params(self, prepared: PreparedWeight, w) -> PreparedWeight:
        return with_params(prepared, w)

    def unpack_codes(self, prepared: PreparedWeight) -> torch.Tensor:
        return unpack_layout(prepared)

    def op_tensors(self, prepared: PreparedWeight) -> List[torch.Tensor]:
        t = [prepared.qk, prepared.scales_t]
        return t if prepared.zeros_t is None else t + [prepared.zeros_t]

    def from_op_tensors(self, tensors: List[torch.Tensor], N: int, K: int, group: int) -> PreparedWeight:
        kc = chunk_length(group)
        zeros_t = tensors[2] if len(tensors) > 2 else None
        return PreparedWeight(tensors[0], tensors[1], zeros_t, N, K, -(-K // kc) * kc, kc, group)

    # ------------------------------------------------------------------ configs
    def named_configs(self) -> dict:
        return NAMED_CONFIGS

    def default_config(self, p: Problem) -> GemmConfig:
        return heuristic_config(p.M, p.N, p.K, sms_of(p.device))

    def candidates(self, p: Problem) -> list:
        from .launch import uses_wgmma

        cands = candidate_configs(p.M, p.N, p.K, sms_of(p.device))
        if uses_wgmma(p.device):   # as Hopper launches run them, each once
            cands = sorted({c.for_wgmma() for c in cands}, key=lambda c: c.short())
        return cands

    def config_key(self, cfg: GemmConfig) -> str:
        return cfg.key()

    def config_from_key(self, key: str) -> GemmConfig:
        return config_from_key(key)

    def config_label(self, cfg: GemmConfig) -> str:
        return cfg.short()

    # ------------------------------------------------------------------ running
    def run(self, x2, prepared, bias, alpha, cfg, deterministic=True, out=None, epilogue=None, residual=None,
            norm=None, input_norm=None):
        return _launcher()[0](x2, prepared, bias, alpha, cfg, deterministic, out, epilogue, residual, norm, input_norm)

    def bind(self, prepared, M, dtype, has_bias, alpha, cfg, deterministic=True, epilogue=None, input_norm=False):
        from .launch import bind_gemm

        return bind_gemm(prepared, M, dtype, has_bias, alpha, cfg, deterministic, epilogue, input_norm)

    def dequantize(self, prepared: PreparedWeight, dtype: torch.dtype) -> torch.Tensor:
        pw = prepared
        G = -(-pw.K // pw.group)
        zeros = None if pw.zeros_t is None else pw.zeros_t[:G].t()
        return dequantize_codes(unpack_nibbles(unpack_layout(pw)), pw.scales_t[:G].t(), zeros, pw.group, dtype)

    def kernel_info(self, x2, prepared, bias, cfg) -> dict:
        from .launch import effective_block_m, split_plan

        _, compiled = _launcher()[1](x2, prepared, bias, 1.0, cfg)
        M, N = x2.shape[0], prepared.N
        splits, _ = split_plan(cfg, prepared.K_pad // prepared.kc)
        grid = (-(-M // effective_block_m(cfg, M)) * -(-N // cfg.block_n), splits)
        return dict(registers=int(getattr(compiled, "n_regs", 0) or 0),
                    shared_bytes=int(getattr(compiled.metadata, "shared", 0)),
                    spills=int(getattr(compiled, "n_spills", 0) or 0),
                    num_warps=int(getattr(compiled.metadata, "num_warps", cfg.num_warps)), grid=grid)
