"""The Gluon session scripts' log: every line printed and, once ``open`` names a file, written
there too (flushed per line, so a run cut off by a time limit leaves its log)."""
from __future__ import annotations


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
