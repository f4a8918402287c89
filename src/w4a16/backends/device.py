"""Facts about the device a call runs on, cached (no kernel library imported)."""
from __future__ import annotations

import functools

import torch

DEFAULT_SMS = 132  # an H100/H200 SXM, for shapes planned without a GPU


@functools.lru_cache(maxsize=16)
def sm_count(device_index: int) -> int:
    """Multiprocessors of CUDA device ``device_index`` (132 when no GPU is present)."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(device_index).multi_processor_count
    return DEFAULT_SMS


@functools.lru_cache(maxsize=16)
def gpu_name(device_index: int) -> str:
    """The CUDA device's name, e.g. "NVIDIA H200" (tuning entries are keyed on it)."""
    return torch.cuda.get_device_name(device_index)


@functools.lru_cache(maxsize=16)
def card_id(device_index: int) -> str:
    """The card as tuning entries name it: the device's name and its SM count, e.g.
    "NVIDIA H200/132" (two cards of one name but another SM count, a MIG slice or a cut-down part,
    do not share tuned configs)."""
    return f"{gpu_name(device_index)}/{sm_count(device_index)}"


@functools.lru_cache(maxsize=16)
def capability_major(device_index: int) -> int:
    """The compute capability's major number of CUDA device ``device_index`` (9: Hopper)."""
    return torch.cuda.get_device_capability(device_index)[0]


def index_of(device: torch.device) -> int:
    """The CUDA index of ``device`` (the current device when it has none)."""
    return device.index if device.index is not None else torch.cuda.current_device()


def sms_of(device: torch.device) -> int:
    """Multiprocessors of ``device`` (DEFAULT_SMS for a CPU device)."""
    return sm_count(index_of(device)) if device.type == "cuda" else DEFAULT_SMS
