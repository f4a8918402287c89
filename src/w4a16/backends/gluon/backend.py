"""The Hopper backend: hand-pipelined Gluon kernels for sm_90a (TMA ring, mbarriers, a producer
warp, register-operand wgmma). Today it has the decode kernel (M <= 64, ``decode.py``); larger M
goes to the Triton backend.

This module imports no Triton: the launcher is imported on the first ``run``.
"""
from __future__ import annotations

import functools
import json
from dataclasses import asdict
from typing import List, Optional

import torch

from ..base import Backend, Problem
from ..device import sms_of
from .config import NAMED, GluonDecodeConfig, candidates, heuristic
from .layout import GLUON_LAYOUT_VERSION, GluonPrepared, decode_params, prepare_decode, unpack_decode

TRITON_VERSION = "3.6.0"  # the Gluon API changes between releases: the kernels are written for this one
MAX_M = 64


@functools.lru_cache(maxsize=1)
def _triton_version() -> Optional[str]:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


@functools.lru_cache(maxsize=None)
def _config_from_key(key: str) -> GluonDecodeConfig:
    return GluonDecodeConfig(**json.loads(key))


class GluonBackend(Backend):
    name = "gluon"
    layout_version = GLUON_LAYOUT_VERSION
    config_type = GluonDecodeConfig

    def available(self, device: torch.device) -> Optional[str]:
        v = _triton_version()
        if v != TRITON_VERSION:
            return f"the Gluon kernels are written for triton {TRITON_VERSION}, found {v}"
        if device.type != "cuda":
            return "Gluon kernels need an sm_90 GPU (they do not run in Triton's interpreter)"
        major, minor = torch.cuda.get_device_capability(device)
        if (major, minor) != (9, 0):
            return f"compute capability {major}.{minor}: the Gluon kernels are built for sm_90a (Hopper)"
        return None

    def supports(self, p: Problem) -> Optional[str]:
        if not 1 <= p.M <= MAX_M:
            return f"M = {p.M}: the Gluon decode kernel takes M = 1..{MAX_M}"
        if p.K % 8:
            return f"K = {p.K}: x's rows must be a multiple of 16 bytes for TMA (K % 8 == 0)"
        return None

    def config_supports(self, cfg: GluonDecodeConfig, p: Problem) -> Optional[str]:
        if p.M > cfg.mt:
            return f"M = {p.M} > the config's token tile {cfg.mt}"
        return None

    # ------------------------------------------------------------------ the weight
    def prepare(self, qweight: torch.Tensor, w) -> GluonPrepared:
        return prepare_decode(qweight, w.scales, w.zeros, w.group_size_effective)

    def prepare_params(self, prepared: GluonPrepared, w) -> GluonPrepared:
        from dataclasses import replace

        s_t, o_t = decode_params(w.scales, w.zeros, prepared.N)
        return replace(prepared, scales_t=s_t, offs_t=o_t)

    def unpack_codes(self, prepared: GluonPrepared) -> torch.Tensor:
        q = unpack_decode(prepared)
        return (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous()

    def op_tensors(self, prepared: GluonPrepared) -> List[torch.Tensor]:
        t = [prepared.codes, prepared.scales_t]
        return t if prepared.offs_t is None else t + [prepared.offs_t]

    def from_op_tensors(self, tensors: List[torch.Tensor], N: int, K: int, group: int) -> GluonPrepared:
        from .layout import half_chunk

        kh = half_chunk(group)
        K_pad = -(-K // (2 * kh)) * 2 * kh
        return GluonPrepared(tensors[0], tensors[1], tensors[2] if len(tensors) > 2 else None, N, K, K_pad, group, kh)

    def dequantize(self, prepared: GluonPrepared, dtype: torch.dtype) -> torch.Tensor:
        pw = prepared
        q = unpack_decode(pw).float()
        s = pw.scales_t[:, :pw.N].t().float().repeat_interleave(pw.group, dim=1)[:, :pw.K]
        if pw.offs_t is None:
            return ((q - 8.0) * s).to(dtype)
        o = pw.offs_t[:, :pw.N].t().float().repeat_interleave(pw.group, dim=1)[:, :pw.K]
        return (q * s + o).to(dtype)

    # ------------------------------------------------------------------ configs
    def named_configs(self) -> dict:
        return {f"gluon-{k}": v for k, v in NAMED.items()}

    def default_config(self, p: Problem) -> GluonDecodeConfig:
        # Measured on the H200 (docs/gluon_decode_notes.md): faster than the Triton kernel on every
        # Llama layer at M = 1, 16 and 64, so it is the automatic choice there.
        return heuristic(p.M, p.N, p.K, p.group, sms_of(p.device))

    def candidates(self, p: Problem) -> list:
        return candidates(p.M, p.N, p.K, p.group, sms_of(p.device))

    def config_key(self, cfg: GluonDecodeConfig) -> str:
        return json.dumps(asdict(cfg), sort_keys=True, separators=(",", ":"))

    def config_from_key(self, key: str) -> GluonDecodeConfig:
        return _config_from_key(key)

    def config_label(self, cfg: GluonDecodeConfig) -> str:
        return cfg.short()

    # ------------------------------------------------------------------ running
    def run(self, x2, prepared, bias, alpha, cfg, deterministic=True, out=None):
        from .launch import run_decode

        if x2.data_ptr() % 16:  # TMA needs a 16-byte aligned base: take an aligned copy
            x2 = x2.clone()
        return run_decode(x2, prepared, bias, alpha, cfg, deterministic, out)
