"""The original GLM training step, written plainly from the equations (``shared/docs/glm-reference.md`` §1).

The reference the benchmarks measure against: pre-LN layers of plain ``nn.Linear`` / ``nn.LayerNorm``; eager
attention ``softmax(q k^T / sqrt(d) * m - 10000 (1 - m))`` with the ``[b, 1, s, s]`` mask built from ``sep``
and the softmax in fp32; the tied head on **every** token (full-vocabulary logits) and the fp32 cross
entropy masked by ``loss_mask``, mean over masked tokens; ``torch.optim.AdamW`` with its defaults.
Submodules carry the original GLM state-dict names, so ``load_state_dict(GLMModel(...).state_dict())``
gives both models the same weights.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class OriginalAttention(nn.Module):
    def __init__(self, hidden: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.query_key_value, self.dense = nn.Linear(hidden, 3 * hidden), nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor, ltor_mask: torch.Tensor) -> torch.Tensor:
        b, s, h = x.shape
        d = h // self.heads
        q, k, v = self.query_key_value(x).view(b, s, 3, self.heads, d).permute(2, 0, 3, 1, 4)
        scores = torch.matmul(q, k.transpose(-1, -2)).float() / math.sqrt(d)
        scores = scores * ltor_mask - 10000.0 * (1.0 - ltor_mask)
        probs = torch.softmax(scores, dim=-1).to(v.dtype)
        return self.dense(torch.matmul(probs, v).transpose(1, 2).reshape(b, s, h))


class OriginalMLP(nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.dense_h_to_4h, self.dense_4h_to_h = nn.Linear(hidden, 4 * hidden), nn.Linear(4 * hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(F.gelu(self.dense_h_to_4h(x), approximate="tanh"))


class OriginalLayer(nn.Module):
    def __init__(self, hidden: int, heads: int, eps: float) -> None:
        super().__init__()
        self.input_layernorm = nn.LayerNorm(hidden, eps=eps)
        self.attention = OriginalAttention(hidden, heads)
        self.post_attention_layernorm = nn.LayerNorm(hidden, eps=eps)
        self.mlp = OriginalMLP(hidden)

    def forward(self, h: torch.Tensor, ltor_mask: torch.Tensor) -> torch.Tensor:
        h = h + self.attention(self.input_layernorm(h), ltor_mask)
        return h + self.mlp(self.post_attention_layernorm(h))


class OriginalTransformer(nn.Module):
    def __init__(self, layers: int, hidden: int, heads: int, positions: int, eps: float) -> None:
        super().__init__()
        self.position_embeddings = nn.Embedding(positions, hidden)
        self.block_position_embeddings = nn.Embedding(positions, hidden)
        self.layers = nn.ModuleList(OriginalLayer(hidden, heads, eps) for _ in range(layers))
        self.final_layernorm = nn.LayerNorm(hidden, eps=eps)


class OriginalGLM(nn.Module):
    """GLM as the original code computes it (``positions``: rows of each position table, max length + 1)."""

    def __init__(self, layers: int, hidden: int, heads: int, vocab: int, positions: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab, hidden)
        self.transformer = OriginalTransformer(layers, hidden, heads, positions, eps)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, sep: torch.Tensor) -> torch.Tensor:
        """Logits ``[b, s, V]`` on every token."""
        t = self.transformer
        s = input_ids.shape[1]
        i = torch.arange(s, device=input_ids.device)
        visible = (i.view(1, 1, 1, s) < sep.view(-1, 1, 1, 1)) | (i.view(1, 1, 1, s) <= i.view(1, 1, s, 1))
        ltor_mask = visible.float()  # [b, 1, s, s]: 1 = may attend
        h = self.word_embeddings(input_ids)
        h = h + t.position_embeddings(position_ids[:, 0]) + t.block_position_embeddings(position_ids[:, 1])
        for layer in t.layers:
            h = layer(h, ltor_mask)
        return F.linear(t.final_layernorm(h), self.word_embeddings.weight)


def original_loss(logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """fp32 cross entropy on every token, masked by ``loss_mask``, mean over the masked tokens."""
    losses = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), labels.reshape(-1), reduction="none")
    mask = loss_mask.reshape(-1).float()
    return (losses * mask).sum() / mask.sum()
