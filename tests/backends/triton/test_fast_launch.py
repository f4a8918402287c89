"""CachedLaunch: the key covers what Triton specializes on, and the interpreter takes Triton's path."""
import torch

from w4a16.backends.triton.fast_launch import CachedLaunch, arg_key


def test_key_separates_alignment_and_divisibility():
    x = torch.zeros(64, dtype=torch.float16)
    assert arg_key(x) != arg_key(x[1:])            # 16-byte aligned vs not
    assert arg_key(x) != arg_key(x.float())        # dtype
    assert arg_key(32) != arg_key(33) != arg_key(1)
    assert arg_key(32) != arg_key(2**31 + 32)      # 64-bit integers compile differently
    assert arg_key(48) == arg_key(4096)            # same specialization, same kernel


def test_interpreter_uses_tritons_path(monkeypatch):
    calls = []

    class Fake:
        def __getitem__(self, grid):
            return lambda *a, **kw: calls.append((grid, a, kw)) or "compiled"

    launch = CachedLaunch(Fake())
    x = torch.zeros(4)
    assert launch((2, 1), (x, 3), {"B": 16}, 4, 3) == "compiled"
    assert launch((2, 1), (x, 3), {"B": 16}, 4, 3) == "compiled"
    assert len(calls) == 2 and calls[0][2] == {"B": 16, "num_warps": 4, "num_stages": 3, "enable_fp_fusion": True}
    assert not launch._compiled  # CPU tensors are never cached
