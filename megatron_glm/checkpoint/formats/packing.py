"""Tensor packings of the released GLM-family layouts, converted to and from ours.

Our fused QKV is ``[Q; K; V]`` over the rows (``megatron_glm.model.layout``). HF ChatGLM-6B and SAT GLM-130B pack
it per head, ``[q_0; k_0; v_0; q_1; ...]`` (``[nh, 3, hd, ...]``); the conversion is a view and a transpose, the
same for weights ``[3 nh hd, H]`` and biases ``[3 nh hd]``. Also: the check that a model's architecture is the one
a released layout holds, and the rotary ``inv_freq`` buffers the releases store.
"""

from __future__ import annotations

from typing import Any

import torch

from megatron_glm.config import ModelConfig
from megatron_glm.errors import CheckpointError


def per_head_to_ours(t: torch.Tensor, heads: int, name: str = "query_key_value") -> torch.Tensor:
    """``[q_0; k_0; v_0; q_1; ...]`` -> ``[Q; K; V]`` (``heads`` heads; weight or bias)."""
    if t.shape[0] % (3 * heads):
        raise CheckpointError(f"{name}: {t.shape[0]} rows do not pack {heads} heads x (q, k, v)")
    return t.reshape(heads, 3, -1, *t.shape[1:]).transpose(0, 1).reshape(t.shape).contiguous()


def ours_to_per_head(t: torch.Tensor, heads: int, name: str = "query_key_value") -> torch.Tensor:
    """``[Q; K; V]`` -> ``[q_0; k_0; v_0; q_1; ...]`` (``heads`` heads; weight or bias)."""
    if t.shape[0] % (3 * heads):
        raise CheckpointError(f"{name}: {t.shape[0]} rows do not pack {heads} heads x (q, k, v)")
    return t.reshape(3, heads, -1, *t.shape[1:]).transpose(0, 1).reshape(t.shape).contiguous()


def architecture_mismatch(config: ModelConfig, wanted: dict[str, Any]) -> str | None:
    """The first ``ModelConfig`` field (or property) whose value is not the one ``wanted`` (a tuple: one of those),
    as ``"field = value (this layout: wanted)"``; ``None`` when the model has the architecture the layout holds."""
    for key, value in wanted.items():
        have = getattr(config, key)
        if have not in (value if isinstance(value, tuple) else (value,)):
            return f"{key} = {have!r} (this layout: {value!r})"
    return None


def rotary_inv_freq(dim: int, base: float, *, compute: torch.dtype, rounded: torch.dtype | None = None) -> torch.Tensor:
    """``1 / base^(2i / dim)`` for ``i < dim / 2``, computed in ``compute`` (``arange`` cast first, as the releases
    do) and, with ``rounded``, rounded through that dtype (HF ChatGLM-6B rounds to fp16)."""
    inv = 1.0 / (base ** (torch.arange(0, dim, 2).to(compute) / dim))
    return inv.to(rounded) if rounded is not None else inv


def multi_head_mismatch(config: ModelConfig) -> str | None:
    """Why ``config`` is not plain multi-head attention with head size ``hidden / heads`` (``None`` when it is)."""
    if config.query_groups != config.num_attention_heads:
        return f"num_query_groups = {config.num_query_groups} (this layout: multi-head)"
    if config.head_dim * config.num_attention_heads != config.hidden_size:
        return f"kv_channels = {config.kv_channels} (this layout: hidden_size / num_attention_heads)"
    return None
