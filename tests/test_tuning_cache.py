"""The tuning cache survives faults: a corrupted file is ignored with a warning naming it, and
``store`` writes through a per-process temporary file, fsynced, then renamed."""
import os
import warnings

import pytest
import torch

from w4a16 import tuning_cache
from w4a16.backends import Problem, get
from w4a16.config import GemmConfig

CFG = GemmConfig("splitk", 16, 64, split_k=4, num_warps=4, num_stages=1)
TB = get("triton")


def _lookup(M):
    return tuning_cache.lookup(TB, TB.layout_version, "gpu", Problem(M, 64, 256, 128, torch.float16, False,
                                                                     torch.device("cpu")))


def _store(M):
    tuning_cache.store(TB, TB.layout_version, "gpu", M, 64, 256, 128, torch.float16, CFG, 12.5)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    path = tmp_path / "w4a16" / "tuned.json"
    monkeypatch.setenv("W4A16_CACHE", str(path))
    tuning_cache._read.cache_clear()
    yield path
    tuning_cache._read.cache_clear()


@pytest.mark.parametrize("text", ['{"format": 3, "entries": {"a|1|', "not json", "[1, 2]",
                                  '{"format": 3, "entries": [1]}', '{"format": 3}'])
def test_corrupted_cache_is_ignored_with_a_warning(cache, text):
    cache.parent.mkdir(parents=True)
    cache.write_text(text)
    with pytest.warns(UserWarning, match=f"ignoring the tuning cache {cache}"):
        assert _lookup(1) is None


def test_store_all_writes_every_row_in_one_rewrite(cache, monkeypatch):
    writes = []
    real = tuning_cache._write
    monkeypatch.setattr(tuning_cache, "_write", lambda path, entries: (writes.append(len(entries)), real(path, entries)))
    tuning_cache.store_all([(TB, TB.layout_version, "gpu", M, 64, 256, 128, torch.float16, CFG, 10.0 + M)
                            for M in (1, 16, 64)])
    assert writes == [3]
    assert [_lookup(M) for M in (1, 16, 64)] == [(CFG, 11.0), (CFG, 26.0), (CFG, 74.0)]


def test_missing_cache_is_silent(cache):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _lookup(1) is None


def test_store_replaces_a_corrupted_file_and_leaves_no_temporary(cache):
    cache.parent.mkdir(parents=True)
    cache.write_text("{truncated")
    with pytest.warns(UserWarning, match=str(cache)):
        _store(16)
    assert _lookup(16) == (CFG, 12.5)
    assert os.listdir(cache.parent) == ["tuned.json"]


def test_store_writes_a_unique_fsynced_temporary(cache, monkeypatch):
    """The temporary name carries the process id and is unique; the data is fsynced before the rename."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(tuning_cache.os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd))[1])

    def replace(src, dst):
        events.append(("replace", os.path.basename(src)))
        return real_replace(src, dst)

    monkeypatch.setattr(tuning_cache.os, "replace", replace)
    _store(1)
    _store(2)
    assert events[0] == "fsync" and events[1][0] == "replace" and events[2] == "fsync"
    first, second = events[1][1], events[3][1]
    assert str(os.getpid()) in first and first != second and first != "tuned.tmp"


def test_interrupted_store_keeps_the_old_file(cache, monkeypatch):
    _store(1)
    before = cache.read_text()

    def crash(fd):
        raise KeyboardInterrupt

    monkeypatch.setattr(tuning_cache.os, "fsync", crash)
    with pytest.raises(KeyboardInterrupt):
        _store(2)
    assert cache.read_text() == before and os.listdir(cache.parent) == ["tuned.json"]
