"""Model FLOPs per token, counted from the layout's tensor specs (the MFU numerator).

A token multiplies every 2-D weight of a matmul once in the forward (2 FLOPs per weight): the layers' projections,
whatever the architecture packs into them (grouped-query QKV, a GLU's two halves), and the head (the untied output
layer, or the word embedding when the head is tied). Embedding lookups (the word embedding as an input, the position
tables) are gathers, not matmuls; biases and norms are element-wise: none of them is counted. Attention adds
``4 s nh hd`` per layer (scores and context over ``s`` keys, dense). Training (forward + backward) is three times
the forward; recomputation is not counted (model FLOPs, not hardware FLOPs).
"""

from __future__ import annotations

import dataclasses
import math

from megatron_glm.config import ModelConfig
from megatron_glm.model.layout import VOCAB_TENSOR, ModelLayout


def matmul_parameters(layout: ModelLayout) -> int:
    """The weights each token multiplies in a forward: every 2-D ``weight`` tensor of the layout, the ``moe_top_k``
    of ``experts`` of each expert tensor (the active ones), plus the word embedding when it is also the (tied)
    head."""
    top_k = layout.config.moe_top_k
    total = sum(
        math.prod(spec.shape) if spec.expert_dim is None else math.prod(spec.shape) // spec.experts * top_k
        for spec in layout
        if spec.role == "weight" and len(spec.shape) == 2 + (spec.expert_dim is not None)
    )
    if layout.tied_head:
        total += math.prod(layout[VOCAB_TENSOR].shape)
    return total


def flops_per_token(
    config: ModelConfig, seq_length: int, *, training: bool = True, num_layers: int | None = None
) -> float:
    """Model FLOPs per token at ``seq_length``: ``2 x`` :func:`matmul_parameters` ``+ 4 s nh hd`` per layer
    forward, three times that for training. ``num_layers``: count that many layers instead of the config's."""
    layers = config.num_layers if num_layers is None else num_layers
    layout = ModelLayout(config if layers == config.num_layers else dataclasses.replace(config, num_layers=layers))
    attention = 4 * seq_length * config.num_attention_heads * config.head_dim
    forward = 2 * matmul_parameters(layout) + layers * attention
    return 3.0 * forward if training else float(forward)
