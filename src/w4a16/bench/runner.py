"""The measurement loop: for every point, check each peer against the reference, then time it.

For each layer, dtype and group size one random weight is built, and each peer prepares its form of
it once (with enough copies to rotate past the L2). For each M, a random x and the reference
``w4a16.reference.gemm(x, w)`` are computed; a peer's first result must be within tolerance of it
(relative Frobenius error, by the dtype the peer computes in) or the row is recorded "wrong" and
not timed. Every timer then measures the peer. A peer that cannot run a point gives "n/a" rows
with the reason; nothing a peer does stops the run.

With ``--fake-timer`` (tests of the harness, on the CPU) the times are made up and the operands
are shrunk to a proxy problem of at most :data:`FAKE_PROXY` (so the run takes seconds in Triton's
interpreter); the header, every timed row's note, the report and the plots say so.
"""
from __future__ import annotations

import gc
import math
from dataclasses import dataclass, field
from typing import Optional

import torch

from .. import reference, spec
from . import ceilings as ceil_mod
from . import env as env_mod
from . import roofline
from . import shapes as sh
from ..measure import TOLERANCE, generator, random_activation, random_weight, rel_error
from .peers import make_peers
from .timing import copies_for, make_timers

BASELINE = "cublas-fp16"

# --fake-timer: every table, CSV, JSON and plot says so; operands are shrunk to a proxy problem.
FAKE_LABEL = "FAKE TIMER \N{EM DASH} not a measurement"
FAKE_PROXY = (16, 256, 1024)  # the largest M, N, K actually computed (and checked) with --fake-timer
FAKE_NOTE = (f"{FAKE_LABEL}: times are made up by a formula from each call's bytes and flops, nothing was "
             f"timed; results were checked on proxy problems of at most M, N, K = "
             f"{', '.join(map(str, FAKE_PROXY))}")


def fake_proxy(M: int, N: int, K: int) -> tuple:
    """(M, N, K) of the problem a --fake-timer run computes for a point: at most FAKE_PROXY.

    K stays a multiple of every supported group size (1024 is) and even, so every point is valid.
    """
    return min(M, FAKE_PROXY[0]), min(N, FAKE_PROXY[1]), min(K, FAKE_PROXY[2])

COLUMNS = (
    "card", "sm_count", "layer", "N", "K", "M", "dtype", "group_size", "zeros", "peer", "config",
    "timing", "status", "rel_err", "median_us", "p10_us", "p90_us", "tflops", "gbps", "floor_us",
    "frac_floor", "speedup_vs_fp16", "copies", "calls", "note",
)


@dataclass
class BenchResult:
    """header: card, versions, date, settings and ceilings; rows: one dict per (point, peer, timing)
    with exactly the keys of COLUMNS (None where a value does not apply)."""

    header: dict
    rows: list = field(default_factory=list)

    def wrong(self) -> list:
        return [r for r in self.rows if r["status"] == "wrong"]


