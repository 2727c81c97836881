"""Split a full tensor into tensor-parallel shards and join them back (also used by checkpoint resharding).

``stride`` describes packed blocks along the split dimension: an int > 1 is that many equal blocks (e.g.
``[Q; K; V]``), a tuple gives the blocks' full sizes (e.g. grouped-query ``(nh hd, g hd, g hd)``). Rank ``r``
holds its slice of every block, concatenated (``[Q_r; K_r; V_r]``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

Stride = int | Sequence[int]


def _block_sizes(n: int, stride: Stride) -> list[int]:
    """Full sizes of the packed blocks of a dimension of size ``n``."""
    if isinstance(stride, int):
        if n % stride:
            raise ValueError(f"dimension of size {n} does not split into {stride} equal blocks")
        return [n // stride] * stride
    sizes = [int(x) for x in stride]
    if sum(sizes) != n:
        raise ValueError(f"dimension of size {n} is not made of blocks {sizes}")
    return sizes


def shard(full: torch.Tensor, dim: int, rank: int, size: int, stride: Stride = 1) -> torch.Tensor:
    """The part of ``full`` that tensor-parallel ``rank`` of ``size`` holds (``full`` itself when size is 1)."""
    if size == 1:
        return full
    n = full.shape[dim]
    if isinstance(stride, int):
        if n % (size * stride):
            raise ValueError(f"dimension {dim} of size {n} does not split into {size} ranks x {stride} blocks")
        blocks = torch.chunk(full, stride, dim=dim)
    else:
        sizes = _block_sizes(n, stride)
        if any(b % size for b in sizes):
            raise ValueError(f"dimension {dim}: packed blocks {sizes} do not split into {size} ranks")
        blocks = torch.split(full, sizes, dim=dim)
    return torch.cat([torch.chunk(b, size, dim=dim)[rank] for b in blocks], dim=dim).contiguous()


def unshard(shards: list[torch.Tensor], dim: int, stride: Stride = 1) -> torch.Tensor:
    """Inverse of :func:`shard`: the full tensor from every rank's shard, in rank order."""
    if len(shards) == 1:
        return shards[0]
    if isinstance(stride, int):
        per_rank = [torch.chunk(s, stride, dim=dim) for s in shards]
        count = stride
    else:
        local = [b // len(shards) for b in stride]
        per_rank = [torch.split(s, local, dim=dim) for s in shards]
        count = len(local)
    return torch.cat([per_rank[r][b] for b in range(count) for r in range(len(shards))], dim=dim)
