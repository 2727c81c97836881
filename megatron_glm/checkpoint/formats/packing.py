"""Tensor packings of the released GLM-family layouts, converted to and from ours.

Our fused QKV is ``[Q; K; V]`` over the rows (``megatron_glm.model.layout``). HF ChatGLM-6B and SAT GLM-130B pack
it per head, ``[q_0; k_0; v_0; q_1; ...]`` (``[nh, 3, hd, ...]``); the conversion is a view and a transpose, the
same for weights ``[3 nh hd, H]`` and biases ``[3 nh hd]``. Also: the rotary ``inv_freq`` buffers the releases
store, and the precision options every release's code may run either way.
"""

from __future__ import annotations

from types import MappingProxyType

import torch

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


def rotary_inv_freq(dim: int, base: float, *, compute: torch.dtype, rounded: torch.dtype | None = None) -> torch.Tensor:
    """``1 / base^(2i / dim)`` for ``i < dim / 2``, computed in ``compute`` (``arange`` cast first, as the releases
    do) and, with ``rounded``, rounded through that dtype (HF ChatGLM-6B rounds to fp16)."""
    inv = 1.0 / (base ** (torch.arange(0, dim, 2).to(compute) / dim))
    return inv.to(rounded) if rounded is not None else inv


#: Options that change rounding only under bf16/fp16 (the same function in exact arithmetic): a released layout
#: holds a model with either value (its own code picks; the family value is the release's).
PRECISION_ONLY = MappingProxyType(
    {"apply_query_key_layer_scaling": (True, False), "attention_softmax_in_fp32": (True, False)}
)