def _short(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    text = f"{type(e).__name__}: {msg[0] if msg else ''}".rstrip(": ")
    return text if len(text) <= 240 else text[:237] + "..."


def _row(card: dict, p, peer_name: str, timing: str, **kw) -> dict:
    row = dict.fromkeys(COLUMNS)
    row.update(card=card["card"], sm_count=card["sm_count"], layer=p.shape.label, N=p.N, K=p.K, M=p.M,
               dtype=p.dtype_name, group_size=p.group_size, zeros=p.zeros, peer=peer_name, timing=timing)
    row.update(kw)
    return row


def measure_peer(peer, built, x, ref, p, timers, ceil, card: dict, copies: int,
                 na: Optional[str] = None) -> list:
    """Rows (one per timer) of one peer at one point: 'n/a', 'wrong' (never timed) or 'ok'."""
    def all_rows(**kw):
        return [_row(card, p, peer.name, t.name, **kw) for t in timers]

    if na is not None:
        return all_rows(status="n/a", note=na)
    try:
        calls = built.bind(x)
        err = rel_error(calls[0](), ref)
        label = built.label(x)
    except Exception as e:  # noqa: BLE001 - a failing peer is reported, never fatal
        return all_rows(status="n/a", note=_short(e))
    tol = TOLERANCE[peer.dtype(p)]
    if not (math.isfinite(err) and err <= tol):
        return all_rows(status="wrong", config=label, rel_err=err, copies=copies,
                        note=f"relative error {err:.3g} > {tol:g} ({spec.dtype_name(peer.dtype(p))})")
    nbytes, nflops = peer.nbytes(p), roofline.flops(p.M, p.N, p.K)
    rows = []
    for t in timers:
        base = dict(config=label, rel_err=err, copies=copies)
        try:
            tm = t.measure(calls, nbytes=nbytes, nflops=nflops)
        except Exception as e:  # noqa: BLE001
            rows.append(_row(card, p, peer.name, t.name, status="n/a",
                             note=f"{t.name} timing: {_short(e)}", **base))
            continue
        m = roofline.merit(tm.median_us * 1e-6, nbytes, nflops, ceil.bandwidth, ceil.rate)
        rows.append(_row(card, p, peer.name, t.name, status="ok", median_us=tm.median_us, p10_us=tm.p10_us,
                         p90_us=tm.p90_us, tflops=m.tflops, gbps=m.gbps, floor_us=m.floor_us,
                         frac_floor=m.frac_floor, calls=tm.calls, **base))
    return rows


def add_speedups(rows: list) -> None:
    """Fill speedup_vs_fp16 = cuBLAS fp16 median / median for rows of the same point and timing."""
    fields = ("layer", "N", "K", "M", "dtype", "group_size", "zeros", "timing")
    key = lambda r: tuple(r[f] for f in fields)  # noqa: E731
    base = {key(r): r["median_us"] for r in rows if r["peer"] == BASELINE and r["status"] == "ok"}
    for r in rows:
        if r["status"] == "ok":
            r["speedup_vs_fp16"] = roofline.speedup(base.get(key(r)), r["median_us"])


def _groups(points) -> dict:
    out: dict = {}
    for p in points:
        out.setdefault((p.shape, p.dtype, p.group_size, p.zeros), []).append(p)
    return out


def _build_all(peers, w, p0, device, l2: int) -> dict:
    """{peer name: (Built or None, copies, n/a reason or None)} for one weight."""
    out = {}
    for peer in peers:
        reason = peer.unavailable(p0, device)
        if reason is not None:
            out[peer.name] = (None, 0, reason)
            continue
        copies = copies_for(peer.weight_bytes(p0), l2)
        try:
            out[peer.name] = (peer.build(w, copies), copies, None)
        except Exception as e:  # noqa: BLE001
            out[peer.name] = (None, copies, f"build: {_short(e)}")
    return out


def run_bench(settings, device, progress: bool = True) -> BenchResult:
    """Measure every point of ``settings`` on ``device``; ceilings first, rows in grid order."""
    from tqdm import tqdm

    device = torch.device(device)
    fake = settings.fake_timer
    ceil = ceil_mod.fake() if fake else ceil_mod.measure(device)
    card = env_mod.card(device)
    header = {"warning": FAKE_NOTE} if fake else {}
    header.update(env_mod.collect(device), settings=settings.as_dict(), ceilings=ceil.as_dict(),
                  tolerance={spec.dtype_name(k): v for k, v in TOLERANCE.items()}, baseline=BASELINE)
    peers = make_peers(settings.peers, configs=settings.configs)
    header["peers_run"] = [peer.name for peer in peers]
    result = BenchResult(header)
    timers = make_timers(settings.timing, fake=fake)
    points = sh.grid(settings.shapes, settings.ms, settings.dtypes, settings.group_sizes, settings.zeros)
    bar = tqdm(total=len(points) * len(peers), disable=not progress, unit="meas", dynamic_ncols=True)
    try:
        for gi, ((shape, dtype, g, zeros), pts) in enumerate(_groups(points).items()):
            gen = generator(device, settings.seed + gi)
            _, wN, wK = fake_proxy(1, shape.N, shape.K) if fake else (1, shape.N, shape.K)
            w = random_weight(wN, wK, g, zeros, dtype, device, gen)
            # Fake times need no L2 rotation: two copies keep the rotation code exercised.
            built = _build_all(peers, w, pts[0], device, 0 if fake else ceil.l2_bytes)
            for p in pts:
                x = ref = None
                try:
                    x = random_activation(fake_proxy(p.M, p.N, p.K)[0] if fake else p.M, wK, dtype, device, gen)
                    ref = reference.gemm(x, w)
                    ref_error = None
                except Exception as e:  # noqa: BLE001 - e.g. out of memory at a huge M
                    ref_error = f"reference: {_short(e)}"
                for peer in peers:
                    bar.set_description(f"{p.shape.label} M={p.M} {peer.name}", refresh=False)
                    b, copies, reason = built[peer.name]
                    result.rows += measure_peer(peer, b, x, ref, p, timers, ceil, card, copies,
                                                na=reason or ref_error)
                    bar.update(1)
                del x, ref
            del w, built
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    finally:
        bar.close()
    add_speedups(result.rows)
    if fake:
        for r in result.rows:
            if r["status"] == "ok":
                r["note"] = FAKE_LABEL
    return result
