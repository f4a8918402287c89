"""Reports of a run: a markdown summary (stdout and bench.md), bench.csv and bench.json.

The CSV starts with ``# key: value`` lines (card, SM count, driver, versions, date, settings,
ceilings; read it with ``pandas.read_csv(path, comment="#")``), then one row per
(point, peer, timing) with the columns of ``runner.COLUMNS``. The JSON holds the same header
and rows. A ``--fake-timer`` run is labelled everywhere: the header's first key is ``warning``
(so the CSV's first line is ``# warning: FAKE TIMER ...``), timed rows carry the label in
``note``, and the markdown title, header and every table heading say it.
"""
from __future__ import annotations

import csv
import json
import math
import os
from collections import OrderedDict

from .runner import BASELINE, COLUMNS, FAKE_LABEL, FAKE_NOTE, BenchResult

PRIMARY = "w4a16"


def _us(v) -> str:
    if v is None:
        return "-"
    return f"{v:.2f}" if v < 10 else f"{v:.1f}" if v < 1000 else f"{v:.0f}"


def _num(v, spec: str) -> str:
    return "-" if v is None or not math.isfinite(v) else format(v, spec)


def _cell(r) -> str:
    if r is None:
        return "-"
    if r["status"] == "ok":
        return _us(r["median_us"])
    return "WRONG" if r["status"] == "wrong" else "n/a"


def header_lines(h: dict) -> list:
    """Human-readable lines about the card, software and ceilings."""
    c = h.get("ceilings", {})
    s = h.get("settings", {})
    timing = {"graph": "CUDA-graph replay", "eager": "eager loop (CUDA events)",
              "both": "CUDA-graph replay and eager loop"}.get(s.get("timing"), s.get("timing"))
    if s.get("fake_timer"):
        return [f"**{h.get('warning', FAKE_NOTE)}**",
                f"card: {h['card']}; torch {h['torch']}, triton {h['triton']}, w4a16 {h['w4a16']}; {h['date']}",
                f"times: {FAKE_LABEL} (a formula of bytes and flops against made-up ceilings); every "
                "result checked against w4a16.reference.gemm first"]
    return [
        f"card: {h['card']} ({h['sm_count']} SMs{', ' + h['capability'] if h.get('capability') else ''}), "
        f"driver {h['driver']}; torch {h['torch']}, triton {h['triton']}, CUDA {h['cuda']}, "
        f"Python {h['python']}, w4a16 {h['w4a16']}; {h['date']}",
        f"ceilings ({c.get('source')}): copy {c.get('copy_tb_s', 0):.2f} TB/s (read + write, eager "
        f"b.copy_(a)), fp16 GEMM {c.get('gemm_size')}^3 {c.get('gemm_tflop_s', 0):.0f} TFLOP/s, "
        f"L2 {c.get('l2_mib', 0):.0f} MiB",
        f"times: us per call, median of the repeats; {timing}, weights rotated over copies totalling "
        f">= 2x L2; every result checked against w4a16.reference.gemm first "
        "(relative Frobenius error <= " + ", ".join(f"{k} {v:g}" for k, v in h.get("tolerance", {}).items()) + ")",
    ]


def _tables(rows: list) -> "OrderedDict":
    """{(dtype, group_size, zeros, timing): {(layer, N, K, M): {peer: row}}} in run order."""
    out: OrderedDict = OrderedDict()
    for r in rows:
        t = out.setdefault((r["dtype"], r["group_size"], r["zeros"], r["timing"]), OrderedDict())
        t.setdefault((r["layer"], r["N"], r["K"], r["M"]), {})[r["peer"]] = r
    return out


