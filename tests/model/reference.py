"""An independent, plain single-process GLM forward (the original GLM maths, no package code).

Reads the full state dict by the original GLM names; builds the GLM mask the way the original did
(lower triangle, then all columns before ``sep`` set); applies it as ``scores * m - 10000 * (1 - m)``;
tanh-GeLU written out as in the original ``gelu_impl``.
"""

from __future__ import annotations

import math

import torch


def reference_mask(sep: torch.Tensor, seq: int) -> torch.Tensor:
    """Float ``[b, 1, s, s]`` GLM mask, 1 = may attend."""
    masks = []
    for n in sep.tolist():
        m = torch.tril(torch.ones(seq, seq))
        m[:, :n] = 1.0
        masks.append(m)
    return torch.stack(masks).unsqueeze(1)


def _layer_norm(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, eps: float) -> torch.Tensor:
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * w + b


def _gelu(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.tanh(0.7978845608028654 * x * (1.0 + 0.044715 * x * x)))


def reference_logits(
    sd: dict[str, torch.Tensor],
    num_layers: int,
    num_heads: int,
    input_ids: torch.Tensor,
    position_ids: torch.Tensor,
    mask: torch.Tensor,
    eps: float = 1e-5,
) -> torch.Tensor:
    """Full-vocab logits ``[b, s, V]`` in fp64 from a full fp32 state dict and a ``[b, 1, s, s]`` 0/1 mask."""
    sd = {k: v.double() for k, v in sd.items()}
    mask = mask.double()
    b, s = input_ids.shape
    hidden = sd["word_embeddings.weight"].shape[1]
    d = hidden // num_heads
    h = (
        sd["word_embeddings.weight"][input_ids]
        + sd["transformer.position_embeddings.weight"][position_ids[:, 0]]
        + sd["transformer.block_position_embeddings.weight"][position_ids[:, 1]]
    )
    for i in range(num_layers):
        p = f"transformer.layers.{i}."
        x = _layer_norm(h, sd[p + "input_layernorm.weight"], sd[p + "input_layernorm.bias"], eps)
        qkv = x @ sd[p + "attention.query_key_value.weight"].T + sd[p + "attention.query_key_value.bias"]
        q, k, v = (t.reshape(b, s, num_heads, d).permute(0, 2, 1, 3) for t in qkv.split(hidden, dim=-1))
        scores = q @ k.transpose(-1, -2) / math.sqrt(d)
        scores = scores * mask - 10000.0 * (1.0 - mask)
        ctx = (torch.softmax(scores, dim=-1) @ v).permute(0, 2, 1, 3).reshape(b, s, hidden)
        h = h + ctx @ sd[p + "attention.dense.weight"].T + sd[p + "attention.dense.bias"]
        x = _layer_norm(h, sd[p + "post_attention_layernorm.weight"], sd[p + "post_attention_layernorm.bias"], eps)
        x = _gelu(x @ sd[p + "mlp.dense_h_to_4h.weight"].T + sd[p + "mlp.dense_h_to_4h.bias"])
        h = h + x @ sd[p + "mlp.dense_4h_to_h.weight"].T + sd[p + "mlp.dense_4h_to_h.bias"]
    h = _layer_norm(h, sd["transformer.final_layernorm.weight"], sd["transformer.final_layernorm.bias"], eps)
    return h @ sd["word_embeddings.weight"].T
