"""Plain-text tables that are also valid markdown, for the command line and the benchmark reports.

    >>> print(format_table(["M", "status"], [[1, "ok"], [16, "ok"]]))
    |   M | status |
    | --: | ------ |
    |   1 | ok     |
    |  16 | ok     |
"""
from __future__ import annotations

import numbers
from typing import Optional, Sequence


def _is_number(cell) -> bool:
    return isinstance(cell, numbers.Number) and not isinstance(cell, bool)


def _cell(cell) -> str:
    if cell is None:
        return "-"
    if isinstance(cell, float):
        return f"{cell:.4g}"
    return str(cell)


def format_table(headers: Sequence[str], rows: Sequence[Sequence], align: Optional[str] = None) -> str:
    """A markdown table with every column padded to one width.

    Args:
        headers: column titles.
        rows: one sequence of cells per row, as long as ``headers``. Cells are printed with
            ``str``; floats with 4 significant digits; None as "-".
        align: one character per column, "l" or "r"; by default a column is right-aligned
            when all its non-None cells are numbers.
    Returns:
        The table, lines joined by newlines, without a trailing newline.
    """
    ncol = len(headers)
    for i, row in enumerate(rows):
        if len(row) != ncol:
            raise ValueError(f"rows[{i}]: expected {ncol} cells, got {len(row)}")
    if align is None:
        align = "".join(
            "r" if any(r[c] is not None for r in rows) and all(_is_number(r[c]) for r in rows if r[c] is not None)
            else "l"
            for c in range(ncol))
    if len(align) != ncol or set(align) - {"l", "r"}:
        raise ValueError(f"align: expected {ncol} characters of 'l'/'r', got {align!r}")
    text = [[str(h) for h in headers]] + [[_cell(c) for c in row] for row in rows]
    width = [max(3, *(len(r[c]) for r in text)) for c in range(ncol)]

    def line(cells):
        padded = (s.rjust(w) if a == "r" else s.ljust(w) for s, w, a in zip(cells, width, align))
        return "| " + " | ".join(padded) + " |"

    rule = "| " + " | ".join(("-" * (w - 1) + ":") if a == "r" else "-" * w for w, a in zip(width, align)) + " |"
    return "\n".join([line(text[0]), rule] + [line(r) for r in text[1:]])


def fmt_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'; binary units up to GiB."""
    for unit in ("B", "KiB", "MiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"
