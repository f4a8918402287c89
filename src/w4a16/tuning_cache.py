"""Tuned configurations on disk: the shipped table and the user's cache written by ``tune``.

An entry's key is (backend, its layout version, GPU name, M bucket, N, K, group size, dtype); its
value is the config (as the backend's config key string) and the measured time. M is bucketed
to the next power of two (at least 1), so a winner measured at M = 16 serves M = 9..16. Entries
of another layout version than the backend's current one are never used. ``generation()``
changes whenever this process writes an entry, so callers that cache choices know to look again.
"""
from __future__ import annotations

import functools
import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Optional

import torch

from .spec import dtype_name

FORMAT = 3
SHIPPED = Path(__file__).with_name("data") / "tuned.json"
_GENERATION = [0]


def cache_path() -> Path:
    """$W4A16_CACHE, else $XDG_CACHE_HOME/w4a16/tuned.json, else ~/.cache/w4a16/tuned.json."""
    env = os.environ.get("W4A16_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "w4a16" / "tuned.json"


def generation() -> int:
    """A counter bumped by :func:`store` (choices cached before it may be stale)."""
    return _GENERATION[0]


def m_bucket(M: int) -> int:
    b = 1
    while b < M:
        b *= 2
    return b


def key(backend: str, layout: int, gpu: str, M: int, N: int, K: int, group: int, dtype: torch.dtype) -> str:
    return f"{backend}|{layout}|{gpu}|{m_bucket(M)}|{N}|{K}|{group}|{dtype_name(dtype)}"


class _NotATuningFile(Exception):
    """A tuning file that cannot be read as one: ``expected`` says what it should be, ``detail`` why not."""

    def __init__(self, expected: str, detail: str):
        super().__init__(f"expected {expected}{detail}")
        self.expected, self.detail = expected, detail


def _parse(path: str) -> dict:
    """The JSON object of a tuning file (its "entries" a dict): FileNotFoundError for a missing
    file, _NotATuningFile for one that is unreadable, not JSON, or not shaped as a tuning file."""
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as e:  # unreadable, truncated or not JSON
        raise _NotATuningFile("a readable JSON file", f" ({type(e).__name__}: {e})") from e
    if not isinstance(data, dict) or not isinstance(data.get("entries"), dict):
        raise _NotATuningFile("a JSON object with 'format' and 'entries'", "")
    return data


@functools.lru_cache(maxsize=4)
def _read(path: str, mtime: float) -> dict:
    """The entries of one tuning file; {} for a missing file, a file of another format,
    or (with a warning naming the file) one that is not a valid tuning file."""
    try:
        data = _parse(path)
    except FileNotFoundError:
        return {}
    except _NotATuningFile as e:
        warnings.warn(f"w4a16: ignoring the tuning cache {path}: {e}", stacklevel=3)
        return {}
    if data.get("format") != FORMAT:  # a file of another schema: not this version's to read
        return {}
    return data["entries"]


def _entries(path: Path) -> dict:
    try:
        return _read(str(path), path.stat().st_mtime)
    except OSError:
        return {}


def lookup(backend, layout: int, gpu: str, p) -> Optional[tuple]:
    """(config, time_us) for backend ``backend`` (a Backend) on ``gpu`` and problem ``p``: the
    user's cache first, then the shipped table; None when neither has it.

    A winner measured for fp16 and group size 128 also serves bf16 and other group sizes of the
    same shape (the kernels' cost barely depends on them) when no exact entry exists.
    """
    keys = [key(backend.name, layout, gpu, p.M, p.N, p.K, g, dt)
            for g, dt in ((p.group, p.dtype), (p.group, torch.float16), (128, torch.float16))]
    for k in keys:
        for path in (cache_path(), SHIPPED):
            entry = _entries(path).get(k)
            if entry is not None:
                try:
                    return backend.config_from_key(entry["config"]), float(entry["time_us"])
                except (TypeError, ValueError, KeyError):
                    continue
    return None


def merge(sources, into: Path) -> tuple:
    """Merge the entries of the tuning files ``sources`` (in order; a later one wins) into the file
    ``into`` (created when missing; an entry of the same key is replaced). Returns (entries
    merged, of them new, entries in ``into`` after). Every file must be of this version's format."""
    into = Path(into)
    dst = _load_file(into, missing_ok=True)
    merged, new = 0, 0
    for src in sources:
        data = _load_file(Path(src), missing_ok=False)
        new += sum(k not in dst for k in data)
        merged += len(data)
        dst.update(data)
    _write(into, dict(sorted(dst.items())))
    return merged, new, len(dst)


def _load_file(path: Path, missing_ok: bool) -> dict:
    """The entries of a tuning file, checked: W4A16Error naming the file for a missing one (unless
    ``missing_ok``), one that is not JSON, or one of another format."""
    from .errors import expect, fail

    try:
        data = _parse(str(path))
    except FileNotFoundError as e:
        if missing_ok:
            return {}
        fail("tuning file", "a readable JSON file", f"{path} ({type(e).__name__}: {e})")
    except _NotATuningFile as e:
        fail("tuning file", e.expected, f"{path}{e.detail}")
    expect(data.get("format") == FORMAT, f"format of {path}", FORMAT, data.get("format"))
    return dict(data["entries"])


def _write(path: Path, entries: dict) -> None:
    """Write a tuning file atomically (a temporary file unique to this process, fsync, rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"format": FORMAT, "entries": entries}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(data, indent=1, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    _GENERATION[0] += 1


def store(backend, layout: int, gpu: str, M: int, N: int, K: int, group: int, dtype: torch.dtype, cfg,
          time_us: float, path: Optional[Path] = None) -> None:
    """Record a winner (atomically rewrites the JSON file).

    The new file is written to a temporary file unique to this process and thread, flushed to
    disk (fsync), then renamed over the old one: an interrupted or concurrent ``tune`` leaves
    either the old file or the new one, never a truncated mix.
    """
    store_all([(backend, layout, gpu, M, N, K, group, dtype, cfg, time_us)], path)


def store_all(rows, path: Optional[Path] = None) -> None:
    """Record several winners in one rewrite of the file: ``rows`` of :func:`store`'s arguments
    (backend, layout, gpu, M, N, K, group, dtype, cfg, time_us)."""
    path = Path(path or cache_path())
    entries = dict(_entries(path))
    for backend, layout, gpu, M, N, K, group, dtype, cfg, time_us in rows:
        entries[key(backend.name, layout, gpu, M, N, K, group, dtype)] = {
            "config": backend.config_key(cfg), "time_us": round(time_us, 3)}
    _write(path, entries)
