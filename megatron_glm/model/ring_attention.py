"""Ring attention under context parallelism (``model.context_parallel_comm ring``, attention dropout off).

Each rank keeps only its own keys and values (its two zigzag chunks, ``S / C`` positions). The blocks travel around
the context-parallel group (rank ``r`` sends to ``r + 1`` and receives from ``r - 1``, point-to-point, the next
block's exchange posted before the current block's compute): after ``C`` steps every rank's queries have met every
key. Each step computes the local queries' scores against the visiting block in fp32 (as the gather path), masked
by that block's rows and columns of GLM's mask, evaluated from the positions by the mask's ``mask_mod`` (never the
``[S, S]`` mask), and merges the block's output into the running one by its log-sum-exp. A block the mask hides
entirely is skipped. Backward runs the ring again: it recomputes each block's probabilities from the saved
log-sum-exp and the gradients of the keys and values accumulate (fp32) in buffers that travel with their block; one
more hop brings them home. Kept for backward: the local queries, keys, values, output and the ``[b, h, s, 1]``
log-sum-exp (the gather path keeps the gathered ``[b, g, S, d]`` keys and values). A row with nothing visible
outputs zeros (and gets zero gradients), as the gather path. Grouped-query attention: the blocks travel with their
``g`` key/value heads and are repeated per query head inside the step (the gradients summed back over the repeats).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist

from megatron_glm.model.masks import MaskMod
from megatron_glm.parallel.context_parallel import ContextParallel, zigzag_indices


def fp32_scores(q: torch.Tensor, k: torch.Tensor, fp32_coeff: float | None) -> torch.Tensor:
    """``q k^T / sqrt(d)`` in fp32; ``fp32_coeff``: the scores of
    :func:`~megatron_glm.model.attention.layer_scaled_attention` (``q / (sqrt(d) coeff)`` in the input dtype, the
    product times ``coeff`` in fp32)."""
    coeff = 1.0 if fp32_coeff is None else fp32_coeff
    scale = 1.0 / (math.sqrt(q.shape[-1]) * coeff)
    if fp32_coeff is None:
        return torch.matmul(q.float(), k.float().transpose(-1, -2)).mul_(scale)
    return torch.matmul(q * scale, k.transpose(-1, -2)).float().mul_(coeff)


class _Ring:
    """One ring pass over the group: :meth:`exchange` sends a tensor to the next rank and receives the previous
    rank's (asynchronously; :meth:`wait` returns it)."""

    def __init__(self, cp: ContextParallel) -> None:
        self.cp = cp
        self.next = dist.get_global_rank(cp.group, (cp.rank + 1) % cp.size)
        self.prev = dist.get_global_rank(cp.group, (cp.rank - 1) % cp.size)

    def exchange(self, x: torch.Tensor, tag: int = 0) -> tuple[torch.Tensor, list[Any]]:
        x, group = x.contiguous(), self.cp.group
        buf = torch.empty_like(x)
        ops = [dist.P2POp(dist.isend, x, self.next, group, tag), dist.P2POp(dist.irecv, buf, self.prev, group, tag)]
        return buf, dist.batch_isend_irecv(ops)

    @staticmethod
    def wait(pending: tuple[torch.Tensor, list[Any]]) -> torch.Tensor:
        buf, reqs = pending
        for req in reqs:
            req.wait()
        return buf

    def block_mask(self, mask_mod: MaskMod, q_pos: torch.Tensor, step: int, batch: int, n: int) -> torch.Tensor:
        """``[b, 1, m, n]``: which of the step's keys (those of rank ``r - step``) each local query may see."""
        src = (self.cp.rank - step) % self.cp.size
        kv = zigzag_indices(n * self.cp.size, self.cp.size, src, q_pos.device).view(1, 1, 1, n)
        b = torch.arange(batch, device=q_pos.device).view(batch, 1, 1, 1)
        h = torch.zeros(1, 1, 1, 1, dtype=torch.long, device=q_pos.device)
        return mask_mod(b, h, q_pos.view(q_pos.shape[0], 1, q_pos.shape[-1], 1), kv)


TILE_ELEMENTS = 1 << 22
"""Score elements of one tile (``b x h x rows x keys``: 16 MiB in fp32). Each step runs the local queries in row
tiles of this size, so no step holds a block's whole ``[b, h, S / C, S / C]`` scores (the flash kernels' memory is
linear in the sequence: the ring's must stay near it)."""


