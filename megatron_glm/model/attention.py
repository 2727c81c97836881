"""Self-attention: fused QKV (column-parallel), a choice of attention kernels, row-parallel output.

Kernels (``ModelConfig.attention_impl``):

- ``sdpa``: ``F.scaled_dot_product_attention`` with the boolean mask built once per forward (no score
  tensor is materialised in our code; the kernel picks a fused implementation).
- ``flex``: ``flex_attention`` with a ``BlockMask`` built from the same mask function; used on CUDA only
  and when no attention dropout is active (flex has no dropout). Elsewhere it falls back to ``sdpa``.
- ``eager``: the reference; materialises the scores, softmax in fp32.

Under bf16/fp16, ``attention_softmax_in_fp32`` / ``apply_query_key_layer_scaling`` (GLM-130B, ChatGLM) use
:func:`layer_scaled_attention` instead: scores in the compute dtype scaled down by the layer number, multiplied
back and soft-maxed in fp32, as the originals do. In fp32 the kernels above already compute that.

Attention-probability dropout runs under ``tracker.fork()``: heads are split over tensor-parallel
ranks, so each rank draws its own stream.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from megatron_glm.config import ModelConfig
from megatron_glm.model import sequence_parallel as sp
from megatron_glm.model.cp_attention import attention_with_dropout
from megatron_glm.model.masks import AttentionMask
from megatron_glm.model.norms import make_norm
from megatron_glm.model.recompute import checkpointed
from megatron_glm.model.ring_attention import ring_attention
from megatron_glm.model.spec_linear import by_name, column_parallel, row_parallel
from megatron_glm.model.tensor_spec import TensorSpec, matrix_init, norm_tensors
from megatron_glm.parallel import RNGStatesTracker
from megatron_glm.parallel.random import MODEL_PARALLEL_RNG

if TYPE_CHECKING:
    from megatron_glm.model.builders import BuildContext
    from megatron_glm.model.context import ForwardContext

ATTENTION_IMPLS = ("sdpa", "flex", "eager")


class LayerKVCache(Protocol):
    """One layer's key/value cache (see ``megatron_glm.generation.kv_cache``)."""

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append ``[b, h_r, s, d]`` keys/values; return every cached key/value ``[b, h_r, past + s, d]``."""
        ...


@dataclass
class QueryRows:
    """The rows of a forward whose outputs are needed (e.g. the loss rows in the last layer): queries, the
    output projection and the MLP run on these rows only; keys and values still cover every row.

    ``flat [n]``: sorted flat indices into ``b * s``; ``index [b, m]``: each sample's rows (``m`` = the most
    of any sample; padded with row 0); ``slot [n]``: where ``flat``'s rows are in the flattened ``[b * m]``;
    ``seq``: ``s``.

    Dropout on the rows (:meth:`dropout`) draws the whole ``[b, s, ...]`` mask and keeps the rows' part, so
    the random streams and the kept rows' values are those of the full forward.
    """

    flat: torch.Tensor
    index: torch.Tensor
    slot: torch.Tensor
    seq: int

    @classmethod
    def from_flat(cls, flat: torch.Tensor, batch: int, seq: int) -> QueryRows:
        sample = torch.div(flat, seq, rounding_mode="floor")
        counts = torch.bincount(sample, minlength=batch)
        width = max(int(counts.max()), 1) if flat.numel() else 1
        rank = torch.arange(flat.numel(), device=flat.device) - (torch.cumsum(counts, 0) - counts)[sample]
        index = torch.zeros(batch, width, dtype=torch.long, device=flat.device)
        index[sample, rank] = flat - sample * seq
        return cls(flat, index, sample * width + rank, seq)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> QueryRows:
        """The same rows with their index tensors on ``device`` (a non-blocking copy from the host to a GPU goes
        through page-locked memory: from pageable memory CUDA would wait for the device first)."""
        device = torch.device(device)

        def move(t: torch.Tensor) -> torch.Tensor:
            if non_blocking and device.type == "cuda" and t.device.type == "cpu":
                t = t.pin_memory()
            return t.to(device, non_blocking=non_blocking)

        return QueryRows(move(self.flat), move(self.index), move(self.slot), self.seq)

    def select(self, x: torch.Tensor) -> torch.Tensor:
        """``x [b, s, ...]`` -> its rows ``[n, ...]``."""
        return x.reshape(-1, *x.shape[2:]).index_select(0, self.flat)

    def dropout(self, drop: nn.Dropout, y: torch.Tensor) -> torch.Tensor:
        """``drop`` of the full ``[b, s, H]`` tensor at these rows, given its rows ``y [n, H]``: the mask is
        drawn over ``[b, s, H]`` (the same draws as the full forward) and its rows applied to ``y``."""
        if not drop.training or drop.p == 0.0:
            return y
        noise = drop(torch.ones(self.index.shape[0], self.seq, y.shape[-1], dtype=y.dtype, device=y.device))
        return y * self.select(noise)


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


def layer_scaled_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, dropout_p: float, coeff: float
) -> torch.Tensor:
    """Megatron/GLM-130B attention in low precision: scores ``(q / (sqrt(d) coeff)) k^T`` in ``q``'s dtype,
    multiplied back by ``coeff`` (the layer number with query-key layer scaling, else 1) in fp32, fp32 softmax."""
    scores = torch.matmul(q * (1.0 / (math.sqrt(q.shape[-1]) * coeff)), k.transpose(-1, -2)).float() * coeff
    scores = scores.masked_fill(~mask, torch.finfo(torch.float32).min)
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
    fp32_coeff: float | None = None,
) -> torch.Tensor:
    """``softmax(q k^T / sqrt(d) + mask) v`` on ``[b, h, s, d]`` with the chosen kernel.

    ``fp32_coeff`` (not ``None``): :func:`layer_scaled_attention` with that coefficient instead of ``impl``.
    """
    if fp32_coeff is None and impl == "flex" and (q.device.type != "cuda" or dropout_p > 0.0):
        impl = "sdpa"
    if fp32_coeff is None and impl == "flex":
        return _flex_attention()(q, k, v, block_mask=mask.block_mask)
    fork = tracker.fork(MODEL_PARALLEL_RNG) if (dropout_p > 0.0 and tracker is not None) else contextlib.nullcontext()
    with fork:
        if fp32_coeff is not None:
            return layer_scaled_attention(q, k, v, mask.bool_mask, dropout_p, fp32_coeff)
        if impl == "eager":
            return eager_attention(q, k, v, mask.bool_mask, dropout_p)
        if mask.causal and q.shape[-2] == k.shape[-2]:  # the plain causal mask (no KV cache, no row subset)
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.bool_mask, dropout_p=dropout_p)


class ParallelSelfAttention(nn.Module):
    """GLM self-attention. Submodules ``query_key_value`` and ``dense`` carry the original names.

    Multi-head, or grouped-query with ``config.num_query_groups`` key/value groups (query head ``i`` uses group
    ``i // (heads / groups)``; each tensor-parallel rank holds whole groups). ``layer_number`` (1-based) is the
    query-key layer-scaling coefficient. ``qk_norm`` (GLM-4.5): ``q_norm`` / ``k_norm`` over each head's dims after
    the QKV split, before the rotary rotation (as transformers' ``Glm4MoeAttention``).
    """

    def __init__(self, ctx: BuildContext, tensors: Mapping[str, TensorSpec]) -> None:
        super().__init__()
        config, tp = ctx.config, ctx.parallel_state.tp_size
        impl = config.attention_impl
        self.tp_group = ctx.parallel_state.tp_group
        if impl not in ATTENTION_IMPLS:
            raise ValueError(f"attention_impl must be one of {ATTENTION_IMPLS}, got {impl!r}")
        heads, groups = config.num_attention_heads, config.query_groups
        if heads % tp or groups % tp:
            raise ValueError(f"{heads} heads / {groups} key-value groups do not split over tensor-parallel size {tp}")
        self.num_heads_per_rank, self.groups_per_rank = heads // tp, groups // tp
        self.head_dim = config.head_dim
        self.attention_dropout, self.impl = config.attention_dropout, impl
        self.layer_number = ctx.layer_number
        self.layer_scaling = config.apply_query_key_layer_scaling
        self.softmax_in_fp32 = config.attention_softmax_in_fp32 or config.apply_query_key_layer_scaling
        self.recompute_core = False  # selective recomputation: keep only q, k, v for backward
        self.query_key_value = column_parallel(ctx, tensors, "query_key_value")
        self.qkv_blocks = tensors["query_key_value.weight"].rank_block_sizes(tp)  # this rank's [Q_r; K_r; V_r]
        self.qk_norm = "q_norm.weight" in tensors
        if self.qk_norm:  # GLM-4.5: over each head's dims, replicated on every rank
            size = tensors["q_norm.weight"].shape[0]
            self.q_norm = make_norm(config, ctx.params_dtype, ctx.device, size=size)
            self.k_norm = make_norm(config, ctx.params_dtype, ctx.device, size=size)
        self.dense = row_parallel(ctx, tensors, "dense")
        self.output_dropout = nn.Dropout(ctx.branch_dropout)

    def _split_qkv(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``[b, s, (h_r + 2 g_r) d]`` packed as the builder declared (``qkv_blocks``: ``[q_r; k_r; v_r]``) ->
        ``[b, h_r, s, d]``, ``[b, g_r, s, d]`` x 2."""
        b, s, _ = qkv.shape
        blocks, d = self.qkv_blocks, self.head_dim
        if len(set(blocks)) == 1:  # equal blocks: one view
            return qkv.view(b, s, len(blocks), blocks[0] // d, d).permute(2, 0, 3, 1, 4).unbind(0)
        q, k, v = qkv.split(list(blocks), dim=-1)
        return tuple(t.reshape(b, s, -1, d).transpose(1, 2) for t in (q, k, v))

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """``x [b, s, H]`` -> ``[b, s, H]`` (``[n, H]`` with ``ctx.rows``: the queries at those rows only).

        ``ctx.kv_cache`` (generation): this layer's cache (``ctx.layer_cache``). The new keys/values
        ``[b, g_r, s, d]`` (after the rotary rotation) are appended with ``update(k, v)``, which returns all
        keys/values so far ``[b, g_r, past + s, d]``; ``mask.bool_mask`` is then ``[b, 1, s, past + s]`` (flex falls
        back to sdpa).

        ``ctx.sequence_parallel``: ``x`` and the result are this rank's sequence shard ``[b, s/tp, H]``; the QKV
        projection all-gathers the sequence, the output projection reduce-scatters it.

        ``ctx.rotary``: the rotation of this forward's positions (rotary models), applied to queries and keys.
        """
        mask, tracker, rotary, rows = ctx.mask, ctx.tracker, ctx.rotary, ctx.rows
        sequence_parallel, kv_cache = ctx.sequence_parallel, ctx.layer_cache(self.layer_number - 1)
        qkv = self.query_key_value(x, sequence_parallel)
        b = qkv.shape[0]
        q, k, v = self._split_qkv(qkv)
        if self.qk_norm:  # each rank normalises its own heads: the replicated weights' gradients are summed
            q = sp.layer_norm(self.q_norm, q, self.tp_group, True)
            k = sp.layer_norm(self.k_norm, k, self.tp_group, True)
        if rotary is not None:
            q, k = rotary.apply(q), rotary.apply(k)
        p = self.attention_dropout if self.training else 0.0
        impl = self.impl
        if kv_cache is not None:
            k, v = kv_cache.update(k, v)
            impl = "sdpa" if impl == "flex" else impl
        # Queries (and their mask rows) at the needed rows only, per sample. With attention dropout every row
        # is computed (the probabilities' mask is drawn over [b, h, s, s], as in the full forward) and the rows
        # are taken from the result.
        cp = ctx.cp
        ring = cp is not None and cp.comm == "ring" and p == 0.0  # keys and values around the group (no dropout)
        q_pos = None if cp is None else mask.q_positions
        core_on_rows = rows is not None and p == 0.0
        if core_on_rows:
            m = rows.index.shape[1]
            q = q.gather(2, rows.index[:, None, :, None].expand(b, q.shape[1], m, q.shape[3]))
            if ring:  # the rows' global positions, per sample
                q_pos = q_pos[rows.index]
            else:
                cols = mask.bool_mask.shape[-1]  # s, or every gathered key under context parallelism
                rows_mask = mask.bool_mask.gather(2, rows.index[:, None, :, None].expand(b, 1, m, cols))
                mask = AttentionMask(mask.mask_mod, b, m, rows_mask.device, _bool=rows_mask)
            impl = "sdpa" if impl == "flex" else impl
        if cp is not None and not ring:  # context parallelism: the keys and values of every position
            k, v = cp.gather(k, 2), cp.gather(v, 2)
            impl = "sdpa" if impl == "flex" else impl
        if self.groups_per_rank != self.num_heads_per_rank and not ring:  # the ring repeats per block
            rep = self.num_heads_per_rank // self.groups_per_rank
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        coeff = None
        if self.softmax_in_fp32 and q.dtype != torch.float32:  # in fp32 every kernel already is
            coeff = float(self.layer_number) if self.layer_scaling else 1.0

        def core(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            if ring:
                return ring_attention(q, k, v, mask.mask_mod, q_pos, cp, coeff)
            if cp is not None and p > 0.0:  # context parallelism: the attention-dropout mask of one rank
                return attention_with_dropout(q, k, v, mask, p, tracker, cp, coeff)
            return attention_core(q, k, v, mask, impl, p, tracker, coeff)

        if self.recompute_core and kv_cache is None and self.training and torch.is_grad_enabled():
            ctx = checkpointed(core, tracker, q, k, v)
        else:
            ctx = core(q, k, v)
        ctx = ctx.transpose(1, 2).reshape(b, ctx.shape[2], self.num_heads_per_rank * self.head_dim)
        if rows is None:
            return sp.dropout(self.output_dropout, self.dense(ctx, sequence_parallel), tracker, sequence_parallel)
        ctx = ctx.reshape(-1, ctx.shape[-1]).index_select(0, rows.slot) if core_on_rows else rows.select(ctx)
        return rows.dropout(self.output_dropout, self.dense(ctx))


def attention_tensors(config: ModelConfig) -> list[TensorSpec]:
    """``query_key_value`` (``[Q; K; V]`` over the rows: the query heads, then the key and the value groups; TP
    rank ``r`` holds ``[Q_r; K_r; V_r]``), [``q_norm``, ``k_norm`` over a head: ``qk_norm``], ``dense``."""
    h, d = config.hidden_size, config.head_dim
    q, kv = config.num_attention_heads * d, config.query_groups * d
    packing = {"block_sizes": (q, kv, kv)} if q != kv else {"blocks": 3}
    init = matrix_init(config, False, blocks=3, value_block=2)
    out = [TensorSpec("query_key_value.weight", (q + 2 * kv, h), "weight", 0, **packing, **init)]
    if config.add_qkv_bias:
        out.append(TensorSpec("query_key_value.bias", (q + 2 * kv,), "bias", 0, **packing))
    if config.qk_norm:
        out += norm_tensors(config, d, "q_norm") + norm_tensors(config, d, "k_norm")
    out.append(TensorSpec("dense.weight", (h, q), "weight", 1, **matrix_init(config, True)))
    if config.add_bias_linear:
        out.append(TensorSpec("dense.bias", (h,), "bias"))
    return out


class AttentionBuilder:
    """The ``attention`` slot: :func:`attention_tensors`, built as :class:`ParallelSelfAttention`."""

    def tensors(self, config: ModelConfig) -> list[TensorSpec]:
        return attention_tensors(config)

    def build(self, ctx: BuildContext) -> nn.Module:
        return ParallelSelfAttention(ctx, by_name(self.tensors(ctx.config)))
