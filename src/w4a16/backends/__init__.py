"""Kernel implementations behind one API (see :mod:`.base` for the interface).

``w4a16.backends.registry()`` maps names to the importable backends, in order of preference;
``w4a16.backends.get(name)`` returns one. Backends: ``gluon`` (Hopper, sm_90a), ``triton``
(sm_80+, and Triton's CPU interpreter), ``reference`` (pure torch, anywhere).
"""
from .base import Backend, Problem
from .selection import Choice, choose, get, registry

__all__ = ["Backend", "Choice", "Problem", "choose", "get", "registry"]
