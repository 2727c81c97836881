"""Row permutations and the weighted combine of token copies, shared by the MoE dispatchers (local and all-to-all).

A token routed to ``k`` experts travels as ``k`` row copies sorted by expert; :func:`unpermute_rows` puts rows back
in (token, choice) order as a gather (its backward a gather too, no scatter-add), :func:`combine_sorted` takes each
token's weighted sum straight from the sorted rows, :func:`sum_sorted` its sum of rows already weighted (the MoE layer
weighs the experts' inner activations, ``[m, F]``, instead of their ``[m, H]`` outputs).
"""

from __future__ import annotations

import torch


class _Unpermute(torch.autograd.Function):
    """``out[order[i]] = y[i]`` for a permutation ``order`` of ``y``'s rows, as a gather with its inverse; the
    backward gathers with ``order`` (autograd's own would zero-fill and scatter)."""

    @staticmethod
    def forward(ctx, y, order):
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        ctx.save_for_backward(order)
        return y.index_select(0, inverse)

    @staticmethod
    def backward(ctx, grad):
        (order,) = ctx.saved_tensors
        return grad.index_select(0, order), None


def unpermute_rows(y: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """The rows of ``y`` put back where ``order`` took them from (``out[order] = y``; ``order`` a permutation)."""
    return _Unpermute.apply(y, order)


class _CombineSorted(torch.autograd.Function):
    """:func:`combine_sorted`'s forward (products in fp32, added up by token) and a backward of one row gather."""

    @staticmethod
    def forward(ctx, rows, token, weights, n):
        ctx.save_for_backward(rows, token, weights)
        products = rows * weights.float().unsqueeze(-1)  # fp32 by promotion, without an fp32 copy of ``rows``
        out = torch.zeros(n, rows.shape[-1], dtype=products.dtype, device=rows.device)
        return out.index_add_(0, token, products).to(rows.dtype)

    @staticmethod
    def backward(ctx, grad):
        rows, token, weights = ctx.saved_tensors
        g = grad.float().index_select(0, token)  # [m, H]: each row's token's gradient
        d_weights = torch.bmm(g.unsqueeze(1), rows.to(g.dtype).unsqueeze(-1)).view(-1).to(weights.dtype)
        return g.mul_(weights.float().unsqueeze(-1)).to(rows.dtype), None, d_weights, None


def combine_sorted(rows: torch.Tensor, order: torch.Tensor, weights: torch.Tensor, k: int) -> torch.Tensor:
    """``out[t] = sum_j weights[t, j] y(t, j)`` for ``n`` tokens, from ``rows [m, H]`` where row ``i`` is the output
    of the flat (token, choice) pair ``order[i]`` (pairs missing from ``order``, dropped ones, add nothing):
    products in fp32, the sum in fp32, the result in ``rows``' dtype. No ``[n k, H]`` copy in (token, choice) order
    is made; the backward is one gather of the output gradient. Differentiable in ``rows`` and ``weights``."""
    n = weights.shape[0]
    picked = weights.reshape(-1).index_select(0, order)
    return _CombineSorted.apply(rows, torch.div(order, k, rounding_mode="floor"), picked, n)


class _SumSorted(torch.autograd.Function):
    """:func:`sum_sorted`'s forward (rows added up by token in fp32) and a backward of one row gather."""

    @staticmethod
    def forward(ctx, rows, token, n):
        ctx.save_for_backward(token)
        out = torch.zeros(n, rows.shape[-1], dtype=torch.float32, device=rows.device)
        return out.index_add_(0, token, rows.float()).to(rows.dtype)  # fp32 rows: no copy either way

    @staticmethod
    def backward(ctx, grad):
        (token,) = ctx.saved_tensors
        return grad.index_select(0, token), None, None


def sum_sorted(rows: torch.Tensor, order: torch.Tensor, k: int, n: int) -> torch.Tensor:
    """``out[t] = sum_j y(t, j)`` for ``n`` tokens, from ``rows [m, H]`` where row ``i`` is the (already weighted)
    output of the flat (token, choice) pair ``order[i]`` (missing pairs add nothing): the sum in fp32, the result in
    ``rows``' dtype; the backward is one gather of the output gradient. Differentiable in ``rows``."""
    return _SumSorted.apply(rows, torch.div(order, k, rounding_mode="floor"), n)
