"""The option matrix the Gluon session scripts check their kernel on: every dtype, group size and
zero-point kind once, on shapes taken in turn, with bias and alpha varied alongside."""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch


def option_matrix(shapes: Sequence[Tuple[int, int, int]]) -> List[Tuple[int, tuple]]:
    """[(i, (M, N, K, group, zeros, dtype, bias, alpha))] for i = 1, 2, ...: fp16 and bf16 x group
    32..256 and per channel x no / integer / float zero points, the i-th taking shapes[i - 1]
    (cyclically; K raised to 4096 where the group does not divide it), bias on even i, alpha 0.5
    on every third."""
    out = []
    i = 0
    for dtype in (torch.float16, torch.bfloat16):
        for g in (32, 64, 128, 256, -1):
            for zeros in (None, "int", "float"):
                M, N, K = shapes[i % len(shapes)]
                i += 1
                if g != -1 and K % g:
                    K = 4096
                out.append((i, (M, N, K, g, zeros, dtype, i % 2 == 0, 1.0 if i % 3 else 0.5)))
    return out
