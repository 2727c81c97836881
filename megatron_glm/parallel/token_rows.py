"""Row permutations and the weighted combine of token copies, shared by the MoE dispatchers (local and all-to-all).

A token routed to ``k`` experts travels as ``k`` row copies sorted by expert; :func:`unpermute_rows` puts rows back
in (token, choice) order as a gather (its backward a gather too, no scatter-add), :func:`combine_pairs` takes each
token's weighted sum.
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


def combine_pairs(y_pairs: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``sum_j weights[t, j] y_pairs[t, j]`` for ``y_pairs [n, k, H]`` (products in fp32, result in its dtype)."""
    out = torch.bmm(weights.float().unsqueeze(1), y_pairs.float()).squeeze(1)  # 2x einsum's speed on CPU
    return out.to(y_pairs.dtype)
