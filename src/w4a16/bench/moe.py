"""``w4a16 bench --moe``: whole mixture-of-experts layers (gate_up, SiLU * up, down, the weighted sum
over the k choices) against torch's 16-bit layer, on the experts shapes of published models.

For each preset and token count T: eight random routings (top-k of random router logits, the
same for every peer) are rotated between calls, so that the experts a call touches change and the
int4 weights do not stay in L2. Every peer's first result is checked against
``w4a16.moe.reference.fused_moe`` on the same int4 weights (relative Frobenius error within the
dtype's tolerance) before it is timed; a wrong result is recorded and not timed. Peers:

    w4a16         w4a16.moe.fused_moe (backend "auto"), CUDA-graph replay
    w4a16-triton  the same with backend "triton" (the Triton kernels only)
    w4a16-gluon   the same with backend "gluon" (on Hopper: one token on the Gluon MoE decode kernel)
    torch         the 16-bit layer on the dequantized weights: torch._grouped_mm over the slots
                  sorted by expert where this torch has it ("torch-grouped_mm"; its fast kernel
                  takes bf16 on sm90 and sm100, other dtypes and cards fall back to a loop that
                  copies the offsets to the host: eager timing, "torch-grouped_mm-fallback"), else
                  a loop over the experts (host syncs: eager timing, "torch-loop")
    w4a16-loop    w4a16.gemm per touched expert (the naive use of the dense op; eager timing)

"of copy" is the int4 bytes (codes and scales, both projections) of the experts a call touches,
averaged over the routings, over the time, against the copy bandwidth measured in the same run.
The first peer timed at each (preset, T) is timed twice and the first timing discarded: on an H100
the first timing after a preset's weights were made ran 10-25% slow on the Mixtral-8x7B and
DeepSeek-V3 presets, whichever peer came first (BENCHMARKS.md, 2026-12-07).
"""
from __future__ import annotations

import csv
import json
import math
import os
from dataclasses import dataclass, field
from typing import Callable, Dict, List

import torch

from .. import spec
from ..measure import TOLERANCE, EagerTimer, GraphTimer, rel_error
from ..moe import QuantizedExperts, fused_moe
from ..moe import reference as moe_ref
from .timing import FakeTimer

# H (hidden), I (expert intermediate size), E (routed experts), k (experts per token): the models'
# config.json values.
PRESETS = {
    "qwen3-30b-a3b": (2048, 768, 128, 8),
    "qwen3-235b-a22b": (4096, 1536, 128, 8),
    "mixtral-8x7b": (4096, 14336, 8, 2),
    "deepseek-v3": (7168, 2048, 256, 8),
}
DEFAULT_T = (1, 16, 64, 256, 4096)
PEERS = ("w4a16", "torch", "w4a16-loop", "w4a16-triton", "w4a16-gluon")
DEFAULT_PEERS = PEERS[:3]
ROUTINGS = 8
FAKE_PROXY = (64, 64, 8, 8)   # --fake-timer computes at most H, I, E, T of this size
COLUMNS = ("card", "preset", "H", "I", "E", "top_k", "T", "dtype", "group_size", "peer", "timing", "status",
           "rel_err", "median_us", "experts_touched", "touched_mb", "frac_copy", "speedup_vs_torch", "note")


@dataclass
class MoeResult:
    """header: card, versions, copy bandwidth, settings; rows: dicts with exactly COLUMNS."""

    header: dict
    rows: List[dict] = field(default_factory=list)

    def wrong(self) -> List[dict]:
        return [r for r in self.rows if r["status"] == "wrong"]


def parse_presets(text: str) -> tuple:
    """"qwen3-30b-a3b,mixtral-8x7b" or "all" -> preset names (W4A16Error naming --moe otherwise)."""
    from ..errors import expect

    names = tuple(PRESETS) if text.strip() == "all" else tuple(p.strip() for p in text.split(",") if p.strip())
    expect(bool(names) and all(n in PRESETS for n in names), "--moe", f"'all' or names from {tuple(PRESETS)}",
           repr(text))
    return names


