"""Tuned configurations on disk: the shipped table and the user's cache written by ``tune``.

An entry's key is (backend, its layout version, card, M bucket, N, K, group size, dtype), the card
being the GPU's name and SM count ("NVIDIA H200/132", :func:`w4a16.backends.device.card_id`); its
value is the config (as the backend's config key string) and the measured time. M is bucketed
to the next power of two (at least 1), so a winner measured at M = 16 serves M = 9..16. A shape
that was not tuned takes the winner of the nearest tuned shape of the same card and M bucket
(within NEAREST_RADIUS, see :func:`lookup`). Entries of another layout version than the
backend's current one are never used. ``generation()`` changes whenever this process writes an
entry, so callers that cache choices know to look again.
"""
from __future__ import annotations

import functools
import json
import math
import os
import tempfile
import warnings
from pathlib import Path
from typing import NamedTuple, Optional

import torch

from .spec import dtype_name

FORMAT = 4   # 4: the card is named with its SM count ("NVIDIA H200/132"); files of 3 named it alone
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
def _read(path: str, stamp: tuple) -> dict:
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


def _stamp(path: Path) -> tuple:
    """What identifies one version of a file for the caches: (mtime in ns, size, inode); every
    write replaces the file (a new inode), so two versions never share a stamp even where the
    file system keeps mtimes to the second."""
    st = path.stat()
    return st.st_mtime_ns, st.st_size, st.st_ino


def _entries(path: Path) -> dict:
    try:
        return _read(str(path), _stamp(path))
    except OSError:
        return {}


NEAREST_RADIUS = 1.0
"""How far a tuned shape may be from an untuned one and still lend it its winner: the distance
|log2(N / N')| + |log2(K / K')| (1.0: one of N and K twice or half, or both about 1.4x apart; Qwen2.5-7B's
layers are 0.4-0.6 from Llama-3-8B's)."""


class Tuned(NamedTuple):
    """A tuning entry that serves a problem: the config, its measured time (us; scaled by the
    weights' size ratio when lent by a neighbour), and the (N, K) it was measured on."""

    config: object
    time_us: float
    shape: tuple


def _distance(N: int, K: int, N2: int, K2: int) -> float:
    return abs(math.log2(N / N2)) + abs(math.log2(K / K2))


@functools.lru_cache(maxsize=4)
def _by_prefix(path: str, stamp: tuple) -> dict:
    """The entries of one tuning file grouped by everything but the shape: {(backend, layout, card,
    M bucket, group, dtype): [(N, K, entry), ...]}."""
    out: dict = {}
    for k, entry in _read(path, stamp).items():
        parts = k.split("|")
        if len(parts) != 8 or not (parts[4].isdigit() and parts[5].isdigit()) or "0" in (parts[4], parts[5]):
            continue
        b, layout, card, bucket, n, kk, group, dt = parts
        out.setdefault((b, layout, card, bucket, group, dt), []).append((int(n), int(kk), entry))
    return out


def _grouped(path: Path) -> dict:
    try:
        return _by_prefix(str(path), _stamp(path))
    except OSError:
        return {}


def _entry_config(backend, entry):
    try:
        return backend.config_from_key(entry["config"]), float(entry["time_us"])
    except (TypeError, ValueError, KeyError):
        return None


def lookup(backend, layout: int, gpu: str, p, nearest: bool = True, paths=None, accept=None) -> Optional[Tuned]:
    """The tuned entry for backend ``backend`` (a Backend) on card ``gpu`` and problem ``p``: the
    user's cache first, then the shipped table; None when neither has one.

    A winner measured for fp16 and group size 128 also serves bf16 and other group sizes of the
    same shape (the kernels' cost barely depends on them) when no exact entry exists. With
    ``nearest``, a shape that neither file has takes the winner of the nearest tuned shape of
    the same card and M bucket within NEAREST_RADIUS (the user's cache before the shipped table
    at equal distance), its time scaled by N*K / (N'*K'); ``accept(config)`` (e.g. "the backend
    runs this config on ``p``") passes over entries it rejects. ``paths``: the tuning files to
    read, in order (default: the user's cache, then the shipped table).
    """
    paths = [Path(q) for q in paths] if paths is not None else [cache_path(), SHIPPED]
    variants = [(p.group, p.dtype), (p.group, torch.float16), (128, torch.float16)]
    for g, dt in variants:
        k = key(backend.name, layout, gpu, p.M, p.N, p.K, g, dt)
        for path in paths:
            entry = _entries(path).get(k)
            hit = None if entry is None else _entry_config(backend, entry)
            if hit is not None and (accept is None or accept(hit[0])):
                return Tuned(hit[0], hit[1], (p.N, p.K))
    if not nearest:
        return None
    for g, dt in variants:
        prefix = (backend.name, str(layout), gpu, str(m_bucket(p.M)), str(g), dtype_name(dt))
        near = sorted((_distance(p.N, p.K, n, k), i, n, k, e) for i, path in enumerate(paths)
                      for n, k, e in _grouped(path).get(prefix, ()))
        for d, _, n, k, e in near:
            if d > NEAREST_RADIUS:
                break
            hit = _entry_config(backend, e)
            if hit is not None and (accept is None or accept(hit[0])):
                return Tuned(hit[0], hit[1] * (p.N * p.K) / (n * k), (n, k))
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
    _read.cache_clear()
    _by_prefix.cache_clear()
    _GENERATION[0] += 1


def store(backend, layout: int, gpu: str, M: int, N: int, K: int, group: int, dtype: torch.dtype, cfg,
          time_us: float, path: Optional[Path] = None) -> None:
    """Record a winner (atomically rewrites the JSON file).

    The new file is written to a temporary file unique to this process and thread, flushed to
    disk (fsync), then renamed over the old one: an interrupted or concurrent ``tune`` leaves
    either the old file or the new one, never a truncated mix.
    """
    store_all([(backend, layout, gpu, M, N, K, group, dtype, cfg, time_us)], path)


def _current_entries(path: Path) -> dict:
    """The entries of the tuning file ``path`` as they are on disk now (read afresh, not through the
    cache), before a rewrite. A file of another format is kept beside it as ``<name>.v<format>``
    (with a warning) rather than overwritten; an unreadable one is replaced (with a warning)."""
    try:
        data = _parse(str(path))
    except FileNotFoundError:
        return {}
    except _NotATuningFile as e:
        warnings.warn(f"w4a16: replacing the tuning cache {path}: {e}", stacklevel=4)
        return {}
    if data.get("format") != FORMAT:
        keep = path.with_name(f"{path.name}.v{data.get('format')}")
        os.replace(path, keep)
        warnings.warn(f"w4a16: {path} was a tuning file of format {data.get('format')} (this version reads "
                      f"{FORMAT}: entries per GPU name and SM count); kept as {keep}, tune again", stacklevel=4)
        return {}
    return dict(data["entries"])


def store_all(rows, path: Optional[Path] = None) -> None:
    """Record several winners in one rewrite of the file: ``rows`` of :func:`store`'s arguments
    (backend, layout, gpu, M, N, K, group, dtype, cfg, time_us)."""
    path = Path(path or cache_path())
    entries = _current_entries(path)
    for backend, layout, gpu, M, N, K, group, dtype, cfg, time_us in rows:
        entries[key(backend.name, layout, gpu, M, N, K, group, dtype)] = {
            "config": backend.config_key(cfg), "time_us": round(time_us, 3)}
    _write(path, entries)
