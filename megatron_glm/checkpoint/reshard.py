"""Tensor-level resharding: merge tensor-parallel shards into a full tensor and split it again.

Every GLM tensor is addressed by its original name; :func:`megatron_glm.model.glm_partition` says along
which dimension (and with which stride, ``[q_r; k_r; v_r]`` for the fused QKV) it is split over
tensor-parallel ranks. The vocabulary (rows of ``word_embeddings.weight``) can be re-padded on the way.
"""

from __future__ import annotations

import torch

from megatron_glm.errors import CheckpointError
from megatron_glm.model.state_dict import glm_partition
from megatron_glm.parallel.sharding import shard, unshard

VOCAB_TENSOR = "word_embeddings.weight"


def merge_shards(name: str, shards: list[torch.Tensor]) -> torch.Tensor:
    """The full tensor ``name`` from its tensor-parallel shards (rank order).

    Replicated tensors are taken from rank 0 after checking that every rank holds the same shape.
    """
    if not shards:
        raise CheckpointError(f"{name}: no shards")
    spec = glm_partition(name)
    if spec is None or len(shards) == 1:
        first = shards[0]
        for r, s in enumerate(shards[1:], 1):
            if s.shape != first.shape:
                raise CheckpointError(f"{name}: replicated tensor has shape {list(s.shape)} on tensor-parallel rank "
                                      f"{r} but {list(first.shape)} on rank 0")
        return first
    dim, stride = spec
    for r, s in enumerate(shards):
        if s.shape != shards[0].shape:
            raise CheckpointError(f"{name}: shard of tensor-parallel rank {r} has shape {list(s.shape)}, rank 0 has "
                                  f"{list(shards[0].shape)}")
        if s.shape[dim] % stride:
            raise CheckpointError(f"{name}: shard dimension {dim} ({s.shape[dim]}) is not a multiple of {stride}")
    return unshard(list(shards), dim, stride)


def split_full(name: str, full: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    """Tensor-parallel ``rank``'s part of the full tensor ``name`` (``size`` ranks); a view when possible."""
    spec = glm_partition(name)
    if spec is None or size == 1:
        return full
    dim, stride = spec
    if full.shape[dim] % (size * stride):
        raise CheckpointError(f"{name}: dimension {dim} of size {full.shape[dim]} does not split into {size} "
                              f"tensor-parallel ranks" + (f" x {stride} (q, k, v) blocks" if stride > 1 else ""))
    if stride == 1:
        return torch.chunk(full, size, dim=dim)[rank]
    return shard(full, dim, rank, size, stride)


def shard_shape(name: str, shape: tuple[int, ...] | torch.Size, size: int) -> tuple[int, ...]:
    """The shape of one tensor-parallel shard of a full tensor of ``shape``."""
    spec = glm_partition(name)
    out = list(shape)
    if spec is not None and size > 1:
        out[spec[0]] //= size
    return tuple(out)


def resize_vocab(name: str, full: torch.Tensor, rows: int) -> torch.Tensor:
    """``full`` with the vocabulary padded (zero rows) or cut to ``rows`` rows; other tensors unchanged.

    New padding rows are zeros (their logits are 0; no tokenizer id reaches them).
    """
    if name != VOCAB_TENSOR or full.shape[0] == rows:
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
