"""One decoding step at a time over a batch of GLM blank-infilling sequences, with or without a KV cache.

Sequence layout of row ``i`` (shared by the cached and the recomputing path)::

    [ Part A of row i | padding up to the longest Part A | fed tokens: [sop] x1 x2 .. [sop] y1 .. ]
      0 .. n_i-1        n_i .. A-1                         A, A+1, ...

The mask (:func:`infill_mask`) lets query ``q`` see key ``k`` when ``k < n_i`` (the row's real Part A,
bidirectional), or ``A <= k <= q`` (the fed tokens, causal: every blank sees all earlier answers), or
``k == q`` (so padding rows stay finite; nobody attends to padding). For one unpadded row this is exactly
the training mask of ``sep = n``: ``k < sep or k <= q``.

With the cache, Part A is encoded once (:meth:`Stepper.prefill`) and each step runs only the new token;
without it, each step runs the whole sequence so far and keeps the last position (the reference).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_glm.generation.kv_cache import KVCache
from megatron_glm.parallel import ParallelState, gather_from_tensor_parallel_region


def infill_mask(
    a_lens: torch.Tensor, a_pad: int, q_start: int, q_len: int, kv_len: int, *, causal: bool = False
) -> torch.Tensor:
    """Boolean ``[b, 1, q_len, kv_len]`` mask of queries ``q_start .. q_start + q_len - 1`` (see module doc);
    ``causal``: Part A is causal too (a plain causal prompt, GLM-4's format)."""
    device = a_lens.device
    q = torch.arange(q_start, q_start + q_len, device=device).view(1, 1, q_len, 1)
    k = torch.arange(kv_len, device=device).view(1, 1, 1, kv_len)
    n = a_lens.view(-1, 1, 1, 1)
    part_a = (k < n) & (k <= q) if causal else k < n
    return part_a | ((k >= a_pad) & (k <= q)) | (k == q)


def agree(t: torch.Tensor, parallel_state: ParallelState) -> torch.Tensor:
    """``t`` as tensor-parallel rank 0 has it, on every rank of the group (no-op without TP)."""
    if parallel_state.tp_size > 1:
        src = dist.get_global_rank(parallel_state.tp_group, 0)
        t = t.contiguous()
        dist.broadcast(t, src=src, group=parallel_state.tp_group)
    return t


class Stepper:
    """Feeds one token per row per step and returns the next-token logits (full vocabulary, fp32).

    ``part_a``: each row's Part A token ids (positions ``0 .. n-1``, block position 0). ``use_cache``
    selects the KV-cache path; ``causal`` makes Part A causal (:func:`infill_mask`). Tensor-parallel ranks get
    identical logits (all-gathered vocabulary).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        part_a: list[list[int]],
        pad_id: int,
        *,
        use_cache: bool,
        parallel_state: ParallelState | None = None,
        capacity: int = 256,
        causal: bool = False,
    ) -> None:
        self.model = model
        self.causal = causal
        self.ps = parallel_state or getattr(model, "parallel_state", None) or ParallelState()
        self.device = next(model.parameters()).device
        b, a_pad = len(part_a), max(len(p) for p in part_a)
        self.a_pad = a_pad
        self.a_ids = torch.full((b, a_pad), pad_id, dtype=torch.long)
        self.a_pos = torch.zeros(b, 2, a_pad, dtype=torch.long)
        for i, ids in enumerate(part_a):
            self.a_ids[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            self.a_pos[i, 0, : len(ids)] = torch.arange(len(ids))
        self.a_ids, self.a_pos = self.a_ids.to(self.device), self.a_pos.to(self.device)
        self.a_lens = torch.tensor([len(p) for p in part_a], dtype=torch.long, device=self.device)
        self.fed_ids = torch.zeros(b, 0, dtype=torch.long, device=self.device)
        self.fed_pos = torch.zeros(b, 2, 0, dtype=torch.long, device=self.device)
        self.cache = KVCache(capacity=a_pad + capacity) if use_cache else None
        self._prefilled = False

    @property
    def steps(self) -> int:
        """Tokens fed so far per row."""
        return self.fed_ids.shape[1]

    def _logits(self, ids: torch.Tensor, pos: torch.Tensor, q_start: int) -> torch.Tensor:
        q_len = ids.shape[1]
        mask = infill_mask(self.a_lens, self.a_pad, q_start, q_len, q_start + q_len, causal=self.causal)
        if self.cache is None:
            out = self.model(ids, pos, mask)
        else:
            out = self.model(ids, pos, mask, kv_cache=self.cache)
        last = out[:, -1]
        return gather_from_tensor_parallel_region(last, self.ps.tp_group).float()

    @torch.no_grad()
    def prefill(self) -> None:
        """Encode Part A into the cache (once; a no-op without the cache)."""
        if self.cache is not None and not self._prefilled:
            self._logits(self.a_ids, self.a_pos, 0)
        self._prefilled = True

    @torch.no_grad()
    def step(self, token: torch.Tensor, position: torch.Tensor, block_position: torch.Tensor) -> torch.Tensor:
        """Feed ``token [b]`` at (``position``, ``block_position``); logits ``[b, V]`` for the next token."""
        self.prefill()
        new_ids = token.to(self.device, torch.long).view(-1, 1)
        new_pos = torch.stack([position, block_position], dim=1).to(self.device, torch.long).view(-1, 2, 1)
        self.fed_ids = torch.cat([self.fed_ids, new_ids], dim=1)
        self.fed_pos = torch.cat([self.fed_pos, new_pos], dim=2)
        if self.cache is not None:
            return self._logits(new_ids, new_pos, self.a_pad + self.steps - 1)
        ids = torch.cat([self.a_ids, self.fed_ids], dim=1)
        pos = torch.cat([self.a_pos, self.fed_pos], dim=2)
        return self._logits(ids, pos, 0)

    def reorder(self, index: list[int] | torch.Tensor) -> None:
        """Keep (or repeat) rows ``index`` (beam search)."""
        index = torch.as_tensor(index, dtype=torch.long, device=self.device)
        self.a_ids, self.a_pos = self.a_ids.index_select(0, index), self.a_pos.index_select(0, index)
        self.a_lens = self.a_lens.index_select(0, index)
        self.fed_ids, self.fed_pos = self.fed_ids.index_select(0, index), self.fed_pos.index_select(0, index)
        if self.cache is not None:
            self.cache.reorder(index)
