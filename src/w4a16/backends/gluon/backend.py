"""The Hopper backend: hand-pipelined Gluon kernels for sm_90a (TMA ring, mbarriers, a producer
warp, register-operand wgmma): the decode kernel for M <= 64 (``decode/``) and the
warp-specialized prefill kernel above (``prefill/``), on one weight layout (``layout.py``); which
problems they take is ``support.py``'s rule. Both are measured
on an H200 and are ``backend="auto"``'s choice on sm_90 where the tuning table or the heuristic
says so.

This module imports no Triton: the launcher is imported on the first ``run``.
"""
from __future__ import annotations

import functools
import importlib.util
import json
from dataclasses import asdict
from typing import List, Optional

import torch

from ...errors import fail
from ..base import Backend, Problem
from ..device import sms_of
from .decode import config as decode_config
from .decode.config import NAMED, GluonDecodeConfig, candidates, heuristic
from .layout import GLUON_LAYOUT_VERSION, GluonPrepared, decode_params, prepare_decode, unpack_decode
from .prefill.config import NAMED as PREFILL_NAMED
from .prefill.config import GluonPrefillConfig, prefill_candidates, prefill_heuristic
from .support import MAX_DECODE_M, PREFILL_MIN_M, problem_reason

@functools.lru_cache(maxsize=1)
def _triton_unsupported() -> Optional[str]:
    """Why this process's Triton cannot run the Gluon kernels, or None (imports Triton)."""
    if importlib.util.find_spec("triton") is None:
        return "Triton is not installed"
    from ..triton_compat import gluon_unsupported
    return gluon_unsupported()


@functools.lru_cache(maxsize=None)
def _config_from_key(key: str):
    d = json.loads(key)
    if d.pop("kind", None) == "prefill":
        return GluonPrefillConfig(**d)
    return GluonDecodeConfig(**d)


class GluonBackend(Backend):
    name = "gluon"
    layout_version = GLUON_LAYOUT_VERSION
    config_type = (GluonDecodeConfig, GluonPrefillConfig)   # isinstance() takes the tuple
    # "residual_rmsnorm": in the decode kernel where decode.config.kernel_norm says so; elsewhere,
    # and with the prefill kernel, w4a16.gemm runs its norm in torch after the kernel
    epilogues = (None, "silu_mul", "residual", "residual_rmsnorm")

    def available(self, device: torch.device) -> Optional[str]:
        if device.type != "cuda":   # before Triton is imported: a CPU process may not have it set up for Gluon
            return "Gluon kernels need an sm_90 GPU (they do not run in Triton's interpreter)"
        reason = _triton_unsupported()
        if reason:
            return reason
        major, minor = torch.cuda.get_device_capability(device)
        if (major, minor) != (9, 0):
            return f"compute capability {major}.{minor}: the Gluon kernels are built for sm_90a (Hopper)"
        return None

    def supports(self, p: Problem) -> Optional[str]:
        return problem_reason(p.M, p.N, p.K, p.group, p.dtype)

    def config_supports(self, cfg, p: Problem) -> Optional[str]:
        if isinstance(cfg, GluonPrefillConfig):
            if p.M < PREFILL_MIN_M:
                return f"M = {p.M}: the Gluon prefill kernel takes M >= {PREFILL_MIN_M} (decode below)"
            return None
        if p.M > cfg.mt:
            return f"M = {p.M} > the config's token tile {cfg.mt}"
        return None

    # ------------------------------------------------------------------ the weight
    def prepare(self, qweight: torch.Tensor, w) -> GluonPrepared:
        return prepare_decode(qweight, w.params.scales, w.params.zeros, w.group_size_effective)

    def prepare_params(self, prepared: GluonPrepared, w) -> GluonPrepared:
        from dataclasses import replace

        s_t, o_t = decode_params(w.params.scales, w.params.zeros, prepared.N)
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
        named = {f"gluon-{k}": v for k, v in NAMED.items()}
        named.update({f"gluon-{k}": v for k, v in PREFILL_NAMED.items()})
        return named

    def default_config(self, p: Problem):
        # Measured on the H200 (docs/gluon_decode_notes.md, docs/gluon_prefill_notes.md): the decode
        # kernel is faster than the Triton kernel on every Llama layer at M = 1, 16 and 64, the
        # prefill kernel on all but one (8B o at M = 256) at M = 256, 1024 and 4096.
        if p.M > MAX_DECODE_M:
            return prefill_heuristic(p.M, p.N, p.K, p.group, sms_of(p.device))
        return heuristic(p.M, p.N, p.K, p.group, sms_of(p.device))

    def candidates(self, p: Problem) -> list:
        if p.M > MAX_DECODE_M:
            return prefill_candidates(p.M, p.N, p.K, p.group, sms_of(p.device), p.has_zeros)
        return candidates(p.M, p.N, p.K, p.group, sms_of(p.device))

    def config_key(self, cfg) -> str:
        d = asdict(cfg)
        if isinstance(cfg, GluonPrefillConfig):
            d["kind"] = "prefill"   # decode keys carry no kind (tuning caches written before it stay valid)
        return json.dumps(d, sort_keys=True, separators=(",", ":"))

    def config_from_key(self, key: str):
        return _config_from_key(key)

    def config_label(self, cfg) -> str:
        return cfg.short()

    # ------------------------------------------------------------------ running
    def config_epilogues(self, cfg, M: int = 0, N: int = 0) -> tuple:
        if isinstance(cfg, GluonPrefillConfig) or not decode_config.kernel_norm(cfg, M, N):
            return self.epilogues[:3]
        return self.epilogues

    def bind(self, prepared, M, dtype, has_bias, alpha, cfg, deterministic=True, epilogue=None, input_norm=False):
        if isinstance(cfg, GluonPrefillConfig):
            return super().bind(prepared, M, dtype, has_bias, alpha, cfg, deterministic, epilogue)
        from .decode.bound import BoundDecode

        return BoundDecode(prepared, M, dtype, has_bias, alpha, cfg, deterministic, epilogue)

    def run(self, x2, prepared, bias, alpha, cfg, deterministic=True, out=None, epilogue=None, residual=None,
            norm=None, input_norm=None):
        native = self.config_epilogues(cfg, x2.shape[0], prepared.N)
        if epilogue not in native:   # the message formatted only on failure (a call's host time)
            fail("epilogue", f"one of {native} with config {cfg.short()} and M = {x2.shape[0]} "
                 "(w4a16.gemm runs the norm of 'residual_rmsnorm' after the kernel there)", epilogue)
        if x2.data_ptr() % 16:  # TMA needs a 16-byte aligned base: take an aligned copy
            x2 = x2.clone()
        if isinstance(cfg, GluonPrefillConfig):
            from .prefill.launch import run_prefill

            return run_prefill(x2, prepared, bias, alpha, cfg, deterministic, out, epilogue, residual)
        from .decode.launch import run_decode

        return run_decode(x2, prepared, bias, alpha, cfg, deterministic, out, epilogue, residual, norm)

    def kernel_info(self, x2, prepared, bias, cfg) -> dict:
        from .host import STATE

        self.run(x2, prepared, bias, 1.0, cfg)
        compiled, grid = STATE.last
        return dict(registers=int(getattr(compiled, "n_regs", 0) or 0),
                    shared_bytes=int(getattr(compiled.metadata, "shared", 0)),
                    spills=int(getattr(compiled, "n_spills", 0) or 0),
                    num_warps=int(getattr(compiled.metadata, "num_warps", 0)), grid=tuple(grid))
