"""The Gluon decode layout (backends/gluon/layout.py) on the CPU: byte map, padding, round trip."""
import pytest
import torch

from w4a16.backends.gluon.layout import (GLUON_LAYOUT_VERSION, _fragment_map, half_chunk, prepare_decode,
                                         unpack_decode)

CASES = [(72, 576, 64), (200, 1376, 1376), (33, 64, 32), (16, 256, 128), (4100, 512, 256), (1, 96, 32),
         (17, 4096, 128)]


def _plain(N, K, gen):
    return torch.randint(0, 256, (N, K // 2), dtype=torch.uint8, generator=gen)


@pytest.mark.parametrize("N,K,g", CASES)
def test_round_trip(N, K, g):
    gen = torch.Generator().manual_seed(N + K)
    qw = _plain(N, K, gen)
    s = (torch.rand(N, K // g, generator=gen) * 0.01 + 0.005).half()
    pw = prepare_decode(qw, s, None, g)
    plain = torch.stack([qw & 0xF, qw >> 4], dim=-1).reshape(N, K)
    assert torch.equal(unpack_decode(pw), plain)
    kh = half_chunk(g)
    assert pw.kh == kh and pw.K_pad % (2 * kh) == 0 and pw.K_pad >= K
    assert pw.codes.shape == (-(-N // 16), pw.K_pad // 32, 256) and pw.codes.dtype == torch.uint8
    assert pw.scales_t.shape == (K // g, -(-N // 8) * 8)
    assert torch.equal(pw.scales_t[:, :N], s.t()) and not pw.scales_t[:, N:].any()
    assert pw.offs_t is None and pw.version == GLUON_LAYOUT_VERSION


def test_padding_is_zero():
    gen = torch.Generator().manual_seed(3)
    N, K, g = 20, 200, 200          # per-channel, K not a multiple of the chunk
    pw = prepare_decode(_plain(N, K, gen), torch.rand(N, 1, generator=gen).half(), None, g)
    # rebuild the padded plain matrix from the bytes: every code past N or K is 0
    kh, kc = pw.kh, 2 * pw.kh
    b = pw.codes.reshape(pw.codes.shape[0], pw.K_pad // kc, 16 * kh)
    row, k = _fragment_map(kh)
    q = torch.zeros(pw.codes.shape[0], 16, pw.K_pad // kc, kc, dtype=torch.uint8)
    q[:, row, :, k] = (b & 0xF).permute(2, 0, 1)
    q[:, row, :, k + kh] = (b >> 4).permute(2, 0, 1)
    q = q.reshape(-1, pw.K_pad)
    assert not q[N:].any() and not q[:, K:].any()


def test_offsets():
    gen = torch.Generator().manual_seed(4)
    N, K, g = 40, 256, 64
    s = (torch.rand(N, K // g, generator=gen) * 0.01 + 0.005).half()
    z = (torch.rand(N, K // g, generator=gen) * 15).half()
    pw = prepare_decode(_plain(N, K, gen), s, z, g)
    assert torch.equal(pw.offs_t[:, :N], (-(z.float() * s.float())).t().half())


@pytest.mark.parametrize("kh", [32, 64])
def test_fragment_map(kh):
    """Each (row, k) of a 16-row block and half chunk appears exactly once; lane l's bytes hold rows
    l // 4 and l // 4 + 8 and K pairs 2 (l % 4) + {0, 1} (+8, +16, ...) as the wgmma A fragment."""
    row, k = _fragment_map(kh)
    assert len(set(zip(row.tolist(), k.tolist()))) == 16 * kh
    lane = torch.arange(16 * kh) // (kh // 2)
    assert torch.equal(row % 8, lane // 4)
    assert torch.equal((k % 8) // 2, lane % 4)
    # within a 4-byte word: bytes (e0, e2, e1, e3); e0/e1 share a row and K pair, e2/e3 are row + 8
    w = torch.arange(16 * kh).view(-1, 4)
    assert torch.equal(row[w[:, 0]], row[w[:, 2]]) and torch.equal(k[w[:, 0]] + 1, k[w[:, 2]])
    assert torch.equal(row[w[:, 1]], row[w[:, 0]] + 8) and torch.equal(k[w[:, 1]], k[w[:, 0]])
    assert torch.equal(row[w[:, 3]], row[w[:, 0]] + 8) and torch.equal(k[w[:, 3]], k[w[:, 0]] + 1)
