"""The pure-torch reference as a backend: any device, any dtype of the contract, slow.

It is the last fallback of ``backend="auto"`` and what ``config="reference"`` or
``backend="reference"`` selects. It keeps the weight's own plain codes, scales and zeros (no layout
of its own, nothing copied) and computes the contract in fp32, the non-finite rule term by term.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import torch

from ..epilogue import NAMES as EPILOGUES
from ..epilogue import rms_norm
from ..pack import unpack_nibbles
from ..weight import dequantize_codes
from .base import Backend, Problem


@dataclass(eq=False)
class ReferencePrepared:
    """A weight as the reference reads it: the weight's own tensors (plain codes uint8 [N, K/2],
    scales and zeros [N, G]) and its effective group size."""
    codes: torch.Tensor
    scales: torch.Tensor
    zeros: Optional[torch.Tensor]
    group: int


class ReferenceBackend(Backend):
    name = "reference"
    layout_version = 0
    owns_codes = False
    epilogues = EPILOGUES
    input_norm = True

    def available(self, device: torch.device) -> Optional[str]:
        return None

    def supports(self, p: Problem) -> Optional[str]:
        return None

    def nonfinite_config(self, p: Problem) -> str:
        return "reference"

    def prepare(self, qweight: torch.Tensor, w) -> ReferencePrepared:
        scales, zeros, _ = w.params
        return ReferencePrepared(qweight, scales, zeros, w.group_size_effective)

    def prepare_params(self, prepared: ReferencePrepared, w) -> ReferencePrepared:
        return self.prepare(prepared.codes, w)

    def unpack_codes(self, prepared: ReferencePrepared) -> torch.Tensor:
        return prepared.codes

    def op_tensors(self, prepared: ReferencePrepared) -> List[torch.Tensor]:
        t = [prepared.codes, prepared.scales]
        return t if prepared.zeros is None else t + [prepared.zeros]

    def from_op_tensors(self, tensors: List[torch.Tensor], N: int, K: int, group: int) -> ReferencePrepared:
        return ReferencePrepared(tensors[0], tensors[1], tensors[2] if len(tensors) > 2 else None, group)

    def dequantize(self, prepared: ReferencePrepared, dtype: torch.dtype) -> torch.Tensor:
        p = prepared
        return dequantize_codes(unpack_nibbles(p.codes), p.scales, p.zeros, p.group, dtype)

    def named_configs(self) -> dict:
        return {"reference": "reference"}

    def default_config(self, p: Problem) -> str:
        return "reference"

    def config_label(self, cfg) -> str:
        return self.name

    def config_key(self, cfg) -> str:
        return "reference"

    def config_from_key(self, key: str) -> str:
        return "reference"

    def run(self, x2, prepared, bias, alpha, cfg, deterministic=True, out=None, epilogue=None, residual=None,
            norm=None, input_norm=None):
        from ..reference import gemm_dequantized

        if input_norm is not None:
            x2 = rms_norm(x2, input_norm.weight, input_norm.eps)
        y = gemm_dequantized(x2, self.dequantize(prepared, torch.float32), bias, alpha, epilogue, residual, norm)
        return y if out is None else out.copy_(y)
