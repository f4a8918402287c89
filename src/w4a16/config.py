"""Configs by name, across backends.

Each backend has its own config type (the Triton backend's is :class:`GemmConfig`) and its own
named configs; ``gemm(config=...)`` takes "auto", any backend's config name or config object.
"""
from __future__ import annotations

from .backends.selection import config_names
from .backends.triton.config import NAMED_CONFIGS, GemmConfig

__all__ = ["GemmConfig", "NAMED_CONFIGS", "config_names"]
