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