def markdown(result: BenchResult) -> str:
    """The summary: header lines, one table per (dtype, group size, zeros, timing), then notes."""
    rows = result.rows
    peer_names = list(dict.fromkeys(r["peer"] for r in rows))
    primary = PRIMARY if PRIMARY in peer_names else (peer_names[0] if peer_names else PRIMARY)
    variants = [p for p in peer_names if p.startswith(PRIMARY)]
    fake = bool(result.header.get("settings", {}).get("fake_timer"))
    tag = f" ({FAKE_LABEL})" if fake else ""
    lines = [f"# w4a16 bench{tag}", ""] + [f"- {s}" for s in header_lines(result.header)] + [""]
    for (dt, g, zeros, timing), table in _tables(rows).items():
        lines += [f"## {dt}, group size {g}, {'with zeros' if zeros else 'symmetric'}, {timing} timing{tag}", ""]
        cols = ["layer", "N", "K", "M"] + [f"{p} us" for p in peer_names]
        cols += [f"{primary} vs {BASELINE}", f"{primary} of floor", f"{primary} GB/s", f"{primary} TFLOP/s",
                 f"{primary} floor us", f"{primary} config"]
        if len(variants) > 1:
            cols.append("fastest")
        lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        for (layer, N, K, M), by_peer in table.items():
            p = by_peer.get(primary)
            ok = p is not None and p["status"] == "ok"
            cells = [layer, str(N), str(K), str(M)] + [_cell(by_peer.get(n)) for n in peer_names]
            cells += [_num(p["speedup_vs_fp16"], ".2f") + "x" if ok and p["speedup_vs_fp16"] else "-",
                      _num(p["frac_floor"], ".2f") if ok else "-", _num(p["gbps"], ".0f") if ok else "-",
                      _num(p["tflops"], ".1f") if ok else "-", _us(p["floor_us"]) if ok else "-",
                      (p["config"] or "-") if p is not None else "-"]
            if len(variants) > 1:
                timed = [(by_peer[v]["median_us"], v) for v in variants
                         if v in by_peer and by_peer[v]["status"] == "ok"]
                cells.append(min(timed)[1] if timed else "-")
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    lines += notes(rows)
    return "\n".join(lines).rstrip() + "\n"


def notes(rows: list) -> list:
    """Wrong results (each listed) and n/a reasons (once per peer and reason)."""
    out = []
    wrong = [r for r in rows if r["status"] == "wrong"]
    seen: OrderedDict = OrderedDict()
    for r in rows:
        if r["status"] == "n/a":
            seen[(r["peer"], r["note"])] = seen.get((r["peer"], r["note"]), 0) + 1
    if wrong or seen:
        out += ["## Notes", ""]
    done = set()
    for r in wrong:
        k = (r["layer"], r["M"], r["dtype"], r["group_size"], r["zeros"], r["peer"])
        if k not in done:
            done.add(k)
            out.append(f"- WRONG (not timed): {r['peer']} on {r['layer']} M={r['M']} {r['dtype']} "
                       f"g={r['group_size']}{' zeros' if r['zeros'] else ''}: {r['note']}")
    for (peer, note), n in seen.items():
        out.append(f"- {peer}: n/a: {note} ({n} rows)")
    return out


def _flat(v):
    return json.dumps(v, sort_keys=True) if isinstance(v, (dict, list)) else v


def _csv_value(v):
    if v is None:
        return ""
    if isinstance(v, float):
        return format(v, ".6g")
    return v


def write_csv(result: BenchResult, path: str) -> None:
    """``# key: value`` header lines, then the rows with the columns of COLUMNS."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        for k, v in result.header.items():
            f.write(f"# {k}: {_flat(v)}\n")
        w = csv.DictWriter(f, fieldnames=list(COLUMNS))
        w.writeheader()
        for r in result.rows:
            w.writerow({k: _csv_value(r[k]) for k in COLUMNS})


def _json_safe(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_safe(x) for x in v]
    return v


def write_json(result: BenchResult, path: str) -> None:
    """{"header": ..., "columns": [...], "rows": [...]}; non-finite numbers become null."""
    doc = {"header": result.header, "columns": list(COLUMNS), "rows": result.rows}
    with open(path, "w", encoding="utf-8") as f:
        json.dump(_json_safe(doc), f, indent=1)
        f.write("\n")


def write_all(result: BenchResult, out_dir: str, text: str) -> list:
    """Write bench.md (``text``), bench.csv and bench.json into ``out_dir``; returns the paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(out_dir, n) for n in ("bench.md", "bench.csv", "bench.json")]
    with open(paths[0], "w", encoding="utf-8") as f:
        f.write(text)
    write_csv(result, paths[1])
    write_json(result, paths[2])
    return paths