def random_experts(E, N, K, g, dtype, device, gen) -> QuantizedExperts:
    """Random int4 experts [E, N, K] made on ``device`` (``gen`` a generator there): codes uniform,
    symmetric scales in [0.005, 0.025) of group ``g`` (-1: per channel)."""
    q = torch.randint(0, 256, (E, N, K // 2), dtype=torch.uint8, generator=gen, device=device)
    s = (torch.rand(E, N, 1 if g == -1 else K // g, generator=gen, device=device) * 0.02 + 0.005).to(dtype)
    return QuantizedExperts(q, s, None, g)


def _dense_k_major(w: QuantizedExperts, dtype) -> torch.Tensor:
    """[E, K, N] in ``dtype``: the experts dequantized one at a time (a whole-stack dequantization
    would hold fp32 copies of every expert: 90 GB for DeepSeek-V3's gate_up)."""
    E, N, K = w.shape
    out = torch.empty(E, K, N, dtype=dtype, device=w.device)
    for e in range(E):
        out[e] = w.dequantize(dtype, experts=[e])[0].t()
    return out


def _routings(T, E, k, device, gen) -> list:
    out = []
    for _ in range(ROUTINGS):
        ids = torch.rand(T, E, generator=gen).topk(k, dim=1).indices.to(device)
        out.append((ids, torch.softmax(torch.randn(T, k, generator=gen), 1).to(device)))
    return out


def torch_layer(x, w_gu, w_dn, ids, tw):
    """The 16-bit layer with torch._grouped_mm: w_gu [E, H, 2I], w_dn [E, I, H] (K-major)."""
    T, k = ids.shape
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.zeros(w_gu.shape[0], dtype=torch.int32, device=x.device).scatter_add_(
        0, flat, torch.ones_like(flat, dtype=torch.int32))
    offs = torch.cumsum(counts, 0, dtype=torch.int32)
    h = torch._grouped_mm(x[order // k], w_gu, offs=offs)
    a = moe_ref.silu_mul(h)
    y = torch._grouped_mm(a, w_dn, offs=offs).float() * tw.reshape(-1)[order, None].float()
    return torch.zeros(T, x.shape[1], dtype=torch.float32, device=x.device).index_add_(0, order // k, y).to(x.dtype)


def loop_layer(x, ids, tw, gate_up, down, linear: Callable) -> torch.Tensor:
    """The layer as a loop over the touched experts (host syncs): ``linear(rows, e, which)``."""
    T, k = ids.shape
    out = torch.zeros(T, x.shape[1], dtype=torch.float32, device=x.device)
    for e in torch.unique(ids).tolist():
        t, j = (ids == e).nonzero(as_tuple=True)
        a = moe_ref.silu_mul(linear(x[t], e, "gate_up"))
        out.index_add_(0, t, linear(a, e, "down").float() * tw[t, j, None].float())
    return out.to(x.dtype)


def grouped_mm_capturable(dtype: torch.dtype, capability: tuple) -> bool:
    """Whether torch._grouped_mm runs its fast kernel, which a CUDA graph can capture: bf16 on
    sm90 or sm100 (torch 2.9 to 2.11); otherwise it loops over the groups after copying the offsets
    to the host."""
    return dtype == torch.bfloat16 and capability[0] in (9, 10)


def _peer_calls(name, x, gu, dn, dense, routes):
    """(calls, eager?, label) for peer ``name``: one call per routing."""
    if name == "w4a16":
        return [lambda r=r: fused_moe(x, gu, dn, *r) for r in routes], False, "w4a16"
    if name in ("w4a16-triton", "w4a16-gluon"):
        backend = name.split("-")[1]
        return [lambda r=r: fused_moe(x, gu, dn, *r, backend=backend) for r in routes], False, name
    if name == "torch":
        if hasattr(torch, "_grouped_mm") and x.is_cuda:
            fast = grouped_mm_capturable(x.dtype, torch.cuda.get_device_capability(x.device))
            return ([lambda r=r: torch_layer(x, dense[0], dense[1], *r) for r in routes], not fast,
                    "torch-grouped_mm" if fast else "torch-grouped_mm-fallback")
        dense_lin = lambda rows, e, w: rows @ dense[0 if w == "gate_up" else 1][e]   # noqa: E731
        return [lambda r=r: loop_layer(x, *r, gu, dn, dense_lin) for r in routes], True, "torch-loop"
    import w4a16

    experts = {"gate_up": gu, "down": dn}
    cache: Dict[tuple, object] = {}

    def lin(rows, e, which):
        if (e, which) not in cache:
            w = experts[which]
            cache[(e, which)] = w4a16.QuantizedWeight(w.qweight[e], w.scales[e], None, w.group_size)
        return w4a16.gemm(rows, cache[(e, which)])

    return [lambda r=r: loop_layer(x, *r, gu, dn, lin) for r in routes], True, "w4a16-loop"


def _untimed(row: dict, status: str, rel_err, note: str) -> dict:
    """``row`` as a point that was not timed (``status`` "n/a" or "wrong"), with the reason."""
    return dict(row, status=status, rel_err=rel_err, median_us=None, frac_copy=None, speedup_vs_torch=None, note=note)


def run_moe(presets, tokens, dtype, group_size, peers, device, fake: bool, seed: int = 0,
            progress: bool = True) -> MoeResult:
    """Measure every (preset, T) with every peer (module docstring)."""
    from . import ceilings, env

    header = env.collect(device)
    header["settings"] = {"moe": list(presets), "tokens": list(tokens), "dtype": spec.dtype_name(dtype),
                          "group_size": group_size, "peers": list(peers), "fake_timer": fake, "routings": ROUTINGS}
    bw = 2.0e12 if fake else ceilings.measure_copy_bandwidth(device)[0]
    header["copy_tb_s"] = bw / 1e12
    result = MoeResult(header)
    todo = [(p, T) for p in presets for T in tokens]
    try:
        from tqdm import tqdm
        bar = tqdm(todo, desc="bench moe", disable=not progress)
    except ImportError:
        bar = todo
    gen = torch.Generator().manual_seed(seed)
    wgen = torch.Generator(device=device).manual_seed(seed)
    built: dict = {}
    for preset, T in bar:
        H, I, E, k = PRESETS[preset]
        if fake:
            H, I, E, T = (min(a, b) for a, b in zip((H, I, E, T), FAKE_PROXY))
            k = min(k, E)
        g = group_size if group_size == -1 else min(group_size, H, I)   # a proxy shape may be smaller than a group
        if built.get("key") != (preset, H, I, E):
            built = {"key": (preset, H, I, E)}
            if device.type == "cuda":
                torch.cuda.empty_cache()
            built["gu"], built["dn"] = (random_experts(E, 2 * I, H, g, dtype, device, wgen),
                                        random_experts(E, H, I, g, dtype, device, wgen))
            built["dense"] = None
        gu, dn = built["gu"], built["dn"]
        x = torch.randn(T, H, generator=gen).to(device, dtype)
        routes = _routings(T, E, k, device, gen)
        touched = sum(torch.unique(r[0]).numel() for r in routes) / len(routes)
        nbytes = touched * (gu.nbytes() + dn.nbytes()) / E
        ref = moe_ref.fused_moe(x, gu, dn, *routes[0])
        base = dict(card=header["card"], preset=preset, H=H, I=I, E=E, top_k=k, T=T, dtype=spec.dtype_name(dtype),
                    group_size=g, experts_touched=round(touched, 1), touched_mb=round(nbytes / 2**20, 2))
        torch_us = None
        timed_any = False
        for name in peers:
            if name == "torch" and built["dense"] is None:   # K-major 16-bit weights, made once per preset
                built["dense"] = tuple(_dense_k_major(w, dtype) for w in (gu, dn))
            calls, eager, label = _peer_calls(name, x, gu, dn, built["dense"], routes)
            row = dict(base, peer=label, timing="eager" if eager else "graph",
                       note="FAKE TIMER, proxy shape" if fake else "")
            try:
                err = rel_error(calls[0](), ref)
            except Exception as e:   # a peer that cannot run here: reported, the run goes on
                result.rows.append(_untimed(row, "n/a", None, f"{type(e).__name__}: {str(e)[:160]}"))
                continue
            if not err <= TOLERANCE[dtype] * (5 if name == "torch" else 1):   # 16-bit layers round h, a
                result.rows.append(_untimed(row, "wrong", err, "not timed: differs from the reference"))
                continue
            timer = FakeTimer("eager" if eager else "graph") if fake else (EagerTimer() if eager else GraphTimer())
            try:
                if not timed_any:   # the point's first timing is a warm-up, discarded (module docstring)
                    timer.measure(calls, nbytes=nbytes)
                    timed_any = True
                us = timer.measure(calls, nbytes=nbytes, nflops=6.0 * T * k * H * I).median_us
            except Exception as e:   # e.g. a peer a CUDA graph cannot capture: reported, the run goes on
                result.rows.append(_untimed(row, "n/a", err, f"not timed: {type(e).__name__}: {str(e)[:160]}"))
                continue
            if name == "torch":
                torch_us = us
            result.rows.append(dict(row, status="ok", rel_err=err, median_us=us,
                                    frac_copy=nbytes / (us * 1e-6) / bw, speedup_vs_torch=None))
        for r in result.rows[-len(peers):]:
            if r["status"] == "ok" and torch_us and r["peer"].startswith("w4a16"):
                r["speedup_vs_torch"] = torch_us / r["median_us"]
    return result


def markdown(result: MoeResult) -> str:
    h = result.header
    fake = h["settings"]["fake_timer"]
    lines = [f"# w4a16 bench --moe{' (FAKE TIMER: not a measurement)' if fake else ''}", "",
             f"- {h['card']} ({h['sm_count']} SMs), driver {h['driver']}, torch {h['torch']}, triton {h['triton']}, "
             f"Python {h['python']}, w4a16 {h['w4a16']}, {h['date']}",
             f"- {h['settings']['dtype']}, group size {h['settings']['group_size']}, symmetric; copy bandwidth "
             f"{h['copy_tb_s']:.2f} TB/s; {ROUTINGS} routings rotated", "",
             "| preset | H | I | E | k | T | peer | timing | us | of copy | vs torch | note |",
             "|---|---:|---:|---:|---:|---:|---|---|---:|---:|---:|---|"]
    for r in result.rows:
        us = f"{r['median_us']:.1f}" if r["median_us"] else r["status"]
        frac = f"{r['frac_copy']:.2f}" if r["frac_copy"] else "-"
        sp = f"{r['speedup_vs_torch']:.2f}x" if r["speedup_vs_torch"] else "-"
        lines.append(f"| {r['preset']} | {r['H']} | {r['I']} | {r['E']} | {r['top_k']} | {r['T']} | {r['peer']} | "
                     f"{r['timing']} | {us} | {frac} | {sp} | {r['note']} |")
    return "\n".join(lines) + "\n"


def write_all(result: MoeResult, out_dir: str, text: str) -> list:
    """moe.md (``text``), moe.csv and moe.json in ``out_dir``; returns the paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(out_dir, n) for n in ("moe.md", "moe.csv", "moe.json")]
    with open(paths[0], "w", encoding="utf-8") as f:
        f.write(text)
    with open(paths[1], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(result.rows)
    with open(paths[2], "w") as f:
        json.dump({"header": result.header, "rows": result.rows}, f, indent=1,
                  default=lambda v: None if isinstance(v, float) and not math.isfinite(v) else str(v))
    return paths
