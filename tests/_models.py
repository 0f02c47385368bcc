"""Small modules shared by the tests (imported as `_models`: pytest puts tests/ on the path)."""
from __future__ import annotations

import torch


class TinyAttention(torch.nn.Module):
    """Two heads of decomposed attention: q·kᵀ / √8 → softmax → ·v, hidden 16."""

    def __init__(self):
        super().__init__()
        self.qkv = torch.nn.Linear(16, 48)

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, 2, 8).permute(2, 0, 3, 1, 4)
        p = (q @ k.transpose(-2, -1) / 8 ** 0.5).softmax(-1)
        return (p @ v).transpose(1, 2).reshape(b, n, 16)


class SdpaAttention(torch.nn.Module):
    """`heads` heads of fused attention (scaled_dot_product_attention), hidden heads·head_dim;
    `dropout` applies in training mode only, `causal` is is_causal."""

    def __init__(self, heads: int = 2, head_dim: int = 8, causal: bool = False, dropout: float = 0.0):
        super().__init__()
        self.heads, self.head_dim, self.causal, self.dropout = heads, head_dim, causal, dropout
        self.qkv = torch.nn.Linear(heads * head_dim, 3 * heads * head_dim)

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        o = torch.nn.functional.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=self.causal)
        return o.transpose(1, 2).reshape(b, n, self.heads * self.head_dim)


class NoAttention(torch.nn.Module):
    """A softmax over features, not attention: zero sites."""

    def __init__(self, out: int = 16):
        super().__init__()
        self.fc = torch.nn.Linear(16, out)

    def forward(self, x):
        return self.fc(x).softmax(-1)


def save_tiny(folder, seq: int):
    """A saved .pt2 of TinyAttention (seed 0) on inputs of shape (2, seq, 16)."""
    torch.manual_seed(0)
    path = folder / "tiny.pt2"
    torch.export.save(torch.export.export(TinyAttention().eval(), (torch.randn(2, seq, 16),)), path)
    return path
