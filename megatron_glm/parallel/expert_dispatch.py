"""Expert-parallel token dispatch: send each token's copies to the ranks holding their experts, and back.

The same contract as the MoE layer's local dispatcher (``megatron_glm.model.moe_dispatch``):
``dispatch(x [n, H], expert_ids [n, k]) -> (x_grouped [m, H], tokens_per_local_expert [E_local], handle)``, the
rows of ``x_grouped`` grouped by this rank's experts (local expert 0 first); ``row_weights(weights [n, k], handle)
-> [m]``, each grouped row's routing weight sent along (one more all-to-all, of ``n k`` scalars); ``combine(y_grouped,
handle, weights [n, k] | None) -> [n, H]``, the weighted sum over each token's ``k`` choices of its experts' outputs
(products in fp32, the result in ``y_grouped``'s dtype), or their plain sum when the rows are already weighted.

Rank ``e`` of the expert-parallel group holds the experts ``[e E/ep, (e+1) E/ep)``. A dispatch sorts the
``n k`` token copies by global expert (so by destination rank), exchanges the per-expert counts (one
all-to-all of ``E`` integers), sends the rows with an all-to-all of variable split sizes, and regroups the
received rows (source-major) by local expert. Combine runs the reverse. Both all-to-alls are autograd
functions whose backward is the opposite all-to-all, so gradients reach ``x``, the routing weights and the
experts. No token is dropped: every rank receives exactly the rows routed to its experts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from megatron_glm.parallel.state import ParallelState
from megatron_glm.parallel.token_rows import combine_sorted, sum_sorted, unpermute_rows


def _all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group: Any) -> torch.Tensor:
    out = x.new_empty((sum(out_splits), *x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
    return out


class _AllToAll(torch.autograd.Function):
    """Rows ``in_splits[r]`` go to rank ``r``, ``out_splits[r]`` come from it; backward sends them back."""

    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group):
        ctx.splits, ctx.group = (out_splits, in_splits), group
        return _all_to_all(x, out_splits, in_splits, group)

    @staticmethod
    def backward(ctx, grad):
        out_splits, in_splits = ctx.splits
        return _all_to_all(grad, in_splits, out_splits, ctx.group), None, None, None


@dataclass(frozen=True)
class DispatchHandle:
    """What :meth:`ExpertDispatcher.combine` needs to undo a dispatch."""

    order: torch.Tensor  # [n k]: the flat (token, choice) index of each sorted row
    regroup: torch.Tensor  # [m]: the received row each grouped row is
    send_splits: list[int]  # rows sent to each expert-parallel rank
    recv_splits: list[int]  # rows received from each
    shape: tuple[int, int]  # (n, k)


class ExpertDispatcher:
    """All-to-all dispatch over the expert-parallel group of ``parallel_state`` (``num_experts`` in all).

    With one expert-parallel rank nothing is communicated (the local dispatch: every expert is local).
    """

    def __init__(self, num_experts: int, parallel_state: ParallelState) -> None:
        ep = parallel_state.ep_size
        if num_experts % ep:
            raise ValueError(f"{num_experts} experts do not split over {ep} expert-parallel ranks")
        self.num_experts, self.ep_size, self.group = num_experts, ep, parallel_state.ep_group
        self.num_local = num_experts // ep
        if ep > 1 and self.group is None:
            raise ValueError("expert parallelism needs the expert-parallel group (initialize_parallel_state)")

    def dispatch(self, x: torch.Tensor, expert_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, DispatchHandle]:
        n, k = expert_ids.shape
        flat = expert_ids.reshape(-1)
        order = torch.argsort(flat, stable=True)  # sorted by global expert, hence by destination rank
        rows = x[order // k]
        counts = torch.bincount(flat, minlength=self.num_experts)  # [E] copies per global expert
        if self.ep_size == 1:
            ident = torch.arange(rows.shape[0], device=x.device)
            handle = DispatchHandle(order, ident, [rows.shape[0]], [rows.shape[0]], (n, k))
            return rows, counts, handle
        # received[s, j]: rows source s sends to this rank's local expert j
        received = torch.empty_like(counts)
        dist.all_to_all_single(received, counts, group=self.group)
        received = received.view(self.ep_size, self.num_local)
        send_splits = counts.view(self.ep_size, self.num_local).sum(1).tolist()
        recv_splits = received.sum(1).tolist()
        got = _AllToAll.apply(rows, recv_splits, send_splits, self.group)
        # received rows are source-major; group them by local expert (stable: source order inside an expert)
        local_expert = torch.arange(self.num_local, device=x.device).repeat(self.ep_size)
        labels = torch.repeat_interleave(local_expert, received.reshape(-1))
        regroup = torch.argsort(labels, stable=True)
        handle = DispatchHandle(order, regroup, send_splits, recv_splits, (n, k))
        return got[regroup], received.sum(0), handle

    def row_weights(self, weights: torch.Tensor, handle: DispatchHandle) -> torch.Tensor:
        picked = weights.reshape(-1).index_select(0, handle.order)
        if self.ep_size == 1:
            return picked
        got = _AllToAll.apply(picked.unsqueeze(-1), handle.recv_splits, handle.send_splits, self.group)
        return got.squeeze(-1)[handle.regroup]

    def combine(self, y_grouped: torch.Tensor, handle: DispatchHandle, weights: torch.Tensor | None) -> torch.Tensor:
        n, k = handle.shape
        if self.ep_size == 1:
            back = y_grouped
        else:
            received = unpermute_rows(y_grouped, handle.regroup)
            back = _AllToAll.apply(received, handle.send_splits, handle.recv_splits, self.group)
        if weights is None:
            return sum_sorted(back, handle.order, k, n)
        return combine_sorted(back, handle.order, weights, k)
