"""Converting a module in place by giving it a subclass of its own class that mixes in another
forward (the fused decoder layers, the one-kernel decode attention, the fused MoE routers)."""
from __future__ import annotations

_MADE: dict = {}   # (mixin, class) -> the subclass


def mixed_class(mixin: type, cls: type, prefix: str, **attrs) -> type:
    """The subclass (mixin, cls) named ``prefix + cls.__name__`` in the mixin's module, with class
    attributes ``attrs``; made once per (mixin, cls), so converted modules of one class share it."""
    made = _MADE.get((mixin, cls))
    if made is None:
        made = _MADE[(mixin, cls)] = type(f"{prefix}{cls.__name__}", (mixin, cls),
                                          {"__module__": mixin.__module__, **attrs})
    return made
