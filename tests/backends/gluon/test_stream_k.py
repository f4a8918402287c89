"""The stream-K schedule's arithmetic (``decode_sk.py``), written out here in Python exactly as the
kernel computes it, against a brute-force assignment of units to programs; and its launch plan
and config rules (no GPU needed)."""
import pytest

from w4a16.backends.gluon.decode.config import GluonDecodeConfig, candidates
from w4a16.backends.gluon.decode.launch import SK_MAX_PRODUCT, stream_k_programs
from w4a16.errors import W4A16Error


def _kernel_view(n_tiles, n_stages, P):
    """{tile: [(program, slot, kb, ke)]} of the partial writers, {tile: writer program} of the
    direct stores, and {tile: (first, last, [slots read])} of the reducer, with the kernel's formulas."""
    U = n_tiles * n_stages
    partial, direct, reducer = {}, {}, {}
    for pid in range(P):
        u0, u1 = pid * U // P, (pid + 1) * U // P
        for t in range(u0 // n_stages, (u1 - 1) // n_stages + 1):
            ts = t * n_stages
            kb, ke = max(u0 - ts, 0), min(u1 - ts, n_stages)
            if kb == 0 and ke == n_stages:
                direct[t] = pid
            else:
                mine = 2 * pid + int(t != u0 // n_stages)
                partial.setdefault(t, []).append((pid, mine, kb, ke))
    for t in partial:
        ts = t * n_stages
        first = ((ts + 1) * P - 1) // U
        last = ((ts + n_stages) * P - 1) // U
        reducer[t] = (first, last, [2 * q + int((q * U // P) // n_stages != t) for q in range(first, last + 1)])
    return partial, direct, reducer


@pytest.mark.parametrize("n_tiles,n_stages,P", [(1, 1, 1), (3, 5, 7), (4, 56, 224), (896, 32, 396), (7, 9, 63),
                                                (128, 56, 396), (96, 16, 395), (2, 3, 1), (65, 11, 132)])
def test_every_unit_once_and_the_reducer_reads_what_was_written(n_tiles, n_stages, P):
    P = stream_k_programs(n_tiles * n_stages, P)
    partial, direct, reducer = _kernel_view(n_tiles, n_stages, P)
    covered = {}
    for t, pid in direct.items():
        for k in range(n_stages):
            covered[(t, k)] = covered.get((t, k), 0) + 1
    for t, ws in partial.items():
        for pid, slot, kb, ke in ws:
            for k in range(kb, ke):
                covered[(t, k)] = covered.get((t, k), 0) + 1
    assert covered == {(t, k): 1 for t in range(n_tiles) for k in range(n_stages)}
    assert not set(direct) & set(partial)
    slots = [s for ws in partial.values() for _, s, _, _ in ws]
    assert len(slots) == len(set(slots)) and all(0 <= s < 2 * P for s in slots)   # no slot written twice
    for t, ws in partial.items():
        first, last, read = reducer[t]
        assert [p for p, _, _, _ in ws] == list(range(first, last + 1))   # arrivals expected = writers
        assert read == [s for _, s, _, _ in ws] and len(ws) >= 2


def test_programs_clamped_and_overflow_refused():
    assert stream_k_programs(10, 396) == 10
    assert stream_k_programs(28672, 396) == 396
    assert stream_k_programs(SK_MAX_PRODUCT // 100, 200) == 0     # units x programs past 2^31


def test_config_rules():
    with pytest.raises(W4A16Error, match="sk"):
        GluonDecodeConfig(8, 4, 2, 4, ws=False, sk=True)
    c = GluonDecodeConfig(8, 4, 2, 4, sk=True)
    assert c.short() == "g8x64c2s4wssk" and c.launch_warps == 8
    # 80 registers x 8 launched warps (the producer's warpgroup is padded): 3 programs per SM
    assert c.resident(64) == 3
    assert GluonDecodeConfig(8, 4, 2, 4, ws=False).resident(64) == 4
    assert any(c.sk for c in candidates(1, 57344, 8192, 128, 132))
