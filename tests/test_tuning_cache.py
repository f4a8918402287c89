"""The tuning cache survives faults: a corrupted file is ignored with a warning naming it, and
``store`` writes through a per-process temporary file, fsynced, then renamed. Entries are keyed by
card (name and SM count); an untuned shape borrows the nearest tuned shape's winner."""
import json
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
    tuning_cache._by_prefix.cache_clear()
    yield path
    tuning_cache._read.cache_clear()
    tuning_cache._by_prefix.cache_clear()


@pytest.mark.parametrize("text", ['{"format": 4, "entries": {"a|1|', "not json", "[1, 2]",
                                  '{"format": 4, "entries": [1]}', '{"format": 4}'])
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
    assert [_lookup(M)[:2] for M in (1, 16, 64)] == [(CFG, 11.0), (CFG, 26.0), (CFG, 74.0)]


def test_missing_cache_is_silent(cache):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _lookup(1) is None


def test_store_replaces_a_corrupted_file_and_leaves_no_temporary(cache):
    cache.parent.mkdir(parents=True)
    cache.write_text("{truncated")
    with pytest.warns(UserWarning, match=str(cache)):
        _store(16)
    assert _lookup(16)[:2] == (CFG, 12.5)
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


def _problem(N, K, M=16):
    return Problem(M, N, K, 128, torch.float16, False, torch.device("cpu"))


def test_untuned_shape_takes_the_nearest_tuned_winner(cache):
    near = GemmConfig("splitk", 16, 64, split_k=2, num_warps=4, num_stages=1)
    tuning_cache.store_all([(TB, TB.layout_version, "H/132", 16, 4096, 4096, 128, torch.float16, CFG, 10.0),
                            (TB, TB.layout_version, "H/132", 16, 6144, 4096, 128, torch.float16, near, 20.0)])
    look = lambda N, K, card="H/132", M=16: tuning_cache.lookup(TB, TB.layout_version, card, _problem(N, K, M))
    assert look(4096, 4096) == (CFG, 10.0, (4096, 4096))                       # exact
    hit = look(5632, 4096)                                                     # nearer 6144 than 4096
    assert hit.config == near and hit.shape == (6144, 4096) and hit.time_us == pytest.approx(20.0 * 5632 / 6144)
    assert look(3584, 3584).shape == (4096, 4096)                             # Qwen2.5-7B's o
    assert look(4096, 16384) is None                                          # K four times: too far
    assert look(4096, 4096, M=64) is None                                     # another M bucket
    assert look(4096, 4096, card="H/114") is None                             # same name, other SM count
    assert tuning_cache.lookup(TB, TB.layout_version, "H/132", _problem(4000, 4096), nearest=False) is None
    refuse_near = lambda cfg: cfg != near   # noqa: E731  (a config the backend cannot run here)
    hit = tuning_cache.lookup(TB, TB.layout_version, "H/132", _problem(5632, 4096), accept=refuse_near)
    assert hit.config == CFG and hit.shape == (4096, 4096)                  # the next nearest instead


def test_a_file_of_the_previous_format_is_kept_not_read(cache):
    """A cache of format 3 (keyed by GPU name alone) is not read, and the first store keeps it
    beside the new file (with a warning) instead of overwriting it."""
    cache.parent.mkdir(parents=True)
    old = {"format": 3, "entries": {f"triton|{TB.layout_version}|gpu|16|64|256|128|fp16":
                                    {"config": TB.config_key(CFG), "time_us": 1.0}}}
    cache.write_text(json.dumps(old))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _lookup(16) is None
    with pytest.warns(UserWarning, match="was a tuning file of format 3"):
        _store(1)
    assert json.loads((cache.parent / "tuned.json.v3").read_text()) == old
    assert list(json.loads(cache.read_text())["entries"]) == [f"triton|{TB.layout_version}|gpu|1|64|256|128|fp16"]


def test_stores_keep_every_entry_where_mtimes_are_coarse(cache, monkeypatch):
    """Each store reads the file as it is on disk, and the read caches are keyed by more than the
    mtime: ten quick stores keep ten entries even if every version had the same mtime."""
    real = tuning_cache._stamp
    monkeypatch.setattr(tuning_cache, "_stamp", lambda path: (0, 0, 0) if path.exists() else real(path))
    for i in range(10):
        tuning_cache.store(TB, TB.layout_version, "gpu", 2 ** i, 64, 256, 128, torch.float16, CFG, float(i))
    assert len(json.loads(cache.read_text())["entries"]) == 10
    assert _lookup(512)[:2] == (CFG, 9.0)
