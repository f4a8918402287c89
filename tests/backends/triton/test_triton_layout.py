"""The Triton backend's private layout (pure torch: runs on every machine)."""
import pytest
import torch

import w4a16
from w4a16.backends.triton.layout import prepare_layout, unpack_layout


@pytest.mark.parametrize("N,K,g", [(40, 320, 32), (16, 256, 128), (33, 512, 64), (8, 200, -1)])
def test_layout_follows_the_documented_byte_map(N, K, g):
    """Byte p = 512 sh + 64 g + 16 t + 8 sl + 4 h + 2 r8 + j of fragment block (b, c) holds the codes
    k = c KC + i (low nibble) and k = c KC + KC/2 + i (high nibble), i = 32 sh + 16 sl + 8 h + 2 t + j,
    of row 16 b + 8 r8 + g; rows past N and K past the weight are zero. Checked byte by byte."""
    qw = w4a16.quantize(torch.randn(N, K), g)
    pw = prepare_layout(qw)
    codes = qw.unpack()
    H = pw.kc // 2
    chunks = pw.K_pad // pw.kc
    assert pw.qk.shape == (-(-N // 16), chunks * 16 * H) and pw.K_pad % pw.kc == 0
    assert pw.scales_t.shape == (-(-pw.K_pad // qw.group_size_effective), N)

    def code(row, k):
        return int(codes[row, k]) if row < N and k < K else 0

    for b in range(pw.qk.shape[0]):
        for c in range(chunks):
            for p in range(16 * H):
                sh, rest = divmod(p, 512)
                gg, rest = divmod(rest, 64)
                t, rest = divmod(rest, 16)
                sl, h, r8, j = rest >> 3, (rest >> 2) & 1, (rest >> 1) & 1, rest & 1
                row, i = 16 * b + 8 * r8 + gg, 32 * sh + 16 * sl + 8 * h + 2 * t + j
                want = code(row, c * pw.kc + i) | code(row, c * pw.kc + H + i) << 4
                assert int(pw.qk[b, c * 16 * H + p]) == want, (b, c, p)


@pytest.mark.parametrize("N,K,g", [(40, 320, 32), (16, 256, 128), (33, 512, 64), (8, 200, -1), (72, 1376, -1)])
def test_unpack_inverts_the_layout(N, K, g):
    qw = w4a16.quantize(torch.randn(N, K), g)
    assert torch.equal(unpack_layout(prepare_layout(qw)), qw.qweight)
