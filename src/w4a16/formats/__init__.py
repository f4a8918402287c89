"""Importers from the checkpoint formats users bring, and the matching exporters.

Every importer returns a :class:`w4a16.QuantizedWeight`; every exporter takes one and returns the
format's tensors (exact layouts in each module's docstring)::

    from_gptq(qweight, qzeros, scales, g_idx=None, checkpoint_format="gptq", bits=4)
    from_awq(qweight, qzeros, scales)
    from_compressed_tensors(weight_packed, weight_scale, weight_shape, weight_zero_point=None,
                            weight_g_idx=None)
    from_hqq(W_q, scale, zero, shape, group_size)
"""
from .awq import from_awq, to_awq
from .compressed_tensors import from_compressed_tensors, to_compressed_tensors
from .gptq import from_gptq, to_gptq
from .hqq import from_hqq, to_hqq

__all__ = [
    "from_awq",
    "from_compressed_tensors",
    "from_gptq",
    "from_hqq",
    "to_awq",
    "to_compressed_tensors",
    "to_gptq",
    "to_hqq",
]
