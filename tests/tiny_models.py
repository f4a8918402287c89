"""Small torch models shared by the module, model-conversion and checkpoint tests, and the
writer of checkpoint directories in other tools' formats."""
import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

import w4a16
from w4a16 import formats


class Block(nn.Module):
    """h + q_proj(h) + down(relu(up(h))): three Linear layers of K = d and 2d."""

    def __init__(self, d):
        super().__init__()
        self.q_proj = nn.Linear(d, d, bias=False)
        self.up = nn.Linear(d, 2 * d)
        self.down = nn.Linear(2 * d, d)

    def forward(self, h):
        return h + self.q_proj(h) + self.down(torch.relu(self.up(h)))


class TinyLM(nn.Module):
    """embed -> ``layers`` Blocks -> (optional LayerNorm) -> lm_head; ids [B, T] -> logits [B, T, vocab]."""

    def __init__(self, vocab=40, d=64, layers=2, norm=False):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList(Block(d) for _ in range(layers))
        self.norm = nn.LayerNorm(d) if norm else nn.Identity()
        self.lm_head = nn.Linear(d, vocab, bias=False)

    def forward(self, ids):
        h = self.embed(ids)
        for blk in self.layers:
            h = blk(h)
        return self.lm_head(self.norm(h))


def write_hf_checkpoint(folder: str, method: str, source: nn.Module) -> None:
    """Write ``source`` (a model quantized with group size 64, not fused) as a Hugging Face
    checkpoint directory of ``method`` ("gptq", "awq", "compressed-tensors") that
    ``w4a16.load_pretrained_quantized`` reads: config.json and model.safetensors."""

    export = {"gptq": formats.to_gptq, "awq": formats.to_awq, "compressed-tensors": formats.to_compressed_tensors}
    tensors, quantized = {}, set()
    for name, mod in source.named_modules():
        if isinstance(mod, w4a16.W4A16Linear):
            quantized.add(name)
            tensors.update({f"{name}.{k}": v for k, v in export[method](mod.weight_q).items()})
            if mod.bias is not None:
                tensors[f"{name}.bias"] = mod.bias.detach()
    for key, t in source.state_dict().items():
        if key.rpartition(".")[0] not in quantized:
            tensors[key] = t
    os.makedirs(folder, exist_ok=True)
    write_checkpoint(Path(folder), quantization_config(method), tensors, model_type="llama")


def write_moe_checkpoint(folder, method: str, model: nn.Module, mixtral_names: bool = False) -> dict:
    """``model`` (a float transformers MoE model) as a checkpoint of ``method``: dense layers and
    every expert's projections quantized (group 64, asymmetric), experts as per-expert layers
    (``experts.{e}.gate_proj`` ..., or Mixtral's ``block_sparse_moe.experts.{e}.w1`` ... with
    ``mixtral_names``). Returns {experts name: [E] of (gate, up, down) QuantizedWeights}."""
    import copy

    export = {"gptq": formats.to_gptq, "awq": formats.to_awq, "compressed-tensors": formats.to_compressed_tensors}
    src = copy.deepcopy(model)
    w4a16.quantize_model(src, group_size=64, symmetric=False, progress=False, fuse=False, experts=False)
    tensors, written = {}, {}
    for name, m in src.named_modules():
        if isinstance(m, w4a16.W4A16Linear):
            tensors.update({f"{name}.{k}": v for k, v in export[method](m.weight_q).items()})
        elif isinstance(getattr(m, "gate_up_proj", None), torch.Tensor):
            I = m.down_proj.shape[2]
            ws = []
            for e in range(m.gate_up_proj.shape[0]):
                parts = [m.gate_up_proj[e, :I], m.gate_up_proj[e, I:], m.down_proj[e]]
                ws.append([w4a16.quantize(p.detach(), 64, symmetric=False) for p in parts])
                base = name.replace(".mlp.", ".block_sparse_moe.") if mixtral_names else name
                for proj, w in zip(("w1", "w3", "w2") if mixtral_names else ("gate_proj", "up_proj", "down_proj"), ws[-1]):
                    tensors.update({f"{base}.{e}.{proj}.{k}": v for k, v in export[method](w).items()})
            written[name] = ws
    quantized = {n for n, m in src.named_modules() if isinstance(m, w4a16.W4A16Linear)}
    for key, t in src.state_dict().items():
        owner = key.rpartition(".")[0]
        if owner not in quantized and owner not in written:
            tensors[key] = t
    os.makedirs(folder, exist_ok=True)
    write_checkpoint(Path(folder), quantization_config(method, desc_act=False), tensors, model_type="tiny")
    return written


def quantization_config(method: str, desc_act: bool = True) -> dict:
    """The ``quantization_config`` of a ``method`` checkpoint with group size 64 and zero points."""
    return {"gptq": {"quant_method": "gptq", "bits": 4, "group_size": 64, "desc_act": desc_act, "sym": False,
                     "checkpoint_format": "gptq"},
            "awq": {"quant_method": "awq", "bits": 4, "group_size": 64, "version": "gemm", "zero_point": True},
            "compressed-tensors": {"quant_method": "compressed-tensors", "format": "pack-quantized",
                                   "ignore": ["lm_head"],
                                   "config_groups": {"g": {"targets": ["Linear"], "input_activations": None,
                                                           "weights": {"num_bits": 4, "type": "int", "symmetric": False,
                                                                       "strategy": "group", "group_size": 64}}}}}[method]


def write_checkpoint(folder: Path, qc: dict, tensors: dict, shards: int = 1, model_type: str = "tiny") -> Path:
    """A checkpoint directory: config.json with ``qc`` as its quantization_config, and ``tensors``
    in model.safetensors, or (``shards`` > 1) in that many files with an index."""
    (folder / "config.json").write_text(json.dumps({"model_type": model_type, "quantization_config": qc}))
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    if shards == 1:
        save_file(tensors, str(folder / "model.safetensors"))
        return folder
    keys = sorted(tensors)
    weight_map = {}
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: tensors[k] for k in keys[i::shards]}
        save_file(part, str(folder / name))
        weight_map.update({k: name for k in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder
