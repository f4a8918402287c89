"""The pure-torch reference as a backend: any device, any dtype of the contract, slow.

It is the last fallback of ``backend="auto"`` and what ``config="reference"`` or
``backend="reference"`` selects. It keeps the weight's plain codes (no layout of its own).
"""
from __future__ import annotations

import weakref
from typing import Optional

import torch

from .base import Backend, Problem


class ReferenceBackend(Backend):
    name = "reference"
    layout_version = 0
    owns_codes = False

    def available(self, device: torch.device) -> Optional[str]:
        return None

    def supports(self, p: Problem) -> Optional[str]:
        return None

    def prepare(self, qweight: torch.Tensor, w):
        return weakref.ref(w)  # no layout of its own: it reads the weight itself

    def prepare_params(self, prepared, w):
        return prepared

    def unpack_codes(self, prepared) -> torch.Tensor:
        return prepared().qweight

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

    def run(self, x2, prepared, bias, alpha, cfg, deterministic=True, out=None):
        from ..reference import gemm_stored

        y = gemm_stored(x2, prepared(), bias, alpha)
        return y if out is None else out.copy_(y)
