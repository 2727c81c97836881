"""Sequence-parallel mappings (Megatron's): activations outside the tensor-parallel matmuls are split along
the sequence over the tensor-parallel group.

Hidden states are batch first ``[b, s, H]``; rank ``r`` holds positions ``[r s/tp, (r + 1) s/tp)``. A
column-parallel layer all-gathers its input along the sequence (its gradient is reduce-scattered), a
row-parallel layer reduce-scatters its output instead of all-reducing it (its gradient is all-gathered).
Parameters used on a sequence shard (LayerNorms, the row-parallel bias) see a partial gradient on each
rank: pass them through ``copy_to_tensor_parallel_region`` (identity forward, all-reduce backward).
Every function takes the tensor-parallel ``group``; with ``None`` (size 1) they are the identity.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

SEQ_DIM = 1


def _size(group: Any) -> int:
    return 1 if group is None else dist.get_world_size(group)


def _split(x: torch.Tensor, group: Any) -> torch.Tensor:
    size = _size(group)
    if x.shape[SEQ_DIM] % size:
        raise ValueError(
            f"sequence length {x.shape[SEQ_DIM]} is not divisible by the tensor-parallel size {size} "
            f"(needed by sequence parallelism)"
        )
    return torch.chunk(x, size, dim=SEQ_DIM)[dist.get_rank(group)].contiguous()


def _gather(x: torch.Tensor, group: Any) -> torch.Tensor:
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(_size(group))]
    dist.all_gather(parts, x, group=group)
    return torch.cat(parts, dim=SEQ_DIM)


def _reduce_scatter(x: torch.Tensor, group: Any) -> torch.Tensor:
    size = _size(group)
    if x.shape[SEQ_DIM] % size:
        raise ValueError(
            f"sequence length {x.shape[SEQ_DIM]} is not divisible by the tensor-parallel size {size} "
            f"(needed by sequence parallelism)"
        )
    parts = [p.contiguous() for p in torch.chunk(x, size, dim=SEQ_DIM)]
    out = torch.empty_like(parts[0])
    dist.reduce_scatter(out, parts, group=group)
    return out


class _Scatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _split(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _gather(grad, ctx.group), None


class _Gather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, reduce_grad):
        ctx.group, ctx.reduce_grad = group, reduce_grad
        return _gather(x, group)

    @staticmethod
    def backward(ctx, grad):
        out = _reduce_scatter(grad, ctx.group) if ctx.reduce_grad else _split(grad, ctx.group)
        return out, None, None


class _ReduceScatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _reduce_scatter(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _gather(grad, ctx.group), None


def scatter_to_sequence_parallel_region(x: torch.Tensor, group: Any) -> torch.Tensor:
    """Keep this rank's sequence shard forward; all-gather the gradient backward."""
    return x if _size(group) == 1 else _Scatter.apply(x, group)


def gather_from_sequence_parallel_region(x: torch.Tensor, group: Any, *, reduce_grad: bool = True) -> torch.Tensor:
    """All-gather the sequence forward. Backward: reduce-scatter the gradient (``reduce_grad``, the input of
    a tensor-parallel matmul whose gradient is partial on each rank) or keep this rank's shard of it."""
    return x if _size(group) == 1 else _Gather.apply(x, group, reduce_grad)


def reduce_scatter_to_sequence_parallel_region(x: torch.Tensor, group: Any) -> torch.Tensor:
    """Sum over the group and keep this rank's sequence shard forward; all-gather the gradient backward."""
    return x if _size(group) == 1 else _ReduceScatter.apply(x, group)
