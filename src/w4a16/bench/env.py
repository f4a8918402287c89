"""The card and software a run was measured on: the header of every report."""
from __future__ import annotations

import datetime
import platform
import re
import subprocess

import torch

from ..backends.triton.env import triton_version


def _driver_version() -> str:
    """The NVIDIA driver version from nvidia-smi or /proc, else 'unknown'."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
        line = out.stdout.strip().splitlines()[0].strip() if out.returncode == 0 and out.stdout.strip() else ""
        if line:
            return line
    except (OSError, subprocess.SubprocessError, IndexError):
        pass
    try:
        with open("/proc/driver/nvidia/version") as f:
            m = re.search(r"Kernel Module\s+(\S+)", f.read())
            if m:
                return m.group(1)
    except OSError:
        pass
    return "unknown"


def card(device) -> dict:
    """{'card', 'sm_count', 'capability', 'memory_gib'} of ``device`` (a CPU reports 'cpu', 0 SMs)."""
    device = torch.device(device)
    if device.type != "cuda":
        return {"card": "cpu", "sm_count": 0, "capability": "", "memory_gib": 0.0}
    p = torch.cuda.get_device_properties(device)
    return {"card": p.name, "sm_count": int(p.multi_processor_count),
            "capability": f"sm_{p.major}{p.minor}", "memory_gib": round(p.total_memory / 2**30, 1)}


def collect(device) -> dict:
    """Card, SM count, driver, torch, triton, CUDA, Python, w4a16 versions and the UTC date."""
    from .. import __version__

    info = card(device)
    info.update(
        driver=_driver_version() if torch.device(device).type == "cuda" else "n/a",
        torch=torch.__version__,
        triton=triton_version(),
        cuda=torch.version.cuda or "n/a",
        python=platform.python_version(),
        w4a16=__version__,
        date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    )
    return info