def _tiles(m: int, b: int, h: int, n: int) -> list[slice]:
    rows = max(1, TILE_ELEMENTS // (b * h * n))
    return [slice(i, min(i + rows, m)) for i in range(0, m, rows)]


def _repeat(x: torch.Tensor, rep: int) -> torch.Tensor:
    return x if rep == 1 else x.repeat_interleave(rep, dim=1)


def _finite(lse: torch.Tensor) -> torch.Tensor:
    """``lse`` with ``-inf`` (a row with nothing visible) replaced by 0, so that ``exp(s - lse)`` is 0 there."""
    return lse.masked_fill(lse == float("-inf"), 0.0)


def _forward_tile(q, k, v, allowed, fp32_coeff, out, lse) -> None:
    """Merge the tile's attention on one block into its running ``out`` and ``lse`` (views, in place)."""
    s = fp32_scores(q, k, fp32_coeff).masked_fill_(~allowed, float("-inf"))
    block_lse = torch.logsumexp(s, dim=-1, keepdim=True)
    p = torch.exp(s.sub_(_finite(block_lse)))
    block_out = torch.matmul(p.to(v.dtype), v).float()
    merged = torch.logaddexp(lse, block_lse)
    new = _finite(merged)
    out.mul_(torch.exp(lse - new)).add_(block_out.mul_(torch.exp(block_lse - new)))
    lse.copy_(merged)


def _backward_tile(q, grad, rows, lse, k, v, allowed, fp32_coeff, dq, dk, dv) -> None:
    """Add the tile's gradients on one block: ``dq`` (a view), ``dk`` and ``dv`` (the block's, per query head)."""
    sm = 1.0 / math.sqrt(q.shape[-1])
    s = fp32_scores(q, k, fp32_coeff).masked_fill_(~allowed, float("-inf"))
    p = torch.exp(s.sub_(lse))
    dv.add_(torch.matmul(p.to(grad.dtype).transpose(-1, -2), grad).float())
    ds = torch.matmul(grad, v.transpose(-1, -2)).float().sub_(rows).mul_(p)
    dq.add_(torch.matmul(ds, k.float()), alpha=sm)
    dk.add_(torch.matmul(ds.transpose(-1, -2), q.float()), alpha=sm)


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, mask_mod, q_pos, cp, fp32_coeff):
        ring, rep, n = _Ring(cp), q.shape[1] // k.shape[1], k.shape[2]
        out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        lse = torch.full((*q.shape[:3], 1), float("-inf"), dtype=torch.float32, device=q.device)
        kv = torch.stack([k, v])
        for step in range(cp.size):
            pending = ring.exchange(kv) if step < cp.size - 1 else None
            kr, vr = _repeat(kv[0], rep), _repeat(kv[1], rep)
            for t in _tiles(q.shape[2], *q.shape[:2], n):
                allowed = ring.block_mask(mask_mod, q_pos[:, t], step, q.shape[0], n)
                if bool(allowed.any()):  # skip what the mask hides entirely
                    _forward_tile(q[:, :, t], kr, vr, allowed, fp32_coeff, out[:, :, t], lse[:, :, t])
            if pending is not None:
                kv = ring.wait(pending)
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse, q_pos)
        ctx.mask_mod, ctx.cp, ctx.fp32_coeff = mask_mod, cp, fp32_coeff
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, out, lse, q_pos = ctx.saved_tensors
        cp, ring, rep, n = ctx.cp, _Ring(ctx.cp), q.shape[1] // k.shape[1], k.shape[2]
        b, g = k.shape[:2]
        grad = grad.contiguous()
        rows = (grad.float() * out.float()).sum(dim=-1, keepdim=True)
        lse = _finite(lse)
        dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        kv = torch.stack([k, v])
        dkv = torch.zeros(kv.shape, dtype=torch.float32, device=k.device)  # travels with its block
        for step in range(cp.size):
            pending = ring.exchange(kv) if step < cp.size - 1 else None
            kr, vr = _repeat(kv[0], rep), _repeat(kv[1], rep)
            dk, dv = (torch.zeros(kr.shape, dtype=torch.float32, device=k.device) for _ in range(2))
            for t in _tiles(q.shape[2], *q.shape[:2], n):
                allowed = ring.block_mask(ctx.mask_mod, q_pos[:, t], step, b, n)
                if bool(allowed.any()):
                    args = (q[:, :, t], grad[:, :, t], rows[:, :, t], lse[:, :, t], kr, vr, allowed)
                    _backward_tile(*args, ctx.fp32_coeff, dq[:, :, t], dk, dv)
            dkv[0].add_(dk.view(b, g, rep, n, -1).sum(2))
            dkv[1].add_(dv.view(b, g, rep, n, -1).sum(2))
            dkv = ring.wait(ring.exchange(dkv, tag=1))  # to the next holder; after the last step, home
            if pending is not None:
                kv = ring.wait(pending)
        return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype), None, None, None, None


def ring_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask_mod: MaskMod,
    q_positions: torch.Tensor,
    cp: ContextParallel,
    fp32_coeff: float | None = None,
) -> torch.Tensor:
    """Attention of the local queries ``q [b, h, m, d]`` (global positions ``q_positions``, ``[m]`` or per sample
    ``[b, m]``) on every rank's keys and values, this rank's ``k, v [b, g, S / C, d]`` (``g`` divides ``h``), by
    the ring (module docstring). ``mask_mod``: GLM's mask function over global positions."""
    q_pos = q_positions if q_positions.dim() == 2 else q_positions.view(1, -1)
    return _RingAttention.apply(q, k.contiguous(), v.contiguous(), mask_mod, q_pos, cp, fp32_coeff)
