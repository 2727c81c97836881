"""Cross entropy over vocab-parallel logits, in fp32, without gathering the vocabulary.

Each rank holds ``logits[..., V/tp]``. The row max, the sum of exponentials and the target logit are
all-reduced over the tensor-parallel group. With label smoothing ``eps`` the target distribution is
``(1 - eps) * one_hot + eps / V`` over the full (padded) vocabulary ``V``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


def _all_reduce(x: torch.Tensor, group: Any, op: Any = None) -> torch.Tensor:
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(x, op=op or dist.ReduceOp.SUM, group=group)
    return x


class _VocabParallelCrossEntropy(torch.autograd.Function):
    # Each pass over the [n, V/tp] fp32 block, and each new one (its pages are faulted in), costs: it is the largest
    # tensor of the step. The fp32 copy of low-precision logits is shifted and exponentiated in place, and backward
    # turns the saved softmax into the gradient in place. Same operations on the same values: bitwise the same.
    @staticmethod
    def forward(ctx, logits, target, group, label_smoothing):
        owned = logits.dtype != torch.float32  # .float() made a copy that this function may overwrite
        logits = logits.float()
        tp_size = 1 if group is None else dist.get_world_size(group)
        tp_rank = 0 if group is None else dist.get_rank(group)
        local_v = logits.shape[-1]
        start = tp_rank * local_v
        row_max = _all_reduce(logits.max(dim=-1).values, group, dist.ReduceOp.MAX)
        shifted = logits.sub_(row_max.unsqueeze(-1)) if owned else logits - row_max.unsqueeze(-1)
        outside = (target < start) | (target >= start + local_v)
        local_target = (target - start).masked_fill(outside, 0)
        predicted = shifted.gather(-1, local_target.unsqueeze(-1)).squeeze(-1).masked_fill(outside, 0.0)
        local_sum_shifted = shifted.sum(dim=-1) if label_smoothing > 0 else None
        exp = shifted.exp_()
        sum_exp = exp.sum(dim=-1)
        if tp_size > 1:
            packed = torch.stack([predicted, sum_exp])
            _all_reduce(packed, group)
            predicted, sum_exp = packed[0], packed[1]
        log_z = sum_exp.log()
        loss = log_z - predicted
        vocab = local_v * tp_size
        if local_sum_shifted is not None:
            sum_shifted = _all_reduce(local_sum_shifted, group)
            mean_neg_logp = log_z - sum_shifted / vocab
            loss = (1.0 - label_smoothing) * loss + label_smoothing * mean_neg_logp
        softmax = exp.div_(sum_exp.unsqueeze(-1))
        ctx.save_for_backward(softmax, local_target, outside)
        ctx.label_smoothing, ctx.vocab, ctx.backward_done = label_smoothing, vocab, False
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        if ctx.backward_done:
            raise RuntimeError("vocab_parallel_cross_entropy: backward runs once (retain_graph is not supported)")
        ctx.backward_done = True
        softmax, local_target, outside = ctx.saved_tensors
        eps = ctx.label_smoothing
        grad = softmax  # the saved softmax becomes the gradient in place (as Megatron's): no new [n, V/tp] block
        if eps > 0:
            grad.sub_(eps / ctx.vocab)
        hit = (~outside).to(grad.dtype) * (1.0 - eps)
        grad.scatter_add_(-1, local_target.unsqueeze(-1), -hit.unsqueeze(-1))
        grad.mul_(grad_loss.unsqueeze(-1))
        return grad, None, None, None


def vocab_parallel_cross_entropy(
    logits: torch.Tensor, target: torch.Tensor, group: Any = None, label_smoothing: float = 0.0
) -> torch.Tensor:
    """Per-token loss (fp32, shape of ``target``) for logits split over the vocabulary.

    The gradient returned to ``logits`` is fp32; autograd casts it to the logits' dtype.
    """
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    return _VocabParallelCrossEntropy.apply(logits, target, group, label_smoothing)
