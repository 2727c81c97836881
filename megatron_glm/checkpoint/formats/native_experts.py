"""The expert shards of an expert-parallel native checkpoint (``experts/pp{P}_tp{T}_ep{E}.pt``, written by the
checkpoint manager: :mod:`megatron_glm.checkpoint.experts`), read as full tensors and written for a target EP.

An expert tensor's full value is, along its ``expert_dim``, the concatenation over expert-parallel ranks of each
rank's tensor-parallel shards merged (as TP's ``split_dim``); the model-states files hold expert rank 0's only.
Pipeline checkpoints with expert parallelism are not read or written here.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from megatron_glm.checkpoint.experts import expert_file
from megatron_glm.checkpoint.reshard import merge_shards
from megatron_glm.checkpoint.safe_load import safe_torch_load
from megatron_glm.errors import CheckpointError
from megatron_glm.model.tensor_spec import TensorSpec


class ExpertShards:
    """The expert files of a step directory saved with ``tp`` x ``ep`` ranks (memory-mapped, cached)."""

    def __init__(self, step: Path, tp: int, ep: int) -> None:
        self.step, self.tp, self.ep = step, tp, ep
        self._files: dict[tuple[int, int], dict[str, Any]] = {}
        missing = [expert_file((0, t, e, 0)) for t in range(tp) for e in range(ep)]
        missing = [m for m in missing if not (step / m).is_file()]
        if missing:
            raise CheckpointError(f"{step}: missing expert shards {', '.join(missing[:4])} (layout tp={tp} ep={ep})")

    def _file(self, t: int, e: int) -> dict[str, Any]:
        if (t, e) not in self._files:
            self._files[(t, e)] = safe_torch_load(self.step / expert_file((0, t, e, 0)), mmap=True)
        return self._files[(t, e)]

    def tensor(self, spec: TensorSpec) -> torch.Tensor:
        parts = []
        for e in range(self.ep):
            shards = [self._file(t, e).get(spec.name) for t in range(self.tp)]
            if any(s is None for s in shards):
                raise CheckpointError(f"{self.step}: expert shard of ep rank {e} has no {spec.name}")
            parts.append(merge_shards(spec, shards))
        return torch.cat(parts, dim=spec.expert_dim)

    def release(self) -> None:
        self._files.clear()


def save_expert_shards(step: Path, shards: dict[tuple[int, int], dict[str, torch.Tensor]]) -> None:
    """Write ``shards[(tp_rank, ep_rank)]`` (name -> tensor) as the manager's expert files (temp name, rename)."""
    for (t, e), tensors in shards.items():
        path = step / expert_file((0, t, e, 0))
        path.parent.mkdir(parents=True, exist_ok=True)
        part = path.with_name(f".{path.name}.part")
        torch.save({n: v.clone() for n, v in tensors.items()}, part)
        os.replace(part, path)
