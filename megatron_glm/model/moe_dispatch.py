"""Token dispatchers: how routed tokens reach their experts and come back (the seam expert parallelism plugs into).

The contract (:class:`TokenDispatcher`), for ``n`` tokens of this rank each routed to ``k`` experts of ``E``
(global expert ids), with ``E_local`` experts held here (``E / ep``, experts ``[ep_rank E_local, (ep_rank + 1)
E_local)``):

- ``dispatch(x [n, H], expert_ids [n, k] int64) -> (x_grouped [m, H], tokens_per_local_expert [E_local] int64,
  handle)``: ``x_grouped`` holds one row per (token, chosen local expert) pair that this rank computes, grouped by
  local expert in ascending order (expert 0's rows first), ``tokens_per_local_expert`` the rows of each (on the
  device of ``x``; ``m`` = their sum; no host synchronisation needed by the caller), ``handle`` whatever
  ``combine`` needs (opaque to the caller). Rows of one expert keep no particular order. Differentiable in ``x``.
- ``row_weights(weights [n, k], handle) -> [m]``: the routing weight of each row of ``x_grouped`` (its (token,
  choice) pair's), in ``weights``' dtype, where the experts' rows are computed. Differentiable in ``weights``.
- ``combine(y_grouped [m, H], handle, weights [n, k] | None) -> [n, H]``: ``y_grouped`` is the experts' output row
  for row of ``x_grouped``; the result is ``sum_j weights[t, j] * y(t, expert_ids[t, j])`` for each of this rank's
  tokens ``t`` (the products taken in fp32), or with ``weights`` None the plain ``sum_j y(t, expert_ids[t, j])``
  (rows the experts already weighed with :meth:`row_weights`: what the MoE layer does), summed in fp32, in
  ``y_grouped``'s dtype, a dropped pair contributing 0. Differentiable in ``y_grouped`` and ``weights``.

``dispatch`` and ``combine`` are called once each per forward, in that order, with the same tokens;
tensor parallelism is outside (the caller passes every TP rank the same tokens and sums the partial outputs).
:class:`LocalDispatcher` is the single-process one (EP = 1: every expert is local, nothing is communicated),
with the optional capacity (``moe_capacity_factor``); an all-to-all dispatcher implements the same two methods.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from megatron_glm.parallel.token_rows import combine_sorted, sum_sorted


class TokenDispatcher(Protocol):
    """See the module docstring."""

    def dispatch(self, x: torch.Tensor, expert_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, Any]: ...

    def row_weights(self, weights: torch.Tensor, handle: Any) -> torch.Tensor: ...

    def combine(self, y_grouped: torch.Tensor, handle: Any, weights: torch.Tensor | None) -> torch.Tensor: ...


@dataclass
class LocalHandle:
    """Where each grouped row came from: ``order`` (indices into the flat ``[n k]`` pairs), ``n``, ``k``."""

    order: torch.Tensor
    n: int
    k: int


class LocalDispatcher:
    """Every expert on this rank: a stable sort of the ``[n k]`` (token, expert) pairs by expert id. With
    ``capacity_factor`` > 0, an expert keeps at most ``ceil(factor x n k / E)`` rows (the first in token order);
    the rest are dropped (their routed output is 0)."""

    def __init__(self, num_experts: int, capacity_factor: float = 0.0) -> None:
        self.num_experts, self.capacity_factor = num_experts, capacity_factor

    def dispatch(self, x: torch.Tensor, expert_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, LocalHandle]:
        n, k = expert_ids.shape
        flat = expert_ids.reshape(-1)
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=self.num_experts)
        if self.capacity_factor > 0:
            cap = math.ceil(self.capacity_factor * n * k / self.num_experts)
            starts = torch.cumsum(counts, 0) - counts
            rank_in_expert = torch.arange(flat.numel(), device=flat.device) - starts[flat[order]]
            order = order[rank_in_expert < cap]
            counts = counts.clamp(max=cap)
        return x.index_select(0, order // k), counts, LocalHandle(order, n, k)

    def row_weights(self, weights: torch.Tensor, handle: LocalHandle) -> torch.Tensor:
        return weights.reshape(-1).index_select(0, handle.order)

    def combine(self, y_grouped: torch.Tensor, handle: LocalHandle, weights: torch.Tensor | None) -> torch.Tensor:
        if weights is None:
            return sum_sorted(y_grouped, handle.order, handle.k, handle.n)
        return combine_sorted(y_grouped, handle.order, weights, handle.k)
