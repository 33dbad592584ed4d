"""Transformers written so torch.fx traces them: attention as two explicit (dynamic) matrix products.

``pythia_70m_shaped`` has GPT-NeoX's shapes (Pythia-70M: d=512, 6 layers, 8 heads, MLP 2048, vocab 50304,
parallel attention + MLP residual) for cost studies; weights are random (no download). As in H3PIMAP
Table III it exposes 24 linear layers (fused QKV, attention output, MLP up, MLP down per block) and 12
dynamic matmuls; the embedding lookup and the LM head are not mapped (the model returns the final hidden
states). Rotary position embedding is left out: it has no MACs on a matrix unit.

``DigitsTransformer`` classifies 8x8 digits, each image row a token (8 tokens of 8 pixels).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from hetcomp.errors import ConfigError


@torch.fx.wrap
def causal_mask(scores: torch.Tensor) -> torch.Tensor:
    """-inf above the diagonal (called opaquely by torch.fx: its size depends on the input)."""
    tokens = scores.shape[-1]
    mask = torch.ones(tokens, tokens, dtype=torch.bool, device=scores.device).triu(1)
    return scores.masked_fill(mask, float("-inf"))


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, causal: bool) -> None:
        super().__init__()
        if dim % heads:
            raise ConfigError(f"dim {dim} is not divisible by heads {heads}; choose heads that divide dim")
        self.heads, self.causal = heads, causal
        self.qkv = nn.Linear(dim, 3 * dim)
        self.dense = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        head_dim = dim // self.heads
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.heads, head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        scores = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(head_dim)
        if self.causal:
            scores = causal_mask(scores)
        context = torch.matmul(scores.softmax(dim=-1), v)
        return self.dense(context.transpose(1, 2).reshape(batch, tokens, dim))


class Block(nn.Module):
    """GPT-NeoX block: x + attn(ln1(x)) + mlp(ln2(x)) (parallel residual)."""

    def __init__(self, dim: int, heads: int, mlp: int, causal: bool) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attention = Attention(dim, heads, causal)
        self.fc1, self.fc2 = nn.Linear(dim, mlp), nn.Linear(mlp, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.attention(self.ln1(x)) + self.fc2(torch.nn.functional.gelu(self.fc1(self.ln2(x))))


class DecoderLM(nn.Module):
    """Token ids [batch, tokens] -> final hidden states [batch, tokens, dim]."""

    def __init__(self, vocab: int, dim: int, layers: int, heads: int, mlp: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(Block(dim, heads, mlp, causal=True) for _ in range(layers))
        self.final_ln = nn.LayerNorm(dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x)
        return self.final_ln(x)


def pythia_70m_shaped() -> DecoderLM:
    return DecoderLM(vocab=50304, dim=512, layers=6, heads=8, mlp=2048)


class DigitsTransformer(nn.Module):
    """[batch, 1, 8, 8] digits -> 10 logits; the 8 image rows are the tokens."""

    def __init__(self, dim: int = 32, layers: int = 2, heads: int = 4, mlp: int = 64, classes: int = 10) -> None:
        super().__init__()
        self.embed = nn.Linear(8, dim)
        self.position = nn.Parameter(torch.zeros(1, 8, dim))
        self.blocks = nn.ModuleList(Block(dim, heads, mlp, causal=False) for _ in range(layers))
        self.final_ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x.reshape(x.shape[0], 8, 8)) + self.position
        for block in self.blocks:
            x = block(x)
        return self.head(self.final_ln(x).mean(dim=1))
