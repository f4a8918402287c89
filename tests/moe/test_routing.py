"""w4a16.moe.align groups a routing's slots by expert on the device: every routed slot exactly once,
each block one expert's slots in slot order, padding and unused blocks marked, ids out of range
dropped, the same result every run."""
import pytest
import torch

from w4a16.moe.routing import align, padded_length


def _check(ids: torch.Tensor, E: int, bm: int):
    r = align(ids, E, bm)
    S = ids.numel()
    flat = ids.reshape(-1)
    slots, bexp = r.sorted_slots.long(), r.block_expert.long()
    assert slots.numel() == padded_length(S, E, bm) and bexp.numel() == slots.numel() // bm
    routed = [s for s in slots.tolist() if s < S]
    want = [s for s in range(S) if 0 <= int(flat[s]) < E]
    assert sorted(routed) == want                                          # each valid slot once
    for b, e in enumerate(bexp.tolist()):
        blk = [s for s in slots[b * bm:(b + 1) * bm].tolist() if s < S]
        if e < 0:
            assert not blk                                                 # unused block: padding only
        else:
            assert blk and all(int(flat[s]) == e for s in blk) and blk == sorted(blk)
    used = [e for e in bexp.tolist() if e >= 0]
    assert used == sorted(used)                                            # experts in order
    r2 = align(ids, E, bm)
    assert torch.equal(r.sorted_slots, r2.sorted_slots) and torch.equal(r.block_expert, r2.block_expert)
    return r


@pytest.mark.parametrize("T,k,E,bm", [(1, 1, 4, 16), (37, 2, 8, 16), (5, 4, 16, 4), (64, 8, 16, 64)])
def test_random_routings(gen, T, k, E, bm):
    ids = torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(T)])
    _check(ids, E, bm)


def test_all_tokens_on_one_expert_and_unused_experts():
    r = _check(torch.full((33, 1), 3), 6, 16)
    assert r.block_expert.tolist()[:3] == [3, 3, 3]                       # 33 slots: 3 blocks of 16


def test_ids_out_of_range_are_dropped():
    ids = torch.tensor([[0, 7], [-1, 1], [2, 2]])
    r = _check(ids, 3, 4)
    assert 1 not in r.sorted_slots.tolist() and 2 not in r.sorted_slots.tolist()


def test_block_m_must_be_a_power_of_two():
    from w4a16.errors import W4A16Error

    with pytest.raises(W4A16Error, match="block_m: expected a power of two, got 12"):
        align(torch.zeros(2, 1, dtype=torch.long), 2, 12)
