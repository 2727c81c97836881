"""LoRA on a GLM model: attach adapters to the configured linears, freeze the base, merge adapters into weights.

Adapters (:class:`~megatron_glm.parallel.lora.LoRAAdapter`) go on the linears named by ``lora.targets`` in every
transformer layer the model (or pipeline stage) holds; their tensors are ``<linear>.lora.A`` and
``<linear>.lora.B`` (e.g. ``transformer.layers.0.attention.query_key_value.lora.A``), split over tensor-parallel
ranks as the weight dictates (:func:`adapter_spec`). Everything else is frozen (``requires_grad`` False), so only
the adapters reach the optimizer. :func:`merge_lora` folds full adapters into full weights,
``W + (alpha / r) B A``, which gives a normal model in any layout or format.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from torch import nn

from megatron_glm.config import LoraConfig
from megatron_glm.errors import CheckpointError
from megatron_glm.model.expert_lora import ExpertLoRAAdapter
from megatron_glm.model.layout import ModelLayout, original_name
from megatron_glm.model.moe import GroupedExperts
from megatron_glm.parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron_glm.parallel.lora import LoRAAdapter, is_lora_name, seed_for

_LAYER_LINEAR = re.compile(r"^transformer\.layers\.\d+\.(.+)$")


def _target(name: str, lora: LoraConfig) -> bool:
    m = _LAYER_LINEAR.match(name)
    return m is not None and lora.adapts(m.group(1))


def attach_lora(model: nn.Module, lora: LoraConfig, layout: ModelLayout, seed: int) -> list[str]:
    """Give every targeted linear of ``model`` an adapter (the routed experts of an MoE layer: one per expert,
    :mod:`megatron_glm.model.expert_lora`) and freeze every other parameter; returns the adapted linears' original
    names. Nothing happens when ``lora.rank`` is 0."""
    if lora.rank <= 0:
        return []
    adapted: list[str] = []
    for local, module in list(model.named_modules()):
        if isinstance(module, GroupedExperts):
            adapted += _attach_experts(module, original_name(local), lora, layout, seed)
            continue
        if not isinstance(module, (ColumnParallelLinear, RowParallelLinear)):
            continue
        name = original_name(local)
        if not _target(name, lora):
            continue
        spec = layout[f"{name}.weight"]
        module.lora = LoRAAdapter(
            spec.shape[1],
            spec.shape[0],
            rank=lora.rank,
            alpha=lora.alpha,
            dropout=lora.dropout,
            row_parallel=isinstance(module, RowParallelLinear),
            stride=spec.partition[1] if spec.split_dim == 0 else 1,
            seed=seed_for(seed, name),
            parallel_state=module.ps,
            dtype=module.weight.dtype,
            device=module.weight.device,
        )
        adapted.append(name)
    for local, p in model.named_parameters():
        p.requires_grad_(is_lora_name(local))
    return adapted


def _attach_experts(experts: GroupedExperts, name: str, lora: LoraConfig, layout: ModelLayout, seed: int) -> list[str]:
    """Per-expert adapters on the targeted expert weights of ``experts`` (original name ``name``)."""
    adapted = []
    for part in ("dense_h_to_4h", "dense_4h_to_h"):
        linear, module = f"{name}.{part}", getattr(experts, part)
        if not _target(linear, lora):
            continue
        module.lora = ExpertLoRAAdapter(
            layout[f"{linear}.weight"],
            rank=lora.rank,
            alpha=lora.alpha,
            dropout=lora.dropout,
            seed=seed_for(seed, linear),
            parallel_state=experts.ps,
            dtype=module.weight.dtype,
            device=module.weight.device,
        )
        adapted.append(linear)
    return adapted


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts of this rank's model (ZeRO-3: the full sizes)."""
    trainable = total = 0
    for p in model.parameters():
        n = getattr(p, "ds_numel", p.numel())
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total


def merge_lora(state_dict: Mapping[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """A full state dict without adapters: each adapted ``W`` becomes ``W + (alpha / r) B A`` (per expert for an
    expert weight ``[E, out, in]``; computed in fp32, stored in ``W``'s dtype); every other tensor is kept.
    ``alpha`` is the run's ``lora.alpha``."""
    out = {k: v for k, v in state_dict.items() if not is_lora_name(k)}
    for key in state_dict:
        if not key.endswith(".lora.A"):
            continue
        linear = key[: -len(".lora.A")]
        a, b = state_dict[key], state_dict.get(f"{linear}.lora.B")
        weight = out.get(f"{linear}.weight")
        if b is None or weight is None:
            raise CheckpointError(f"{linear}: an adapter needs lora.A, lora.B and the base weight")
        rank = a.shape[-2]  # A [r, in], or [E, r, in] per expert (batched below)
        delta = (alpha / rank) * (b.float() @ a.float())
        if delta.shape != weight.shape:
            raise CheckpointError(f"{linear}: adapter B A {list(delta.shape)} does not fit weight {list(weight.shape)}")
        out[f"{linear}.weight"] = (weight.float() + delta).to(weight.dtype)
    return out
