"""Tensor parallelism for W4A16 layers on PyTorch's own machinery (DeviceMesh, DTensor,
``parallelize_module``; NCCL on GPUs, gloo on CPUs).

    styles.py   W4A16ColwiseParallel, W4A16RowwiseParallel: ParallelStyles for W4A16Linear
    experts.py  W4A16ExpertsParallel: a mixture of experts' experts module, split over I
    module.py   ShardedW4A16Linear: the layer once sharded (local kernels, DTensor state dict)
    shard.py    which rows / columns / groups a rank keeps, and why a split is refused
    plan.py     apply_tp_plan(model, mesh, plan=None) and DEFAULT_TP_PLAN (Llama-style)
    loading.py  load_sharded(path, model, mesh, plan=None): reads only the rank's bytes
"""
from .experts import W4A16ExpertsParallel
from .loading import load_sharded
from .module import ShardedW4A16Linear
from .plan import DEFAULT_TP_PLAN, apply_tp_plan
from .shard import LocalShard, Split, split_for
from .styles import W4A16ColwiseParallel, W4A16RowwiseParallel

__all__ = [
    "DEFAULT_TP_PLAN",
    "LocalShard",
    "ShardedW4A16Linear",
    "Split",
    "W4A16ColwiseParallel",
    "W4A16ExpertsParallel",
    "W4A16RowwiseParallel",
    "apply_tp_plan",
    "load_sharded",
    "split_for",
]
