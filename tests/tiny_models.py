"""Small torch models shared by the module, model-conversion and checkpoint tests."""
import torch
from torch import nn


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
    import json
    import os

    from safetensors.torch import save_file

    import w4a16
    from w4a16 import formats

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
    qc = {"gptq": {"quant_method": "gptq", "bits": 4, "group_size": 64, "desc_act": True, "sym": False,
                   "checkpoint_format": "gptq"},
          "awq": {"quant_method": "awq", "bits": 4, "group_size": 64, "version": "gemm", "zero_point": True},
          "compressed-tensors": {"quant_method": "compressed-tensors", "format": "pack-quantized", "ignore": ["lm_head"],
                                 "config_groups": {"g": {"targets": ["Linear"], "input_activations": None,
                                                         "weights": {"num_bits": 4, "type": "int", "symmetric": False,
                                                                     "strategy": "group", "group_size": 64}}}}}[method]
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({"model_type": "llama", "quantization_config": qc}, f)
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(folder, "model.safetensors"))
