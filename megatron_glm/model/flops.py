"""Model FLOPs per token, counted from the layout's tensor specs (the MFU numerator).

A token multiplies every 2-D weight of a matmul once in the forward (2 FLOPs per weight): the layers' projections,
whatever the architecture packs into them (grouped-query QKV, a GLU's two halves), and the head (the untied output
layer, or the word embedding when the head is tied). Embedding lookups (the word embedding as an input, the position
tables) are gathers, not matmuls; biases and norms are element-wise: none of them is counted. Attention adds
``4 s nh hd`` per layer (scores and context over ``s`` keys, dense). GLM-4.5's MTP layers (``num_nextn_predict_layers
= D``, :mod:`megatron_glm.model.mtp`) are in the layout, so their ``eh_proj`` and decoder layer are among the weights;
each also adds its layer's attention and one more pass of the shared head (``D + 1`` head matmuls per token in all).
Training (forward + backward) is three times the forward; recomputation is not counted (model FLOPs, not hardware
FLOPs).
"""

from __future__ import annotations

import dataclasses
import math

from megatron_glm.config import ModelConfig
from megatron_glm.model.layout import OUTPUT_TENSOR, VOCAB_TENSOR, ModelLayout


def matmul_parameters(layout: ModelLayout) -> int:
    """The weights each token multiplies in a forward: every 2-D ``weight`` tensor of the layout, the ``moe_top_k``
    of ``experts`` of each expert tensor (the active ones), plus the word embedding when it is also the (tied)
    head. The head is counted once (:func:`flops_per_token` adds the MTP layers' passes of it)."""
    top_k = layout.config.moe_top_k
    total = sum(
        math.prod(spec.shape) if spec.expert_dim is None else math.prod(spec.shape) // spec.experts * top_k
        for spec in layout
        if spec.role == "weight" and len(spec.shape) == 2 + (spec.expert_dim is not None)
    )
    if layout.tied_head:
        total += math.prod(layout[VOCAB_TENSOR].shape)
    return total


def head_parameters(layout: ModelLayout) -> int:
    """The head's weights: the word embedding when tied, else ``output_layer.weight``."""
    return math.prod(layout[VOCAB_TENSOR if layout.tied_head else OUTPUT_TENSOR].shape)


def flops_per_token(
    config: ModelConfig, seq_length: int, *, training: bool = True, num_layers: int | None = None
) -> float:
    """Model FLOPs per token at ``seq_length``: ``2 x`` :func:`matmul_parameters` ``+ 4 s nh hd`` per layer
    forward, plus per MTP layer its attention and ``2 x`` :func:`head_parameters`; three times that for training.
    ``num_layers``: count that many layers (of the stack) instead of the config's; the MTP layers are still
    counted."""
    layers = config.num_layers if num_layers is None else num_layers
    layout = ModelLayout(config if layers == config.num_layers else dataclasses.replace(config, num_layers=layers))
    mtp = config.num_nextn_predict_layers
    attention = 4 * seq_length * config.num_attention_heads * config.head_dim
    forward = 2 * (matmul_parameters(layout) + mtp * head_parameters(layout)) + (layers + mtp) * attention
    return 3.0 * forward if training else float(forward)
