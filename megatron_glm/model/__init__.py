"""The GLM model: its tensor layout, embeddings, layers, attention mask, tied head, loss, full state dicts."""

from megatron_glm.model.attention import ATTENTION_IMPLS, ParallelSelfAttention, attention_core, eager_attention
from megatron_glm.model.context import ForwardContext
from megatron_glm.model.flops import flops_per_token, matmul_parameters
from megatron_glm.model.glm import GLMModel, init_method_for, new_rng_tracker
from megatron_glm.model.layout import ModelLayout, PipeLayer, TensorSpec
from megatron_glm.model.loss import (
    GLMLoss,
    add_group_sums,
    compiled_glm_loss,
    glm_loss,
    glm_loss_at,
    glm_loss_fused,
    loss_positions,
)
from megatron_glm.model.masks import (
    AttentionMask,
    batch_attention_mask,
    glm_document_mask_mod,
    glm_mask_mod,
    prepare_attention_mask,
    sep_to_mask,
)
from megatron_glm.model.mlp import ParallelMLP
from megatron_glm.model.objective import LanguageModelLoss, LossBatch, LossFunction, ModelOutput
from megatron_glm.model.part import GLMPart
from megatron_glm.model.state_dict import full_state_dict, load_full_state_dict
from megatron_glm.model.transformer import GLMLayer, GLMTransformer

__all__ = [
    "ATTENTION_IMPLS",
    "AttentionMask",
    "ForwardContext",
    "GLMLayer",
    "GLMLoss",
    "GLMModel",
    "GLMPart",
    "GLMTransformer",
    "LanguageModelLoss",
    "LossBatch",
    "LossFunction",
    "ModelLayout",
    "ModelOutput",
    "ParallelMLP",
    "ParallelSelfAttention",
    "PipeLayer",
    "TensorSpec",
    "add_group_sums",
    "attention_core",
    "batch_attention_mask",
    "compiled_glm_loss",
    "eager_attention",
    "flops_per_token",
    "full_state_dict",
    "glm_document_mask_mod",
    "glm_loss",
    "glm_loss_at",
    "glm_loss_fused",
    "glm_mask_mod",
    "init_method_for",
    "load_full_state_dict",
    "loss_positions",
    "matmul_parameters",
    "new_rng_tracker",
    "prepare_attention_mask",
    "sep_to_mask",
]
