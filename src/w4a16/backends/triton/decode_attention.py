"""One decode step's attention in one launch: the rotary embedding of the new query and key, the
write of the new key and value into a static cache, and attention over the cache's filled slots,
for a grouped-query cache without repeating its heads.

Program (bh, s) of the grid (B * Hkv, SPLITS) takes batch row b, key/value head h and the s-th
of SPLITS equal ranges (whole BLOCK_N blocks) of the slots 0..pos, pos = ``length`` (the slot
of the new token, read on the device: no host sync, a CUDA graph replays it for every
position). It ropes the G = Hq / Hkv query heads of its group ([BLOCK_G >= 16, D], for the tensor
cores) and the new key, and attends over its slots with an online softmax; the one program whose
range holds pos writes the new key and value into the cache and takes that slot's score and value
from registers (its tiles read zeros there: no thread reads back what another one wrote). The
first ``active`` splits hold slots (the ranges are whole blocks, so a short cache fills fewer
than SPLITS): one alone writes the output; several each write a partial (running max, sum and
fp32 accumulator), and the last of them to arrive (an acquire-release counter per (b, h), reset
after use) combines them in split order: deterministic. The last program of the whole grid to arrive
advances ``length`` by one (every program has read it by then).

Arithmetic, like transformers' SDPA decode: q and k roped in fp32 and rounded to the activations'
dtype (the model rounds after each of its three operations: a few units in the last place apart),
scores q.k in fp32 times ``scale`` plus the mask, softmax in fp32, the probabilities rounded to
the activations' dtype for the p.V product (as flash attention kernels do), fp32 accumulation.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..workspace import tile_counters
from .fast_launch import CachedLaunch

MASK_NONE, MASK_BOOL, MASK_ADDITIVE = 0, 1, 2


@triton.jit
def _head_rms_norm(x, w_ptr, cols, eps, dtype: tl.constexpr, D: tl.constexpr):
    """Per-row RMSNorm of x [R, D] (columns ``cols`` of the norm weight, a permutation of 0..D-1)
    as transformers' Qwen3 head norm computes it: w * (x * rsqrt(mean(x^2) + eps)).to(dtype), the
    product rounded to dtype."""
    x = x.to(tl.float32)
    r = 1.0 / tl.sqrt(tl.sum(x * x, 1) / D + eps)
    w = tl.load(w_ptr + cols).to(tl.float32)
    return (w[None, :] * (x * r[:, None]).to(dtype).to(tl.float32)).to(dtype)


@triton.jit
def _rope(x_ptr, cos_ptr, sin_ptr, rows, row_ok, nw_ptr, eps, dtype: tl.constexpr, D: tl.constexpr,
          NORM: tl.constexpr):
    """Rows x [R, D] (row r at x_ptr + rows[r] * D), RMS-normalized per row first with weight nw [D]
    where NORM, roped with cos, sin [D]: x * cos + rotate_half(x) * sin in fp32,
    rotate_half(x) = [-x[D/2:], x[:D/2]]."""
    d = tl.arange(0, D)
    half: tl.constexpr = D // 2
    turned = (d + half) % D
    x = tl.load(x_ptr + rows[:, None] * D + d[None, :], mask=row_ok[:, None], other=0.0)
    rot = tl.load(x_ptr + rows[:, None] * D + turned[None, :], mask=row_ok[:, None], other=0.0)
    if NORM:
        x = _head_rms_norm(x, nw_ptr, d, eps, dtype, D)
        rot = _head_rms_norm(rot, nw_ptr, turned, eps, dtype, D)
    rot = tl.where(d[None, :] < half, -rot.to(tl.float32), rot.to(tl.float32))
    cos = tl.load(cos_ptr + d).to(tl.float32)
    sin = tl.load(sin_ptr + d).to(tl.float32)
    return x.to(tl.float32) * cos[None, :] + rot * sin[None, :]


@triton.jit
def decode_attention_kernel(
    q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, keys_ptr, values_ptr, len_ptr, mask_ptr, out_ptr,
    part_ptr, ml_ptr, counter_ptr, qn_ptr, kn_ptr,
    stride_qb, stride_kb, stride_vb, stride_cosb, stride_sinb,
    stride_cb, stride_ch, stride_cs, stride_mb, stride_ob,
    HKV, S, scale, qn_eps, kn_eps,
    G: tl.constexpr, BLOCK_G: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr, SPLITS: tl.constexpr,
    MASK_KIND: tl.constexpr, QK_NORM: tl.constexpr,
):
    """q [B, Hq*D], k and v [B, Hkv*D] (rows at the given strides, heads contiguous), cos and sin
    [B, D] (row strides, 0 for one row shared), keys and values [B, Hkv, S, D] (same strides, last
    contiguous), length int64 [] (the new token's slot; at S or past it nothing is written and the
    output is NaN), mask [B or 1, S] (bool: True attends; or additive; row stride 0 when shared)
    or unused -> out [B, Hq*D] (row stride stride_ob); part fp32 [B*Hkv, SPLITS, BLOCK_G, D] and
    ml fp32 [B*Hkv, SPLITS, 2, BLOCK_G] (SPLITS > 1); counter int32 [B*Hkv + 1] zero, left zero;
    qn, kn [D] and their eps: the per-head RMSNorm of q and of k before the rotary embedding
    (QK_NORM; Qwen3). See the module docstring."""
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b = bh // HKV
    h = bh % HKV
    pos = tl.load(len_ptr).to(tl.int32)
    full = pos >= S   # no slot left: nothing written, the output NaN
    filled = tl.minimum(pos + 1, S)
    chunk = tl.cdiv(tl.cdiv(filled, SPLITS), BLOCK_N) * BLOCK_N
    start = split * chunk
    end = tl.minimum(start + chunk, filled)

    d = tl.arange(0, D)
    g = tl.arange(0, BLOCK_G)
    g_ok = g < G
    dtype = keys_ptr.dtype.element_ty
    q = _rope(q_ptr + b * stride_qb, cos_ptr + b * stride_cosb, sin_ptr + b * stride_sinb, h * G + g, g_ok,
              qn_ptr, qn_eps, dtype, D, QK_NORM)
    q = q.to(dtype)
    one = tl.arange(0, 1)
    k_new = tl.sum(_rope(k_ptr + b * stride_kb, cos_ptr + b * stride_cosb, sin_ptr + b * stride_sinb,
                         h + one, one < 1, kn_ptr, kn_eps, dtype, D, QK_NORM), 0).to(dtype)
    v_new = tl.load(v_ptr + b * stride_vb + h * D + d)
    cache = b.to(tl.int64) * stride_cb + h * stride_ch
    if (pos >= start) & (pos < end):   # this program's range holds the new token's slot (pos < S)
        tl.store(keys_ptr + cache + pos * stride_cs + d, k_new)
        tl.store(values_ptr + cache + pos * stride_cs + d, v_new)

    s_new = tl.sum(q.to(tl.float32) * k_new.to(tl.float32)[None, :], 1) * scale   # the new slot's scores
    v_new32 = v_new.to(tl.float32)
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, D], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        n_ok = n < end
        is_new = n == pos
        # the new slot is not read back (another thread of this program wrote it): zeros in the
        # tiles, its score and value taken from registers
        offs = cache + n[:, None] * stride_cs + d[None, :]
        kt = tl.load(keys_ptr + offs, mask=(n_ok & ~is_new)[:, None], other=0.0)
        vt = tl.load(values_ptr + offs, mask=(n_ok & ~is_new)[:, None], other=0.0)
        s = tl.where(is_new[None, :], s_new[:, None], tl.dot(q, tl.trans(kt)) * scale)
        if MASK_KIND == 1:
            n_ok = n_ok & (tl.load(mask_ptr + b * stride_mb + n, mask=n_ok, other=0) != 0)
        if MASK_KIND == 2:
            s += tl.load(mask_ptr + b * stride_mb + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        s = tl.where(n_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)   # all masked so far: exp(-inf) = 0
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        p16 = p.to(dtype)
        p_new = tl.sum(tl.where(is_new[None, :], p16.to(tl.float32), 0.0), 1)
        acc = acc * alpha[:, None] + tl.dot(p16, vt) + p_new[:, None] * v_new32[None, :]
        m_i = m_new

    out_offs = b * stride_ob + (h * G + g)[:, None] * D + d[None, :]
    nan_if_full = tl.where(full, float("nan"), 1.0)
    active = tl.cdiv(filled, chunk)   # the splits whose range holds slots (the first ones)
    if SPLITS == 1:
        tl.store(out_ptr + out_offs, (acc / l_i[:, None] * nan_if_full).to(dtype), mask=g_ok[:, None])
    elif active == 1:   # one range holds every slot: no partials, no combine
        if split == 0:
            tl.store(out_ptr + out_offs, (acc / l_i[:, None] * nan_if_full).to(dtype), mask=g_ok[:, None])
    elif split < active:
        part = (bh * SPLITS + split) * BLOCK_G
        tl.store(part_ptr + (part + g)[:, None] * D + d[None, :], acc)
        tl.store(ml_ptr + part * 2 + g, m_i)
        tl.store(ml_ptr + part * 2 + BLOCK_G + g, l_i)
        arrived = tl.atomic_add(counter_ptr + bh, 1, sem="acq_rel", scope="gpu")
        if arrived == active - 1:   # the last active split of (b, h): combine in split order
            m_all = tl.full([BLOCK_G], float("-inf"), tl.float32)
            for j in range(active):
                m_all = tl.maximum(m_all, tl.load(ml_ptr + (bh * SPLITS + j) * BLOCK_G * 2 + g))
            m_all = tl.where(m_all == float("-inf"), 0.0, m_all)
            l_all = tl.zeros([BLOCK_G], tl.float32)
            o_all = tl.zeros([BLOCK_G, D], tl.float32)
            for j in range(active):
                pj = (bh * SPLITS + j) * BLOCK_G
                w = tl.exp(tl.load(ml_ptr + pj * 2 + g) - m_all)
                l_all += w * tl.load(ml_ptr + pj * 2 + BLOCK_G + g)
                o_all += w[:, None] * tl.load(part_ptr + (pj + g)[:, None] * D + d[None, :])
            tl.store(out_ptr + out_offs, (o_all / l_all[:, None] * nan_if_full).to(dtype), mask=g_ok[:, None])
            tl.atomic_xchg(counter_ptr + bh, 0, sem="relaxed", scope="gpu")   # ready for the next call
    total = tl.num_programs(0) * SPLITS
    done = tl.atomic_add(counter_ptr + tl.num_programs(0), 1, sem="acq_rel", scope="gpu")
    if done == total - 1:   # every program has read length: advance it
        tl.store(len_ptr, (pos + 1).to(tl.int64))
        tl.atomic_xchg(counter_ptr + tl.num_programs(0), 0, sem="relaxed", scope="gpu")


_LAUNCH = CachedLaunch(decode_attention_kernel)
BLOCK_N = 64


@dataclass(frozen=True)
class AttentionVariant:
    """One compiled form of the kernel, for ``w4a16 sass``: ``batch`` rows of ``kv_heads`` cache
    heads of width ``head_dim``, ``groups`` query heads per cache head, on a cache of ``slots``
    slots and 132 multiprocessors; mask 0 none, 1 bool, 2 additive; qk_norm: Qwen3's head norms."""
    head_dim: int = 128
    groups: int = 4
    kv_heads: int = 8
    batch: int = 1
    slots: int = 4096
    mask: int = MASK_BOOL
    qk_norm: bool = False

    def short(self) -> str:
        return (f"attn d{self.head_dim} g{self.groups} h{self.kv_heads} b{self.batch} s{self.slots} "
                f"{('none', 'bool', 'additive')[self.mask]}{' qknorm' if self.qk_norm else ''}")


