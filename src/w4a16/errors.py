"""Argument checks that fail with one message format: argument, expected value, actual value.

Every user-facing check in the package goes through :func:`expect` so that messages read alike::

    scales: expected shape (4096, 32), got (4096, 64)
"""
from __future__ import annotations

from typing import Any


class W4A16Error(ValueError):
    """Raised for any invalid argument; subclasses ValueError so ``except ValueError`` catches it."""


class BackendRefused(W4A16Error):
    """A backend named by the caller (``backend=...`` or a config of that backend) cannot run the
    call: a shape, dtype or device outside its kernels' rules. ``backend="auto"`` never raises it."""


def fail(arg: str, expected: Any, actual: Any) -> None:
    """Raise :class:`W4A16Error` naming ``arg`` with the expected and the actual value."""
    raise W4A16Error(f"{arg}: expected {expected}, got {actual}")


def expect(ok: bool, arg: str, expected: Any, actual: Any) -> None:
    """Raise :class:`W4A16Error` unless ``ok``."""
    if not ok:
        fail(arg, expected, actual)
