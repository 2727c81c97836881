"""Split a full tensor into tensor-parallel shards and join them back (also used by checkpoint resharding).

``stride`` > 1 handles fused weights: the dimension is made of ``stride`` equal blocks (e.g. ``[Q; K; V]``)
and rank ``r`` holds its slice of every block, concatenated (``[Q_r; K_r; V_r]``).
"""

from __future__ import annotations

import torch


def shard(full: torch.Tensor, dim: int, rank: int, size: int, stride: int = 1) -> torch.Tensor:
    """The part of ``full`` that tensor-parallel ``rank`` of ``size`` holds (``full`` itself when size is 1)."""
    if size == 1:
        return full
    n = full.shape[dim]
    if n % (size * stride):
        raise ValueError(f"dimension {dim} of size {n} does not split into {size} ranks x {stride} blocks")
    blocks = torch.chunk(full, stride, dim=dim)
    return torch.cat([torch.chunk(b, size, dim=dim)[rank] for b in blocks], dim=dim).contiguous()


def unshard(shards: list[torch.Tensor], dim: int, stride: int = 1) -> torch.Tensor:
    """Inverse of :func:`shard`: the full tensor from every rank's shard, in rank order."""
    if len(shards) == 1:
        return shards[0]
    per_rank = [torch.chunk(s, stride, dim=dim) for s in shards]
    return torch.cat([per_rank[r][b] for b in range(stride) for r in range(len(shards))], dim=dim)
