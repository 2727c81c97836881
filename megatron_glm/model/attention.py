"""Self-attention: fused QKV (column-parallel), a choice of attention kernels, row-parallel output.

Kernels (``ModelConfig.attention_impl``):

- ``sdpa``: ``F.scaled_dot_product_attention`` with the boolean mask built once per forward (no score
  tensor is materialised in our code; the kernel picks a fused implementation).
- ``flex``: ``flex_attention`` with a ``BlockMask`` built from the same mask function; used on CUDA only
  and when no attention dropout is active (flex has no dropout). Elsewhere it falls back to ``sdpa``.
- ``eager``: the reference; materialises the scores, softmax in fp32.

Attention-probability dropout runs under ``tracker.fork()``: heads are split over tensor-parallel
ranks, so each rank draws its own stream.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from megatron_glm.model import sequence_parallel as sp
from megatron_glm.model.masks import AttentionMask
from megatron_glm.model.recompute import checkpointed
from megatron_glm.parallel import ColumnParallelLinear, ParallelState, RNGStatesTracker, RowParallelLinear
from megatron_glm.parallel.random import MODEL_PARALLEL_RNG, InitMethod

ATTENTION_IMPLS = ("sdpa", "flex", "eager")


class LayerKVCache(Protocol):
    """One layer's key/value cache (see ``megatron_glm.generation.kv_cache``)."""

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append ``[b, h_r, s, d]`` keys/values; return every cached key/value ``[b, h_r, past + s, d]``."""
        ...


_flex_compiled: Any = None


def _flex_attention() -> Any:
    global _flex_compiled  # a process-wide compiled kernel, not state
    if _flex_compiled is None:
        from torch.nn.attention.flex_attention import flex_attention

        _flex_compiled = torch.compile(flex_attention, dynamic=False)
    return _flex_compiled


def eager_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, dropout_p: float = 0.0
) -> torch.Tensor:
    """Reference attention on ``[b, h, s, d]``: fp32 scores and softmax, explicit boolean mask."""
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * (1.0 / math.sqrt(q.shape[-1]))
    scores = scores.masked_fill(~mask, torch.finfo(torch.float32).min)
    # A row with nothing visible (possible with explicit masks) outputs zeros, as SDPA does.
    probs = (torch.softmax(scores, dim=-1) * mask.any(dim=-1, keepdim=True)).to(v.dtype)
    if dropout_p > 0.0:
        probs = F.dropout(probs, p=dropout_p)
    return torch.matmul(probs, v)


def attention_core(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: AttentionMask,
    impl: str,
    dropout_p: float,
    tracker: RNGStatesTracker | None,
) -> torch.Tensor:
    """``softmax(q k^T / sqrt(d) + mask) v`` on ``[b, h, s, d]`` with the chosen kernel."""
    if impl == "flex" and (q.device.type != "cuda" or dropout_p > 0.0):
        impl = "sdpa"
    if impl == "flex":
        return _flex_attention()(q, k, v, block_mask=mask.block_mask)
    fork = tracker.fork(MODEL_PARALLEL_RNG) if (dropout_p > 0.0 and tracker is not None) else contextlib.nullcontext()
    with fork:
        if impl == "eager":
            return eager_attention(q, k, v, mask.bool_mask, dropout_p)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.bool_mask, dropout_p=dropout_p)


class ParallelSelfAttention(nn.Module):
    """GLM self-attention. Submodules ``query_key_value`` and ``dense`` carry the original names."""

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        *,
        attention_dropout: float,
        hidden_dropout: float,
        impl: str,
        qkv_init: InitMethod,
        dense_init: InitMethod,
        parallel_state: ParallelState,
        params_dtype: torch.dtype,
        device: torch.device | str | None,
    ) -> None:
        super().__init__()
        if impl not in ATTENTION_IMPLS:
            raise ValueError(f"attention_impl must be one of {ATTENTION_IMPLS}, got {impl!r}")
        if num_heads % parallel_state.tp_size:
            raise ValueError(f"{num_heads} heads do not split over tensor-parallel size {parallel_state.tp_size}")
        self.num_heads_per_rank = num_heads // parallel_state.tp_size
        self.head_dim = hidden_size // num_heads
        self.attention_dropout, self.impl = attention_dropout, impl
        self.recompute_core = False  # selective recomputation: keep only q, k, v for backward
        self.query_key_value = ColumnParallelLinear(
            hidden_size,
            3 * hidden_size,
            stride=3,
            init_method=qkv_init,
            parallel_state=parallel_state,
            params_dtype=params_dtype,
            device=device,
        )
        self.dense = RowParallelLinear(
            hidden_size,
            hidden_size,
            input_is_parallel=True,
            init_method=dense_init,
            parallel_state=parallel_state,
            params_dtype=params_dtype,
            device=device,
        )
        self.output_dropout = nn.Dropout(hidden_dropout)

    def forward(
        self,
        x: torch.Tensor,
        mask: AttentionMask,
        tracker: RNGStatesTracker | None = None,
        kv_cache: LayerKVCache | None = None,
        sequence_parallel: bool = False,
    ) -> torch.Tensor:
        """``x [b, s, H]`` -> ``[b, s, H]``.

        ``kv_cache`` (generation): this layer's cache. The new keys/values ``[b, h_r, s, d]`` are appended
        with ``kv_cache.update(k, v)``, which returns all keys/values so far ``[b, h_r, past + s, d]``;
        ``mask.bool_mask`` is then ``[b, 1, s, past + s]`` (flex falls back to sdpa).

        ``sequence_parallel``: ``x`` and the result are this rank's sequence shard ``[b, s/tp, H]``; the QKV
        projection all-gathers the sequence, the output projection reduce-scatters it.
        """
        qkv = self.query_key_value(x, sequence_parallel)  # [b, s, 3 * h_r * d] laid out as [q_r; k_r; v_r]
        b, s, _ = qkv.shape
        qkv = qkv.view(b, s, 3, self.num_heads_per_rank, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each [b, h_r, s, d]
        p = self.attention_dropout if self.training else 0.0
        impl = self.impl
        if kv_cache is not None:
            k, v = kv_cache.update(k, v)
            impl = "sdpa" if impl == "flex" else impl
        if self.recompute_core and kv_cache is None and self.training and torch.is_grad_enabled():

            def core(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
                return attention_core(q, k, v, mask, impl, p, tracker)

            ctx = checkpointed(core, tracker, q, k, v)
        else:
            ctx = attention_core(q, k, v, mask, impl, p, tracker)
        ctx = ctx.transpose(1, 2).reshape(b, s, self.num_heads_per_rank * self.head_dim)
        return sp.dropout(self.output_dropout, self.dense(ctx, sequence_parallel), tracker, sequence_parallel)
