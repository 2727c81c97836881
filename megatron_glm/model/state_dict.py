"""Full (unsharded) state dicts for tensor-parallel GLM models, with the original GLM key names.

How each tensor is split over tensor-parallel ranks comes from the model's layout
(:class:`~megatron_glm.model.layout.ModelLayout`; LoRA adapters: their parameters' ``lora_partition``).
Expert tensors (``expert_dim``) are also split over expert-parallel ranks: gathered and sliced along that
dimension. Both functions below are collective over the tensor-parallel (and expert-parallel) group.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from megatron_glm.errors import CheckpointError
from megatron_glm.model.layout import ModelLayout
from megatron_glm.parallel import ParallelState, shard, unshard
from megatron_glm.parallel.lora import lora_partitions


def _parallel_state(model: nn.Module, parallel_state: ParallelState | None) -> ParallelState:
    return parallel_state or getattr(model, "parallel_state", None) or ParallelState()


def _partitions(model: nn.Module) -> dict[str, tuple[int, int] | None]:
    layout: ModelLayout = model.layout
    return {**{s.name: s.partition for s in layout}, **lora_partitions(model)}


def _expert_dims(model: nn.Module) -> dict[str, int]:
    """The expert dimension of each expert tensor (split over expert-parallel ranks; the experts' LoRA adapters too)."""
    dims = {s.name: s.expert_dim for s in model.layout if s.expert_dim is not None}
    return {**dims, **{n: p.lora_expert_dim for n, p in model.named_parameters() if hasattr(p, "lora_expert_dim")}}


def _gather_experts(value: torch.Tensor, dim: int, ps: ParallelState) -> torch.Tensor:
    parts = [torch.empty_like(value) for _ in range(ps.ep_size)]
    dist.all_gather(parts, value.contiguous(), group=ps.ep_group)
    return torch.cat(parts, dim=dim)


def full_state_dict(
    model: nn.Module, parallel_state: ParallelState | None = None, *, grads: bool = False
) -> dict[str, torch.Tensor]:
    """This model's (stage's) state dict with every tensor unsharded (detached copies, on its device).

    ``grads=True`` returns the full gradients instead (zeros where a gradient is ``None``).
    Collective: every tensor-parallel rank must call it.
    """
    ps = _parallel_state(model, parallel_state)
    partitions, experts = _partitions(model), _expert_dims(model)
    out: dict[str, torch.Tensor] = {}
    for name, t in model.state_dict(keep_vars=True).items():
        value = t.detach()
        if grads:
            value = t.grad if t.grad is not None else torch.zeros_like(value)
        spec = partitions[name]
        if ps.tp_size > 1 and spec is not None:
            parts = [torch.empty_like(value) for _ in range(ps.tp_size)]
            dist.all_gather(parts, value.contiguous(), group=ps.tp_group)
            value = unshard(parts, *spec)
        if ps.ep_size > 1 and name in experts:
            value = _gather_experts(value, experts[name], ps)
        out[name] = value.detach().clone()
    return out


def load_full_state_dict(
    model: nn.Module,
    state_dict: dict[str, torch.Tensor],
    parallel_state: ParallelState | None = None,
    *,
    strict: bool = True,
    ignore_unexpected: bool = False,
) -> None:
    """Load full (unsharded) tensors into a tensor-parallel model, keeping this rank's shards.

    ``strict``: every key of the model must be present. Unexpected keys are an error unless
    ``ignore_unexpected`` (a pipeline stage loading the whole model's state dict). Shapes are checked.
    """
    ps = _parallel_state(model, parallel_state)
    own = model.state_dict(keep_vars=True)
    partitions, experts = _partitions(model), _expert_dims(model)
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    if strict and missing:
        raise CheckpointError(f"state dict lacks {len(missing)} model tensors, e.g. {missing[:3]}")
    if unexpected and not ignore_unexpected:
        raise CheckpointError(f"state dict has {len(unexpected)} unexpected tensors, e.g. {unexpected[:3]}")
    local: dict[str, torch.Tensor] = {}
    for name, t in own.items():
        if name not in state_dict:
            continue
        full = state_dict[name]
        spec = partitions[name]
        if ps.ep_size > 1 and name in experts and full.shape[experts[name]] % ps.ep_size == 0:
            full = full.chunk(ps.ep_size, dim=experts[name])[ps.ep_rank]
        if ps.tp_size > 1 and spec is not None:
            try:
                full = shard(full, spec[0], ps.tp_rank, ps.tp_size, spec[1])
            except ValueError as exc:
                raise CheckpointError(f"{name}: {exc}") from None
        if tuple(full.shape) != tuple(t.shape):
            raise CheckpointError(
                f"{name}: shape {list(full.shape)} does not fit this rank's "
                f"{list(t.shape)} (tp {ps.tp_rank}/{ps.tp_size}, ep {ps.ep_rank}/{ps.ep_size})"
            )
        local[name] = full
    model.load_state_dict(local, strict=False)
