"""Context parallelism: each rank of a context-parallel group holds ``1/C`` of every sequence.

Split (Megatron's zigzag, load-balanced for causal attention): the sequence of ``S`` positions is cut into ``2C``
chunks of ``S / 2C``; rank ``r`` holds chunks ``r`` and ``2C - 1 - r``, in that order (:func:`zigzag_indices`).
Every rank of the group reads the same batch; the trainer keeps this rank's positions of the token ids, position
ids, labels and loss mask (:func:`split_batch`), so the rotary positions are those of each token's global index.

Attention passes the keys and values around the group (``comm`` ``ring``: :mod:`megatron_glm.model.ring_attention`,
without attention dropout) or gathers those of the whole group (:meth:`ContextParallel.gather`: all-gather forward,
reduce-scatter of their gradients backward) and computes this rank's queries against every key with the rows of
the ``[S, S]`` mask at this rank's query positions; the gathered keys come rank after rank
(:meth:`ContextParallel.gathered_positions`), and the mask's columns follow that order.

The loss (:func:`reduce_loss`): the masked mean over the whole sequence (the same value on every rank of the group,
that of ``C = 1``); its backward multiplies by ``C`` because gradients are averaged over the ``dp x cp`` ranks
(DeepSpeed's data-parallel group is ``ParallelState.dp_cp_group``) where ``C = 1`` averages over ``dp``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from megatron_glm.parallel.state import ParallelState

SPLIT_KEYS = ("input_ids", "position_ids", "labels", "loss_mask")
"""Batch entries split along their last (sequence) dimension; the others (``sep``, ``doc_ids``, ``objective``) stay
whole: the mask is built over the global sequence."""


def zigzag_indices(seq: int, cp_size: int, cp_rank: int, device: torch.device | str | None = None) -> torch.Tensor:
    """The global positions held by rank ``cp_rank``: chunks ``cp_rank`` and ``2 cp_size - 1 - cp_rank`` of
    ``2 cp_size`` equal chunks of ``seq``."""
    if seq % (2 * cp_size):
        raise ValueError(f"sequence length {seq} is not divisible by 2 x context-parallel size {cp_size}")
    n = seq // (2 * cp_size)
    first = torch.arange(cp_rank * n, (cp_rank + 1) * n, device=device)
    last = (2 * cp_size - 1 - cp_rank) * n
    return torch.cat([first, torch.arange(last, last + n, device=device)])


def split_sequence(x: torch.Tensor, cp_size: int, cp_rank: int, dim: int = -1) -> torch.Tensor:
    """This rank's positions of ``x`` along ``dim`` (:func:`zigzag_indices`)."""
    return x.index_select(dim, zigzag_indices(x.shape[dim], cp_size, cp_rank, x.device)).contiguous()


def split_batch(batch: Mapping[str, Any], cp_size: int, cp_rank: int) -> dict[str, Any]:
    """The batch with this rank's positions of :data:`SPLIT_KEYS` (the rest whole)."""
    return {k: split_sequence(v, cp_size, cp_rank) if k in SPLIT_KEYS else v for k, v in batch.items()}


def _gather(x: torch.Tensor, dim: int, group: Any) -> torch.Tensor:
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x, group=group)
    return torch.cat(parts, dim=dim)


class _GatherSequence(torch.autograd.Function):
    """All-gather along ``dim`` forward; reduce-scatter (sum, keep this rank's block) of the gradient backward."""

    @staticmethod
    def forward(ctx, x, dim, group):
        ctx.dim, ctx.group = dim, group
        return _gather(x, dim, group)

    @staticmethod
    def backward(ctx, grad):
        parts = [p.contiguous() for p in grad.chunk(dist.get_world_size(ctx.group), dim=ctx.dim)]
        out = torch.empty_like(parts[0])
        dist.reduce_scatter(out, parts, group=ctx.group)
        return out, None, None


class _SumTimes(torch.autograd.Function):
    """All-reduce (sum) forward; backward the gradient times ``scale`` (the loss of :func:`reduce_loss`)."""

    @staticmethod
    def forward(ctx, x, group, scale):
        ctx.scale = scale
        out = x.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None, None


@dataclass(frozen=True)
class ContextParallel:
    """This rank's place in its context-parallel group (``size > 1``). ``comm``: how attention meets the other
    ranks' keys and values (``ring``: :mod:`megatron_glm.model.ring_attention` when attention dropout is off;
    ``gather``: :meth:`gather`)."""

    size: int
    rank: int
    group: Any
    comm: str = "ring"

    @classmethod
    def of(cls, parallel_state: ParallelState, comm: str = "ring") -> ContextParallel | None:
        """The state's context parallelism (``None`` with ``cp_size`` 1)."""
        ps = parallel_state
        return None if ps.cp_size == 1 else cls(ps.cp_size, ps.cp_rank, ps.cp_group, comm)

    def local_positions(self, local_seq: int, device: torch.device | str | None = None) -> torch.Tensor:
        """The global positions of this rank's ``local_seq`` positions."""
        return zigzag_indices(local_seq * self.size, self.size, self.rank, device)

    def gathered_positions(self, local_seq: int, device: torch.device | str | None = None) -> torch.Tensor:
        """The global positions of :meth:`gather`'s result, rank after rank."""
        s = local_seq * self.size
        return torch.cat([zigzag_indices(s, self.size, r, device) for r in range(self.size)])

    def gather(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """Every rank's ``x`` concatenated along ``dim`` in rank order (gradients reduce-scattered backward)."""
        return _GatherSequence.apply(x, dim, self.group)

    def sum_loss(self, x: torch.Tensor) -> torch.Tensor:
        """The group's sum of ``x``; backward the gradient times the group size (see the module docstring)."""
        return _SumTimes.apply(x, self.group, float(self.size))


def reduce_loss(out: Any, cp: ContextParallel) -> Any:
    """``out`` (a :class:`~megatron_glm.model.loss.GLMLoss` of this rank's positions) with its ``loss`` the masked
    mean over the whole sequence (the same on every rank of the group). ``per_token``, ``sample_sum`` and
    ``sample_tokens`` stay this rank's: sums over all ranks (as the trainer's logging takes them) are those of
    ``C = 1``."""
    tokens = out.sample_tokens.detach().sum().reshape(1).to(torch.float32)
    local_sum = out.loss * tokens.clamp(min=1.0)  # the loss is the local sum over max(tokens, 1)
    dist.all_reduce(tokens, group=cp.group)
    loss = cp.sum_loss(local_sum.reshape(1)) / tokens.clamp(min=1.0)
    return dataclasses.replace(out, loss=loss.reshape(()))
