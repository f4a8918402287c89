"""The session scripts' outputs: the Gluon sessions' log (every line printed and, once ``open``
names a file, written there too, flushed per line, so a run cut off by a time limit leaves its
log), and the benchmarks' CSV tables (:func:`write_rows`)."""
from __future__ import annotations

import csv
import os


class SessionLog:
    def __init__(self):
        self.file = None

    def open(self, path) -> None:
        self.file = open(path, "w")

    def __call__(self, *parts) -> None:
        line = " ".join(str(p) for p in parts)
        print(line, flush=True)
        if self.file:
            self.file.write(line + "\n")
            self.file.flush()


def write_rows(rows: list, out_dir: str, name: str) -> None:
    """``rows`` (dicts with the same keys, in column order) as the CSV file ``name`` under
    ``out_dir`` (created)."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, name), "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=list(rows[0]))
        wr.writeheader()
        wr.writerows(rows)
