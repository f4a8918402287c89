"""Other int4 weight-only implementations, timed as peers in ``w4a16.e2e.speed``'s harness.

``torchao-int4``: torchao's ``Int4WeightOnlyConfig`` with the tinygemm packing
(``int4_packing_format="tile_packed_to_4d"``: ``aten._weight_int4pack_mm``, the path torchao's and
gpt-fast's int4 decode numbers come from), group size as given, every ``nn.Linear`` but
``lm_head``. tinygemm takes bf16 activations, so the peer runs the model in bf16 (the fp16 and
W4A16 rows run fp16). torchao is not a dependency: a missing package is a clear error.
"""
from __future__ import annotations

from typing import Callable, Dict

import torch

from ..errors import W4A16Error


def torchao_int4(model: torch.nn.Module, group_size: int = 128) -> torch.nn.Module:
    """Quantizes ``model`` in place with torchao's int4 weight-only tinygemm path (bf16); returns it."""
    try:
        from torchao.quantization import Int4WeightOnlyConfig, quantize_
    except ImportError as e:
        raise W4A16Error(f"peers: expected the torchao package for 'torchao-int4' (pip install torchao), "
                         f"got ImportError: {e}") from None
    model.to(torch.bfloat16)
    cfg = Int4WeightOnlyConfig(group_size=group_size, int4_packing_format="tile_packed_to_4d")
    quantize_(model, cfg, filter_fn=lambda m, fqn: isinstance(m, torch.nn.Linear) and not fqn.endswith("lm_head"))
    return model


PEERS: Dict[str, Callable[[torch.nn.Module, int], torch.nn.Module]] = {"torchao-int4": torchao_int4}


def check_peers(names) -> None:
    """Raises W4A16Error for a name that is not in PEERS."""
    for n in names:
        if n not in PEERS:
            raise W4A16Error(f"peers: expected names from {sorted(PEERS)}, got {n!r}")
