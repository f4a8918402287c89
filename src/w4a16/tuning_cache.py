"""Tuned configurations on disk: the shipped table and the user's cache written by ``tune``.

Key: (GPU name, M bucket, N, K, group size, dtype). M is bucketed to the next power of two
(at least 1) so that a winner measured at M = 16 serves M = 9..16. Files carry the version of the
weight layout their timings were measured with; files of another version are ignored.
"""
from __future__ import annotations

import functools
import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import torch

from .config import GemmConfig
from .backends.triton.layout import LAYOUT_VERSION  # plain torch, no Triton
from .spec import dtype_name

SHIPPED = Path(__file__).with_name("data") / "tuned.json"


def cache_path() -> Path:
    """$W4A16_CACHE, else $XDG_CACHE_HOME/w4a16/tuned.json, else ~/.cache/w4a16/tuned.json."""
    env = os.environ.get("W4A16_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "w4a16" / "tuned.json"


def m_bucket(M: int) -> int:
    b = 1
    while b < M:
        b *= 2
    return b


def key(gpu: str, M: int, N: int, K: int, group: int, dtype: torch.dtype) -> str:
    return f"{gpu}|{m_bucket(M)}|{N}|{K}|{group}|{dtype_name(dtype)}"


@functools.lru_cache(maxsize=4)
def _read(path: str, mtime: float) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("version") != LAYOUT_VERSION:
        return {}
    return data.get("entries", {})


def _entries(path: Path) -> dict:
    try:
        return _read(str(path), path.stat().st_mtime)
    except OSError:
        return {}


def lookup(gpu: str, M: int, N: int, K: int, group: int, dtype: torch.dtype) -> Optional[GemmConfig]:
    """The user's cache first, then the shipped table; None when neither has the key.

    A winner measured for fp16 and group size 128 also serves bf16 and other group sizes of the
    same shape (the kernel's cost barely depends on them) when no exact entry exists.
    """
    keys = [key(gpu, M, N, K, group, dtype), key(gpu, M, N, K, group, torch.float16),
            key(gpu, M, N, K, 128, torch.float16)]
    for k in keys:
        for path in (cache_path(), SHIPPED):
            entry = _entries(path).get(k)
            if entry is not None:
                try:
                    return GemmConfig(**entry["config"])
                except (TypeError, ValueError, KeyError):
                    continue
    return None


def store(gpu: str, M: int, N: int, K: int, group: int, dtype: torch.dtype, cfg: GemmConfig,
          time_us: float, path: Optional[Path] = None) -> None:
    """Record a winner (atomically rewrites the JSON file)."""
    path = Path(path or cache_path())
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"version": LAYOUT_VERSION, "entries": dict(_entries(path))}
    data["entries"][key(gpu, M, N, K, group, dtype)] = {"config": asdict(cfg), "time_us": round(time_us, 3)}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path)