@functools.lru_cache(maxsize=256)
def attention_launch(batch: int, kv_heads: int, groups: int, head_dim: int, slots: int, sms: int) -> tuple:
    """(splits, constexprs, num_warps, num_stages) for ``batch`` rows of ``kv_heads`` cache heads,
    ``groups`` query heads per cache head, ``slots`` cache slots, on ``sms`` multiprocessors: about
    one program per multiprocessor, each range at least one block."""
    splits = max(1, min(-(-sms // (batch * kv_heads)), -(-slots // BLOCK_N), 64))
    block_g = max(16, 1 << (groups - 1).bit_length())
    cx = dict(G=groups, BLOCK_G=block_g, D=head_dim, BLOCK_N=BLOCK_N, SPLITS=splits)
    return splits, cx, 4, 2


def _sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 8


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     keys: torch.Tensor, values: torch.Tensor, length: torch.Tensor, mask, scale: float,
                     q_norm: torch.Tensor = None, k_norm: torch.Tensor = None, norm_eps: tuple = (0.0, 0.0),
                     out: torch.Tensor = None) -> torch.Tensor:
    """The kernel (module docstring) on tensors the caller has checked (``w4a16.fused_attention``):
    q [B, Hq*D], k, v [B, Hkv*D], cos, sin [B, D] (row stride 0 allowed), keys, values [B, Hkv, S,
    D], length int64 [], mask None or [B or 1, S] bool / floating (row stride 0 allowed), all last
    dims contiguous; q_norm and k_norm None or both [D] (per-head RMSNorm weights, eps ``norm_eps``
    (q's, k's)) -> out [B, Hq*D] in q's dtype (written into ``out`` when given: contiguous);
    keys, values and length updated in place."""
    B, Hkv, S, D = keys.shape
    G = q.shape[1] // (Hkv * D)
    splits, cx, warps, stages = attention_launch(B, Hkv, G, D, S, _sms(q.device))
    if out is None:
        out = torch.empty(B, G * Hkv * D, dtype=q.dtype, device=q.device)
    block_g = cx["BLOCK_G"]
    part = torch.empty(B * Hkv * splits * block_g * D if splits > 1 else 1, dtype=torch.float32, device=q.device)
    ml = torch.empty(B * Hkv * splits * 2 * block_g if splits > 1 else 1, dtype=torch.float32, device=q.device)
    counters = tile_counters(q.device, B * Hkv + 1)
    kind = MASK_NONE if mask is None else MASK_BOOL if mask.dtype == torch.bool else MASK_ADDITIVE
    m = out if mask is None else mask
    norm = q_norm is not None
    _LAUNCH((B * Hkv, splits), (q, k, v, cos, sin, keys, values, length, m, out, part, ml, counters,
                                q_norm if norm else q, k_norm if norm else q,
                                q.stride(0), k.stride(0), v.stride(0), cos.stride(0), sin.stride(0),
                                keys.stride(0), keys.stride(1), keys.stride(2),
                                0 if mask is None or mask.shape[0] == 1 else mask.stride(0), out.stride(0), Hkv, S,
                                float(scale), float(norm_eps[0]), float(norm_eps[1])),
            dict(cx, MASK_KIND=kind, QK_NORM=norm), warps, stages)
    return out
