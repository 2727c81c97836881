"""Expert-parallel weights in our training checkpoints: one file per (pipeline stage, tensor rank, expert rank).

DeepSpeed writes the model-states file from data-parallel rank 0 only, so with expert parallelism it holds
expert-parallel rank 0's experts alone (its own per-expert files assume DeepSpeed's ``MoE`` module layout; our
marker declares none: :mod:`megatron_glm.training.expert_parallel`). The first expert-data-parallel rank of
every expert shard writes ``experts/pp{P}_tp{T}_ep{E}.pt`` (this rank's expert tensors by module name), and
loading puts each rank's shard back after DeepSpeed's load. The expert parameters carry their coordinates
(``expert_shard``, set when they are marked).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from megatron_glm.checkpoint.manifest import Digest, save_hashed
from megatron_glm.checkpoint.safe_load import safe_torch_load
from megatron_glm.errors import CheckpointError
from megatron_glm.model.tensor_spec import TensorSpec

EXPERT_DIR = "experts"


def expert_parameters(module: torch.nn.Module | None) -> dict[str, torch.nn.Parameter]:
    """The trained parameters marked as expert-parallel shards (``allreduce`` False, with ``expert_shard``); a LoRA
    run's frozen base experts are not (its checkpoints hold the adapters; the base is loaded at every start)."""
    if module is None:
        return {}
    return {
        n: p
        for n, p in module.named_parameters()
        if getattr(p, "allreduce", True) is False and hasattr(p, "expert_shard") and p.requires_grad
    }


def expert_file(shard: tuple[int, int, int, int]) -> str:
    """The file (relative to the step directory) of the shard ``(pp, tp, ep, edp)`` ranks hold."""
    pp, tp, ep, _ = shard
    return f"{EXPERT_DIR}/pp{pp:02d}_tp{tp:02d}_ep{ep:02d}.pt"


def expert_slice(spec: TensorSpec, value: torch.Tensor, ep_rank: int, ep: int) -> torch.Tensor:
    """Expert-parallel rank ``ep_rank``'s experts of ``value`` (one rank's tensor-parallel shard)."""
    if value.shape[spec.expert_dim] % ep:
        raise CheckpointError(f"{spec.name}: {value.shape[spec.expert_dim]} experts do not split over ep={ep}")
    return value.chunk(ep, dim=spec.expert_dim)[ep_rank]


def save_expert_shards(module: torch.nn.Module | None, step_dir: Path) -> dict[str, Digest]:
    """Write this rank's expert shard when it is the shard's first expert-data-parallel rank; return the
    written file's digest by relative name (``{}`` when nothing was written)."""
    params = expert_parameters(module)
    if not params:
        return {}
    shard = next(iter(params.values())).expert_shard
    if shard[3] != 0:
        return {}
    rel = expert_file(shard)
    final = step_dir / rel
    final.parent.mkdir(parents=True, exist_ok=True)
    part = final.with_name(f".{final.name}.part")
    digest = save_hashed({n: p.detach().cpu() for n, p in params.items()}, part)
    os.replace(part, final)
    return {rel: digest}


def load_expert_shards(module: torch.nn.Module | None, step_dir: Path) -> int:
    """Put this rank's expert shard from ``step_dir`` into ``module``; the number of tensors restored."""
    params = expert_parameters(module)
    if not params:
        return 0
    path = step_dir / expert_file(next(iter(params.values())).expert_shard)
    if not path.is_file():
        raise CheckpointError(f"{step_dir}: no expert shard {path.name} (saved without expert parallelism?)")
    saved: dict[str, Any] = safe_torch_load(path)
    for name, p in params.items():
        if name not in saved or tuple(saved[name].shape) != tuple(p.shape):
            got = list(saved[name].shape) if name in saved else "absent"
            raise CheckpointError(f"{path}: expert tensor {name} is {got}, this rank holds {list(p.shape)}")
        with torch.no_grad():
            p.copy_(saved[name])
    return len(params)
