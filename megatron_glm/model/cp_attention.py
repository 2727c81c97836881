"""Attention and dropout under context parallelism (:mod:`megatron_glm.parallel.context_parallel`).

Each rank holds the queries of its positions (two zigzag chunks). Without attention dropout and with
``context_parallel_comm ring`` (the default) the keys and values travel around the group
(:mod:`megatron_glm.model.ring_attention`); otherwise (``gather``, or attention dropout) they are all-gathered (rank
after rank) and the mask is the rows of GLM's ``[S, S]`` mask at this rank's query positions with its columns in the
gathered keys' order (:func:`local_mask`, evaluated from the positions by the mask function: the ``[S, S]`` grid is
never built): Part A bidirectional, Part B causal, document isolation and the causal objective all come from the
same mask function as ``C = 1``. Exact: the same scores and softmax over the same keys (the sums run in another
order: fp32 reduction noise).

Dropout is that of ``C = 1``: every mask is drawn over the whole sequence from the same RNG state and this rank's
positions kept (:class:`ContextParallelDropout` for the hidden dropouts, :func:`attention_with_dropout` for the
attention probabilities, whose full ``[b, h, S, S]`` mask each rank draws and drops after keeping its ``[b, h,
S / C, S]`` rows: ``C`` times the probability mask's memory for a moment, and ``C`` times its random draws). Without
attention dropout, attention runs in the chosen kernel (SDPA; flex falls back to SDPA) with the boolean rows. Under
sequence parallelism hidden dropout is drawn per shard (as without context parallelism, where sequence parallelism
already changes the masks): each rank keeps its own contiguous block of a ``C`` times larger draw.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from megatron_glm.model.masks import AttentionMask, prepare_attention_mask
from megatron_glm.model.ring_attention import fp32_scores
from megatron_glm.parallel import MODEL_PARALLEL_RNG, RNGStatesTracker
from megatron_glm.parallel.context_parallel import ContextParallel


def local_mask(
    attention_mask: torch.Tensor | AttentionMask, cp: ContextParallel, batch: int, local_seq: int, device: torch.device
) -> AttentionMask:
    """The rows of the global mask (``[b]`` sep, ``[b, 1, S, S]`` boolean, or a prepared mask) at this rank's
    query positions, its columns at the gathered keys' positions: a boolean ``[b, 1, S / C, S]`` mask, evaluated
    from the positions by the mask function when a kernel asks for it (the ring never does: it evaluates each
    block's ``[b, 1, S / C, S / C]``)."""
    full = prepare_attention_mask(attention_mask, batch, local_seq * cp.size, device)
    q, kv = cp.local_positions(local_seq, device), cp.gathered_positions(local_seq, device)
    return AttentionMask(full.mask_mod, batch, local_seq, torch.device(device), q_positions=q, kv_positions=kv)


def _full_rows_noise(
    p: float, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, q: torch.Tensor, kv: torch.Tensor
) -> torch.Tensor:
    """The ``C = 1`` attention-dropout mask (scaled by ``1 / (1 - p)``) of shape ``[b, h, S, S]`` at rows ``q`` and
    columns ``kv``."""
    noise = F.dropout(torch.ones(shape, dtype=dtype, device=device), p=p)
    return noise.index_select(2, q).index_select(3, kv)


def attention_with_dropout(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: AttentionMask,
    dropout_p: float,
    tracker: RNGStatesTracker | None,
    cp: ContextParallel,
    fp32_coeff: float | None = None,
) -> torch.Tensor:
    """Attention of the local queries ``[b, h, S / C, d]`` on the gathered keys and values ``[b, h, S, d]`` with the
    probability-dropout mask of ``C = 1`` (drawn over ``[b, h, S, S]`` as SDPA's math path and the eager kernel
    draw it; on CUDA, SDPA's fused kernels draw their own Philox masks, so ``C = 1`` with ``attention_impl eager``
    is the reference there). ``fp32_coeff``: the scores of
    :func:`~megatron_glm.model.attention.layer_scaled_attention`."""
    b, h, s_loc, _ = q.shape
    seq = k.shape[2]
    scores = fp32_scores(q, k, fp32_coeff)
    fork = tracker.fork(MODEL_PARALLEL_RNG) if tracker is not None else contextlib.nullcontext()
    with fork:
        qpos, kvpos = cp.local_positions(s_loc, q.device), cp.gathered_positions(s_loc, q.device)
        noise = _full_rows_noise(dropout_p, (b, h, seq, seq), v.dtype, q.device, qpos, kvpos)
    return _DroppedSoftmaxAttention.apply(scores, v, mask.bool_mask, noise)


class _DroppedSoftmaxAttention(torch.autograd.Function):
    """``dropout(softmax(masked scores)) @ v`` with the dropout mask ``noise`` given (scaled, no gradient).

    Keeps the probabilities and the mask for backward (SDPA's math path keeps the dropped probabilities too) and
    computes the scores' gradient in place: ``p * (g - rowsum(g * p))`` with ``g = (grad @ v^T) * noise`` and the
    row sums ``grad . out`` (no ``[s, S]`` product made for them). A row with nothing visible outputs zeros."""

    @staticmethod
    def forward(ctx, scores, v, allowed, noise):
        probs = torch.softmax(scores.masked_fill(~allowed, torch.finfo(scores.dtype).min), dim=-1).to(v.dtype)
        noise = noise * allowed.any(dim=-1, keepdim=True)
        out = torch.matmul(probs * noise, v)
        ctx.save_for_backward(probs, noise, v, out)
        ctx.scores_dtype = scores.dtype
        return out

    @staticmethod
    def backward(ctx, grad):
        probs, noise, v, out = ctx.saved_tensors
        grad_v = torch.matmul((probs * noise).transpose(-1, -2), grad)
        g = torch.matmul(grad, v.transpose(-1, -2)).mul_(noise).to(ctx.scores_dtype)
        rows = (grad.float() * out.float()).sum(dim=-1, keepdim=True).to(g.dtype)
        g.sub_(rows).mul_(probs)
        return g, grad_v, None, None


class ContextParallelDropout(nn.Dropout):
    """``nn.Dropout`` over this rank's positions (dim 1) of a sequence split by context parallelism, drawing the
    mask of the whole sequence (``C`` times the draws and, for a moment, the memory of a local mask).

    ``exact``: the positions are the zigzag ones (the mask is that of ``C = 1``); otherwise (a sequence-parallel
    shard of them) this rank keeps its own contiguous block of the larger draw."""

    def __init__(self, p: float, cp: ContextParallel, exact: bool) -> None:
        super().__init__(p)
        self.cp, self.exact = cp, exact

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        n, size = x.shape[1], self.cp.size
        noise = F.dropout(torch.ones(x.shape[0], n * size, *x.shape[2:], dtype=x.dtype, device=x.device), p=self.p)
        if self.exact:
            keep = self.cp.local_positions(n, x.device)
        else:
            keep = torch.arange(self.cp.rank * n, (self.cp.rank + 1) * n, device=x.device)
        return x * noise.index_select(1, keep)


def use_context_parallel_dropout(model: nn.Module, cp: ContextParallel, sequence_parallel: bool) -> None:
    """Replace every ``nn.Dropout`` of ``model`` by a :class:`ContextParallelDropout` (same ``p``), in place. The
    embedding dropout runs before the sequence-parallel scatter, so it stays exact under sequence parallelism."""
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is nn.Dropout:
                exact = not sequence_parallel or child_name == "embedding_dropout"
                setattr(module, child_name, ContextParallelDropout(child.p, cp, exact))
