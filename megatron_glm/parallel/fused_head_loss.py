"""A vocab-parallel linear head fused with its cross entropy, in row chunks: the ``[n, V]`` logits never exist.

``h [n, H] @ weight[V/tp, H].T`` is computed ``chunk`` rows at a time; each chunk's fp32 softmax statistics
are all-reduced over the tensor-parallel group (as :mod:`megatron_glm.parallel.cross_entropy`), its loss
kept and - when a gradient is needed - its gradient with respect to ``h`` and ``weight`` accumulated right
away. The loss is a weighted sum ``sum_i w_i * loss_i`` (a scalar), so those gradients are exact up to
the scalar that backward multiplies them by: nothing of size ``[n, V]`` is kept for backward and nothing is
recomputed. The peak extra memory is a few ``[chunk, V/tp]`` fp32 blocks plus one fp32 ``[V/tp, H]``
gradient accumulator (none when all rows fit in one chunk: that chunk's gradient is the result).

The gradient for ``h`` is this rank's partial sum over its vocabulary slice; pass ``h`` through
``copy_to_tensor_parallel_region`` first (as a column-parallel layer does) so backward all-reduces it.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F


def _all_reduce(x: torch.Tensor, group: Any, op: Any = None) -> torch.Tensor:
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(x, op=op or dist.ReduceOp.SUM, group=group)
    return x


def _chunk_loss(
    logits: torch.Tensor, target: torch.Tensor, start: int, vocab: int, group: Any, label_smoothing: float
) -> tuple[torch.Tensor, ...]:
    """``(loss [c], exp(shifted) [c, V/tp], sum_exp [c], local target, outside)`` of fp32 logits ``[c, V/tp]``
    (overwritten in place)."""
    local_v = logits.shape[-1]
    row_max = _all_reduce(logits.max(dim=-1).values, group, dist.ReduceOp.MAX)
    shifted = logits.sub_(row_max.unsqueeze(-1))
    outside = (target < start) | (target >= start + local_v)
    local_target = (target - start).masked_fill(outside, 0)
    predicted = shifted.gather(-1, local_target.unsqueeze(-1)).squeeze(-1).masked_fill(outside, 0.0)
    stats = [predicted, None, None]
    if label_smoothing > 0:
        stats[2] = shifted.sum(dim=-1)
    exp = shifted.exp_()
    stats[1] = exp.sum(dim=-1)
    packed = _all_reduce(torch.stack([s for s in stats if s is not None]), group)
    predicted, sum_exp = packed[0], packed[1]
    log_z = sum_exp.log()
    loss = log_z - predicted
    if label_smoothing > 0:
        loss = (1.0 - label_smoothing) * loss + label_smoothing * (log_z - packed[2] / vocab)
    return loss, exp, sum_exp, local_target, outside


class _FusedHeadCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, target, row_weights, group, chunk, label_smoothing, need_grad, grad_scale):
        tp_size = 1 if group is None else dist.get_world_size(group)
        tp_rank = 0 if group is None else dist.get_rank(group)
        local_v = weight.shape[0]
        start, vocab = tp_rank * local_v, local_v * tp_size
        n = h.shape[0]
        losses = torch.empty(n, dtype=torch.float32, device=h.device)
        grad_h = torch.empty_like(h) if need_grad else None
        grad_w = None  # fp32 sum of the chunks' weight gradients (one chunk: that chunk's, in its own dtype)
        for i in range(0, n, chunk):
            h_c, t_c = h[i : i + chunk], target[i : i + chunk]
            logits = F.linear(h_c, weight).float()
            loss, exp, sum_exp, local_target, outside = _chunk_loss(logits, t_c, start, vocab, group, label_smoothing)
            losses[i : i + chunk] = loss
            if not need_grad:
                continue
            # d(w_i * loss_i)/d logits = w_i * (softmax - (1 - eps) * one_hot - eps / V)
            grad = exp.div_(sum_exp.unsqueeze(-1))
            if label_smoothing > 0:
                grad.sub_(label_smoothing / vocab)
            hit = (~outside).to(grad.dtype) * (1.0 - label_smoothing)
            grad.scatter_add_(-1, local_target.unsqueeze(-1), -hit.unsqueeze(-1))
            grad.mul_(row_weights[i : i + chunk].unsqueeze(-1) * grad_scale)  # scaled in fp32, then cast
            grad = grad.to(h.dtype)
            torch.matmul(grad, weight, out=grad_h[i : i + chunk])
            if grad_w is None:
                grad_w = torch.matmul(grad.t(), h_c)
                if n > chunk and grad_w.dtype != torch.float32:
                    grad_w = grad_w.float()
            elif grad_w.dtype == h.dtype:
                grad_w.addmm_(grad.t(), h_c)
            else:
                grad_w.add_(torch.matmul(grad.t(), h_c))
        total = (losses * row_weights).sum()
        if need_grad:
            if grad_w is None:  # no rows
                grad_w = torch.zeros_like(weight)
            ctx.save_for_backward(grad_h, grad_w.to(weight.dtype))
        ctx.need_grad, ctx.grad_scale = need_grad, grad_scale
        ctx.mark_non_differentiable(losses)
        return total, losses

    @staticmethod
    def backward(ctx, grad_total, _grad_losses):
        if not ctx.need_grad:
            raise RuntimeError("fused_head_cross_entropy was called without gradients enabled; cannot backward")
        grad_h, grad_w = ctx.saved_tensors
        g = grad_total.float() / ctx.grad_scale  # 1 (to rounding) when grad_scale foresaw backward's factor
        return (grad_h.float() * g).to(grad_h.dtype), (grad_w.float() * g).to(grad_w.dtype), *[None] * 7


def fused_head_cross_entropy(
    h: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    row_weights: torch.Tensor,
    group: Any = None,
    *,
    chunk: int = 1024,
    label_smoothing: float = 0.0,
    grad_scale: float | torch.Tensor = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sum_i row_weights_i * loss_i, loss [n])`` for the logits ``h @ weight.T`` split over the vocabulary.

    ``h [n, H]``, ``weight [V/tp, H]`` (this rank's rows of the full ``[V, H]``), ``target [n]`` full-vocabulary
    ids, ``row_weights [n]`` fp32 (e.g. the loss mask). The per-row losses (fp32) carry no gradient; the
    weighted sum does, for ``h`` and ``weight``. Same values and gradients as
    ``(vocab_parallel_cross_entropy(h @ weight.T, target) * row_weights).sum()`` up to rounding.

    ``grad_scale``: the factor backward is expected to bring (in fp16 the loss scale over the token count). The
    gradients are computed in forward, so the fp32 logit gradient is multiplied by it before its cast to
    ``h``'s dtype, as the unfused head's arrives scaled: unscaled, fp16 flushes entries near ``1/V`` to zero.
    Backward divides its factor by ``grad_scale``, so the gradient is right whatever the value; only fp16's
    rounding depends on it (exact when it equals backward's factor).
    """
    if chunk <= 0:
        raise ValueError(f"chunk must be a positive number of rows, got {chunk}")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    if h.dim() != 2 or weight.dim() != 2 or h.shape[1] != weight.shape[1]:
        raise ValueError(f"h must be [n, H] and weight [V/tp, H], got {list(h.shape)} and {list(weight.shape)}")
    if target.shape != h.shape[:1] or row_weights.shape != h.shape[:1]:
        raise ValueError(
            f"target and row_weights must be [{h.shape[0]}], got {list(target.shape)} and {list(row_weights.shape)}"
        )
    need_grad = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)
    return _FusedHeadCrossEntropy.apply(
        h, weight, target, row_weights.to(torch.float32), group, chunk, label_smoothing, need_grad, grad_scale
    )
