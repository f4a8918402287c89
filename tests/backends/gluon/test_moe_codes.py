"""The Gluon kernels' view of the codes, emulated on the CPU: each thread's 32-bit words as
``code_smem_layout`` addresses them in one (16-row block, chunk), the ``prmt`` of the Triton-layout
dequant, and the dequant's nibble pairs, against the plain codes. CODES 1 reads the Gluon layout
(``gluon/layout.py``: what the dense kernels run, the emulator's own check), CODES 2 the Triton
kernels' layout (``triton/layout.py``: what the mixture-of-experts decode kernel reads)."""
import pytest
import torch

pytest.importorskip("triton.experimental.gluon")

from w4a16.backends.gluon.common import code_smem_layout  # noqa: E402
from w4a16.backends.gluon.layout import half_chunk, prepare_decode  # noqa: E402
from w4a16.backends.triton.layout import prepare_codes  # noqa: E402
from w4a16.pack import pack_nibbles  # noqa: E402


def _offsets(bases) -> dict:
    """(row, k) -> shared offset of the linear layout with these offset bases (a bit permutation)."""
    out = {}
    for off in range(1 << len(bases)):
        r = c = 0
        for i, (br, bc) in enumerate(bases):
            if off >> i & 1:
                r ^= br
                c ^= bc
        out[(r, c)] = off
    return out


def _element(lane: int, r: int) -> tuple:
    """(row, k) of register r of lane ``lane`` in the wgmma A fragment (``gluon/layout.py``)."""
    g, t = lane // 4, lane % 4
    return (g + 8 * (r >> 1 & 1),
            2 * t + (r & 1) + 8 * (r >> 2 & 1) + 16 * (r >> 3 & 1) + 32 * (r >> 4 & 1))


def _read_chunk(block: torch.Tensor, kh: int, codes: int) -> tuple:
    """(low, high) [16, kh] half-chunk tiles the dequant produces from one (block, chunk)'s bytes."""
    offs = _offsets(code_smem_layout(1, 1, kh, codes).offset_bases)
    lo = torch.full((16, kh), -1)
    hi = torch.full((16, kh), -1)
    for lane in range(32):
        for w in range(kh // 8):
            elems = [_element(lane, r) for r in range(4 * w, 4 * w + 4)]
            at = [offs[e] for e in elems]
            assert at == list(range(at[0], at[0] + 4)), "a register word must be 4 adjacent bytes"
            word = [int(block[a]) for a in at]
            if codes == 2:   # prmt 0x3120: (e0, e1, e2, e3) -> (e0, e2, e1, e3)
                word = [word[0], word[2], word[1], word[3]]
            # lop3 on bytes 0 and 2 gives elements 0, 1; on bytes 1 and 3 (w >> 8) elements 2, 3
            for e, byte in zip(elems, (word[0], word[2], word[1], word[3])):
                lo[e] = byte & 0xF
                hi[e] = byte >> 4
    return lo, hi


@pytest.mark.parametrize("group", [32, 128])
@pytest.mark.parametrize("codes", [1, 2])
def test_each_thread_reads_its_fragment_of_either_layout(group, codes):
    torch.manual_seed(group + codes)
    N, K = 32, 256
    q = torch.randint(0, 16, (N, K), dtype=torch.uint8)
    qweight = pack_nibbles(q)
    kh = half_chunk(group)
    kc = 2 * kh
    if codes == 1:
        packed = prepare_decode(qweight, torch.ones(N, K // group, dtype=torch.float16), None, group).codes
        packed = packed.reshape(packed.shape[0], -1)
    else:
        packed = prepare_codes(qweight, group)
    for b in range(N // 16):
        for c in range(K // kc):
            block = packed[b, c * 16 * kh:(c + 1) * 16 * kh]
            lo, hi = _read_chunk(block, kh, codes)
            assert torch.equal(lo, q[16 * b:16 * b + 16, c * kc:c * kc + kh].long())
            assert torch.equal(hi, q[16 * b:16 * b + 16, c * kc + kh:(c + 1) * kc].long())


def test_reading_the_triton_layout_as_the_gluon_one_is_wrong():
    """The check above can fail: the Gluon view of Triton-layout bytes misplaces weights."""
    torch.manual_seed(0)
    q = torch.randint(0, 16, (16, 128), dtype=torch.uint8)
    lo, _ = _read_chunk(prepare_codes(pack_nibbles(q), 128)[0, :1024], 64, 1)
    assert not torch.equal(lo, q[:, :64].long())
