"""PNG plots of a run (matplotlib, imported only here and only when plotting).

* speedup.png  — speedup over cuBLAS fp16 vs M (log x and y), one panel per layer, one line per peer.
* roofline.png — fraction of the roofline floor (floor / time, each peer's own bytes) vs M.
* moe_speedup.png, moe_copy.png (``w4a16 bench --moe``) — speedup over torch's 16-bit layer and
  fraction of copy bandwidth vs T, one panel per preset.

One figure per (dtype, group size, zeros) and timing would multiply files; the plots use the first
dtype / group size / zeros of the run and graph timing when measured (else eager), named in the title.
"""
from __future__ import annotations

import math
import os
from typing import Optional

from .runner import BASELINE, FAKE_LABEL, BenchResult


def _select(rows: list) -> tuple:
    ok = [r for r in rows if r["status"] == "ok"]
    if not ok:
        return [], ""
    timing = "graph" if any(r["timing"] == "graph" for r in ok) else ok[0]["timing"]
    first = ok[0]
    key = (first["dtype"], first["group_size"], first["zeros"])
    sel = [r for r in ok if r["timing"] == timing and (r["dtype"], r["group_size"], r["zeros"]) == key]
    title = (f"{first['card']}: {key[0]}, group size {key[1]}, {'zeros' if key[2] else 'symmetric'}, "
             f"{timing} timing")
    return sel, title


def _panels(figure_cls, rows: list, field: str, ylabel: str, title: str, path: str, skip_peer: Optional[str],
            ref_line: float, log_y: bool, xlabel: str = "M") -> None:
    layers = list(dict.fromkeys(r["layer"] for r in rows))
    ms = sorted({r["M"] for r in rows})
    peers = [p for p in dict.fromkeys(r["peer"] for r in rows) if p != skip_peer]
    ncol = min(4, len(layers))
    nrow = math.ceil(len(layers) / ncol)
    fig = figure_cls(figsize=(4.2 * ncol, 3.4 * nrow + 0.6))
    axes = fig.subplots(nrow, ncol, squeeze=False)
    for i, layer in enumerate(layers):
        ax = axes[i // ncol][i % ncol]
        for peer in peers:
            pts = sorted((r["M"], r[field]) for r in rows
                         if r["layer"] == layer and r["peer"] == peer and r[field] is not None)
            if pts:
                ax.plot([m for m, _ in pts], [v for _, v in pts], marker="o", label=peer)
        ax.axhline(ref_line, color="grey", linestyle="--", linewidth=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xticks(ms, [str(m) for m in ms])
        ax.minorticks_off()
        if log_y:
            ax.set_yscale("log", base=2)
        ax.set_title(layer)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    for j in range(len(layers), nrow * ncol):
        axes[j // ncol][j % ncol].set_visible(False)
    handles, labels = axes[0][0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="upper right")
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0, 0.9, 0.95))
    fig.savefig(path, dpi=110)


def plot_all(result: BenchResult, out_dir: str) -> tuple:
    """Write speedup.png and roofline.png into ``out_dir``.

    Returns (paths written, message): paths empty with a message when matplotlib is missing or
    nothing was timed.
    """
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return [], "plots skipped: matplotlib is not installed (pip install matplotlib)"
    rows, title = _select(result.rows)
    if not rows:
        return [], "plots skipped: no timed results"
    if result.header.get("settings", {}).get("fake_timer"):
        title = f"{FAKE_LABEL}\n{title}"
    os.makedirs(out_dir, exist_ok=True)
    speedup = os.path.join(out_dir, "speedup.png")
    roof = os.path.join(out_dir, "roofline.png")
    _panels(Figure, rows, "speedup_vs_fp16", f"speedup over {BASELINE}", title, speedup, BASELINE, 1.0,
            log_y=True)
    _panels(Figure, rows, "frac_floor", "fraction of roofline floor", title, roof, None, 1.0,
            log_y=False)
    return [speedup, roof], ""


def plot_moe(rows: list, card: str, settings: dict, out_dir: str) -> tuple:
    """Write moe_speedup.png and moe_copy.png for ``w4a16 bench --moe`` rows (dicts with preset,
    T, peer, status, speedup_vs_torch, frac_copy) into ``out_dir``; (paths, message) as
    :func:`plot_all`."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return [], "plots skipped: matplotlib is not installed (pip install matplotlib)"
    ok = [dict(r, layer=r["preset"], M=int(r["T"])) for r in rows if r["status"] == "ok"]
    if not ok:
        return [], "plots skipped: no timed results"
    title = (f"{card}: MoE layer, {settings.get('dtype')}, group size {settings.get('group_size')}"
             + (f"\n{FAKE_LABEL}" if settings.get("fake_timer") else ""))
    os.makedirs(out_dir, exist_ok=True)
    speedup, copy = os.path.join(out_dir, "moe_speedup.png"), os.path.join(out_dir, "moe_copy.png")
    torch_peer = next((r["peer"] for r in ok if r["peer"].startswith("torch")), None)
    _panels(Figure, ok, "speedup_vs_torch", "speedup over torch 16-bit layer", title, speedup, torch_peer, 1.0,
            log_y=True, xlabel="T (tokens)")
    _panels(Figure, ok, "frac_copy", "fraction of copy bandwidth", title, copy, None, 1.0, log_y=False,
            xlabel="T (tokens)")
    return [speedup, copy], ""
