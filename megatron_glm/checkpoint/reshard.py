"""Tensor-level resharding: merge tensor-parallel shards into a full tensor and split it again.

Every GLM tensor is described by its :class:`~megatron_glm.model.layout.TensorSpec` (the model layout): along
which dimension, and in how many packed blocks (``[q_r; k_r; v_r]`` for the fused QKV), it is split over
tensor-parallel ranks. The vocabulary (rows of ``word_embeddings.weight`` and of an untied ``output_layer.weight``)
can be re-padded on the way.
"""

from __future__ import annotations

import torch

from megatron_glm.errors import CheckpointError
from megatron_glm.model.layout import OUTPUT_TENSOR, VOCAB_TENSOR, TensorSpec
from megatron_glm.parallel.sharding import shard, unshard


def merge_shards(spec: TensorSpec, shards: list[torch.Tensor]) -> torch.Tensor:
    """The full tensor ``spec`` from its tensor-parallel shards (rank order).

    Replicated tensors are taken from rank 0 after checking that every rank holds the same shape.
    """
    name, part = spec.name, spec.partition
    if not shards:
        raise CheckpointError(f"{name}: no shards")
    if part is None or len(shards) == 1:
        first = shards[0]
        for r, s in enumerate(shards[1:], 1):
            if s.shape != first.shape:
                raise CheckpointError(
                    f"{name}: replicated tensor has shape {list(s.shape)} on tensor-parallel rank "
                    f"{r} but {list(first.shape)} on rank 0"
                )
        return first
    dim, stride = part
    for r, s in enumerate(shards):
        if s.shape != shards[0].shape:
            raise CheckpointError(
                f"{name}: shard of tensor-parallel rank {r} has shape {list(s.shape)}, rank 0 has "
                f"{list(shards[0].shape)}"
            )
        if isinstance(stride, int) and s.shape[dim] % stride:
            raise CheckpointError(f"{name}: shard dimension {dim} ({s.shape[dim]}) is not a multiple of {stride}")
        if not isinstance(stride, int) and (
            any(b % len(shards) for b in stride) or s.shape[dim] * len(shards) != sum(stride)
        ):
            raise CheckpointError(
                f"{name}: shard dimension {dim} ({s.shape[dim]}) x {len(shards)} ranks does not hold the packed "
                f"blocks {list(stride)}"
            )
    return unshard(list(shards), dim, stride)


def split_full(spec: TensorSpec, full: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    """Tensor-parallel ``rank``'s part of the full tensor ``spec`` (``size`` ranks); a view when possible."""
    name, part = spec.name, spec.partition
    if part is None or size == 1:
        return full
    dim, stride = part
    if isinstance(stride, int) and full.shape[dim] % (size * stride):
        raise CheckpointError(
            f"{name}: dimension {dim} of size {full.shape[dim]} does not split into {size} "
            f"tensor-parallel ranks" + (f" x {stride} packed blocks" if stride > 1 else "")
        )
    if not isinstance(stride, int) and (sum(stride) != full.shape[dim] or any(b % size for b in stride)):
        raise CheckpointError(
            f"{name}: dimension {dim} of size {full.shape[dim]} does not split into {size} tensor-parallel "
            f"ranks x packed blocks {list(stride)}"
        )
    if stride == 1:
        return torch.chunk(full, size, dim=dim)[rank]
    return shard(full, dim, rank, size, stride)


def resize_vocab(name: str, full: torch.Tensor, rows: int) -> torch.Tensor:
    """``full`` with the vocabulary padded (zero rows) or cut to ``rows`` rows; other tensors unchanged.

    New padding rows are zeros (their logits are 0; no tokenizer id reaches them).
    """
    if name not in (VOCAB_TENSOR, OUTPUT_TENSOR) or full.shape[0] == rows:
        return full
    if rows < full.shape[0]:
        return full[:rows]
    pad = torch.zeros((rows - full.shape[0], *full.shape[1:]), dtype=full.dtype, device=full.device)
    return torch.cat([full, pad], dim=0)


def check_divisible(what: str, value: int, size: int, hint: str = "") -> None:
    """One-line error when ``value`` does not divide by a parallel ``size``."""
    if size <= 0:
        raise CheckpointError(f"{what}: parallel size must be positive, got {size}")
    if value % size:
        raise CheckpointError(f"{what} ({value}) is not divisible by {size}" + (f"; {hint}" if hint else ""))
