"""The GLM model: embeddings, transformer stack, tied vocab-parallel head; and its pipeline parts.

:class:`GLMModel` is the whole model (training without pipeline parallelism, evaluation, generation).
:class:`GLMPart` is one layer of the model's pipeline order (``ModelLayout.pipe_layers``, by index): the
same modules with the same original names, built by the same constructors, so a chain of every part computes
what the whole model computes (``megatron_glm.training.pipeline`` hands the parts to DeepSpeed's pipeline).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megatron_glm.config import ModelConfig
from megatron_glm.config.validate import family_problems
from megatron_glm.model.attention import QueryRows
from megatron_glm.model.layout import OUTPUT_TENSOR, VOCAB_TENSOR, ModelLayout, PipeLayer
from megatron_glm.model.loss import GLMLoss, glm_loss_at, glm_loss_fused, loss_positions
from megatron_glm.model.masks import AttentionMask, prepare_attention_mask
from megatron_glm.model.transformer import GLMTransformer, KVCacheLike
from megatron_glm.parallel import (
    MODEL_PARALLEL_RNG,
    ColumnParallelLinear,
    ParallelState,
    RNGStatesTracker,
    VocabParallelEmbedding,
    copy_to_tensor_parallel_region,
    gather_from_sequence_parallel_region,
    model_parallel_seed,
    normal_init,
    scatter_to_sequence_parallel_region,
    stable_seed,
)
from megatron_glm.parallel.random import InitMethod, blockwise_normal_init


def init_method_for(name: str, layout: ModelLayout, seed: int) -> InitMethod:
    """The init of parameter ``name`` (original GLM state-dict name) as the layout says: N(0, init_std), output
    projections N(0, init_std / sqrt(2 L)), DeepNorm's scaled Xavier per packed block; drawn for the full tensor
    from a generator seeded by (seed, name)."""
    stds = layout.block_init_stds(name)
    if len(set(stds)) == 1:
        return normal_init(stds[0], stable_seed(seed, name))
    spec = layout[name]
    return blockwise_normal_init(stds, spec.sizes_along_split(), spec.split_dim or 0, stable_seed(seed, name))


def output_layer(
    config: ModelConfig,
    layout: ModelLayout,
    parallel_state: ParallelState,
    seed: int,
    params_dtype: torch.dtype,
    device: torch.device | str | None,
) -> ColumnParallelLinear:
    """The untied head ``output_layer.weight [V, H]``, vocab-parallel (``h @ W.T`` for this rank's slice)."""
    return ColumnParallelLinear(
        config.hidden_size,
        config.vocab_size,
        bias=False,
        init_method=init_method_for(OUTPUT_TENSOR, layout, seed),
        parallel_state=parallel_state,
        params_dtype=params_dtype,
        device=device,
    )


def word_embedding(
    config: ModelConfig,
    layout: ModelLayout,
    parallel_state: ParallelState,
    seed: int,
    params_dtype: torch.dtype,
    device: torch.device | str | None,
) -> VocabParallelEmbedding:
    """The vocab-parallel word embedding (also the tied head's weight)."""
    return VocabParallelEmbedding(
        config.vocab_size,
        config.hidden_size,
        init_method=init_method_for(VOCAB_TENSOR, layout, seed),
        parallel_state=parallel_state,
        params_dtype=params_dtype,
        device=device,
    )


def tied_logits(h: torch.Tensor, weight: torch.Tensor, parallel_state: ParallelState) -> torch.Tensor:
    """The tied head: ``h @ word_embeddings.T`` for this rank's vocabulary slice."""
    return F.linear(copy_to_tensor_parallel_region(h, parallel_state.tp_group), weight)


def loss_rows(loss_mask: torch.Tensor) -> QueryRows:
    """The rows carrying loss (``loss_mask != 0``) as :class:`QueryRows`. Their count is data-dependent: made from
    the loader's host tensor before the batch moves (``GLMModel.forward(loss_rows=...)``), they cost the device no
    synchronisation, where the model would otherwise wait twice per forward (``nonzero``, the widest sample)."""
    b, s = loss_mask.shape
    return QueryRows.from_flat(loss_positions(loss_mask), b, s)


def new_rng_tracker(seed: int, parallel_state: ParallelState, device: torch.device | str | None) -> RNGStatesTracker:
    """The tensor-parallel dropout stream (``model_parallel_seed(seed, tp_rank)``) on ``device`` (the host's for a
    model built on the meta device, whose weights are about to be loaded: seeding it has no side effect)."""
    on = torch.device(device) if device is not None else torch.device("cpu")
    tracker = RNGStatesTracker("cpu" if on.type == "meta" else on)
    tracker.add(MODEL_PARALLEL_RNG, model_parallel_seed(seed, parallel_state.tp_rank))
    return tracker


class GLMModel(nn.Module):
    """GLM (Du et al. 2022) with tensor parallelism.

    Args:
        config: the architecture; ``vocab_size`` must already be resolved (> 0, divisible by the TP size).
        parallel_state: groups and ranks (``None``: single process).
        seed: initialisation seed (weights identical for every TP size and pipeline split) and the seed of
            the tensor-parallel dropout stream (``model_parallel_seed(seed, tp_rank)``).
        params_dtype, device: parameter dtype and device (``None``: CPU).
    """

    def __init__(
        self,
        config: ModelConfig,
        parallel_state: ParallelState | None = None,
        *,
        seed: int = 1234,
        params_dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        ps = parallel_state or ParallelState()
        check_config(config, ps)
        self.config, self.parallel_state, self.seed = config, ps, seed
        self.layout = ModelLayout(config)
        self.word_embeddings = word_embedding(config, self.layout, ps, seed, params_dtype, device)
        self.transformer = GLMTransformer(
            config,
            layer_start=0,
            layer_end=config.num_layers,
            pre_process=True,
            post_process=True,
            init_for=lambda name: init_method_for(name, self.layout, seed),
            parallel_state=ps,
            params_dtype=params_dtype,
            device=device,
        )
        if not self.layout.tied_head:
            self.output_layer = output_layer(config, self.layout, ps, seed, params_dtype, device)
        self.rng_tracker = new_rng_tracker(seed, ps, device)
        # Sequence parallelism applies to training/eval forwards; generation (a KV cache) runs without it.
        self.sequence_parallel = config.sequence_parallel and ps.tp_size > 1
        # What backward will multiply the mean loss by (fp16: loss scale / accumulation; the trainer sets it):
        # the fused head computes its gradient in forward and rounds it to fp16 at this scale.
        self.head_grad_scale = 1.0

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | AttentionMask | None = None,
        *,
        kv_cache: KVCacheLike | None = None,
        logit_positions: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        loss_mask: torch.Tensor | None = None,
        loss_rows: QueryRows | None = None,
    ) -> torch.Tensor | GLMLoss:
        """Logits ``[b, s, V/tp]`` (or the loss, with ``labels`` and ``loss_mask``).

        ``input_ids``: token ids ``[b, s]``. ``position_ids``: ``[b, 2, s]`` (position, block position).
        ``attention_mask``: ``[b]`` integer ``sep`` (Part A length) or boolean ``[b, 1, s, s]``
        (True = may attend).

        ``kv_cache`` (generation, optional): a cache holding ``kv_cache.length`` earlier positions
        (``megatron_glm.generation.KVCache``); the ``s`` new positions attend to those and to each other,
        and their keys/values are appended. ``attention_mask`` is then ``[b, 1, s, length + s]``
        (a ``[b]`` sep tensor is accepted while the cache is empty). ``None`` (default): unchanged.

        ``logit_positions`` (training, optional): flat indices into ``b * s`` (e.g. the loss positions from
        :func:`~megatron_glm.model.loss.loss_positions`); the head then runs on those rows only and the
        logits are ``[n, V/tp]``. GLM's loss covers Part B only, so Part A rows never need the head.

        ``labels`` and ``loss_mask`` (training, optional, both ``[b, s]``): return the
        :class:`~megatron_glm.model.loss.GLMLoss` instead of logits, the head run on the loss rows only;
        with ``config.head_chunk_size > 0`` fused into the cross entropy in chunks of that many rows
        (:func:`~megatron_glm.model.loss.glm_loss_fused`, no ``[n, V]`` logits stored). ``loss_rows`` (optional,
        with ``labels``): :func:`loss_rows` of ``loss_mask``, computed on the host beforehand (no device sync).
        """
        if (labels is None) != (loss_mask is None):
            raise ValueError("labels and loss_mask must be given together")
        if attention_mask is None:
            raise ValueError("attention_mask is required ([b] sep values or a [b, 1, s, s] boolean mask)")
        if position_ids is None:
            raise ValueError("position_ids [b, 2, s] is required")
        h = self.transformer.embed(self.word_embeddings(input_ids), position_ids)
        rotary = self.transformer.rotary_for(position_ids)
        if h.device.type != self.rng_tracker.device.type:  # moved with .to(); reseed on the new device
            self.rng_tracker = new_rng_tracker(self.seed, self.parallel_state, h.device)
        group = self.parallel_state.tp_group
        seq_parallel = self.sequence_parallel and kv_cache is None
        b, s = h.shape[:2]
        rows = None
        loss_rows = loss_rows if labels is not None else None
        head_rows = None if loss_rows is None else loss_rows.flat
        mask = None if kv_cache is not None else prepare_attention_mask(attention_mask, b, s, h.device)
        if self.config.last_layer_loss_rows and kv_cache is None and not seq_parallel:
            rows = loss_rows
            if rows is None:
                needed = loss_positions(loss_mask) if labels is not None else logit_positions
                rows = None if needed is None else QueryRows.from_flat(needed, b, s)
            if rows is not None and mask.causal and 2 * rows.flat.numel() > b * s:
                # A causal batch with loss on most rows: the whole last layer (its attention skips the masked half)
                # is faster than the rows' queries against a gathered boolean mask, and the head on every row (the
                # other rows weigh 0) than on an odd row count, which CPU bf16 matmuls run ~9% slower. Both exact.
                rows, head_rows = None, torch.arange(b * s, device=h.device)
        if rows is not None:
            h = self.transformer(h, mask, self.rng_tracker, rotary=rotary, rows=rows)  # [n, H]: the needed rows
            if labels is not None:
                return self.head_loss_at(h, rows.flat, labels, loss_mask)
            return self.logits(h)
        if kv_cache is None:
            if seq_parallel:
                h = scatter_to_sequence_parallel_region(h, group)
                h = self.transformer(h, mask, self.rng_tracker, sequence_parallel=True, rotary=rotary)
                h = gather_from_sequence_parallel_region(h, group, reduce_grad=False)
            else:
                h = self.transformer(h, mask, self.rng_tracker, rotary=rotary)
        else:
            mask = prepare_attention_mask(attention_mask, b, s, h.device, kv_seq=kv_cache.length + s)
            h = self.transformer(h, mask, self.rng_tracker, kv_cache=kv_cache, rotary=rotary)
        if labels is not None:
            return self.head_loss(h, labels, loss_mask, head_rows)
        if logit_positions is not None:
            h = h.reshape(b * s, h.shape[-1]).index_select(0, logit_positions)
        return self.logits(h)

    def compile_layers(self, **kwargs: object) -> None:
        """``torch.compile`` every transformer layer in place (names and state dict unchanged).

        On CPU (inductor + gcc) the first step pays ~20 s of compilation per distinct layer shape.
        """
        for layer in self.transformer.layers.values():
            layer.compile(**kwargs)

    def head_loss(
        self, h: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor, positions: torch.Tensor | None = None
    ) -> GLMLoss:
        """The GLM loss of final hidden states ``h [b, s, H]``: the head on the ``loss_mask`` rows only (their
        flat ``positions``, found here when not given), fused and chunked when ``config.head_chunk_size > 0``."""
        b, s = labels.shape
        positions = loss_positions(loss_mask) if positions is None else positions
        return self.head_loss_at(h.reshape(b * s, h.shape[-1]).index_select(0, positions), positions, labels, loss_mask)

    def head_loss_at(
        self, rows: torch.Tensor, positions: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor
    ) -> GLMLoss:
        """:meth:`head_loss` of the final hidden states ``rows [n, H]`` at the loss ``positions``."""
        chunk = self.config.head_chunk_size
        if chunk <= 0:
            return glm_loss_at(self.logits(rows), positions, labels, loss_mask, self.parallel_state)
        rows = copy_to_tensor_parallel_region(rows, self.parallel_state.tp_group)
        return glm_loss_fused(
            rows,
            self.head_weight,
            positions,
            labels,
            loss_mask,
            self.parallel_state,
            chunk=chunk,
            grad_scale=self.head_grad_scale,
        )

    @property
    def head_weight(self) -> torch.Tensor:
        """This rank's ``[V/tp, H]`` head: the word embedding (tied) or ``output_layer.weight``."""
        return self.word_embeddings.weight if self.layout.tied_head else self.output_layer.weight

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """The head: ``h @ W.T`` for this rank's vocabulary slice (``W`` tied to the word embedding or not)."""
        return tied_logits(h, self.head_weight, self.parallel_state)


class GLMPart(nn.Module):
    """Pipe layer ``pipe`` of the model (see :class:`~megatron_glm.model.layout.ModelLayout`), holding exactly
    the tensors the layout puts there under their original names, initialised as in :class:`GLMModel`.
    ``tracker``: the tensor-parallel dropout stream, shared by the parts of one pipeline stage.

    - ``word_embedding`` / ``head``: ``word_embeddings`` (the tied weight); :meth:`embed_tokens` and
      :meth:`logits`. A head built on another stage than the word embedding starts from the same weights;
      the pipeline keeps the two identical (broadcast, gradients summed). An untied head holds
      ``output_layer`` instead.
    - ``position_embeddings``: :meth:`embed_positions` adds the position tables (none in rotary models), then
      embedding dropout.
    - ``layer``: :meth:`run_layers` on ``[b, s, H]`` hidden states with a ``[b]`` sep or boolean mask (and the
      position ids in rotary models).
    - ``final_norm``: :meth:`final_norm`.
    """

    def __init__(
        self,
        pipe: PipeLayer,
        config: ModelConfig,
        parallel_state: ParallelState | None = None,
        *,
        seed: int = 1234,
        tracker: RNGStatesTracker | None = None,
        params_dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        parallel_state = parallel_state or ParallelState()  # config checked once per model by its builder
        self.pipe, self.parallel_state = pipe, parallel_state
        self.tracker = tracker or new_rng_tracker(seed, parallel_state, device)  # shared by a stage's layers
        self.layout = layout = ModelLayout(config)
        if pipe.kind == "head" and not layout.tied_head:
            self.output_layer = output_layer(config, layout, parallel_state, seed, params_dtype, device)
            return
        if pipe.kind in ("word_embedding", "head"):
            self.word_embeddings = word_embedding(config, layout, parallel_state, seed, params_dtype, device)
            return
        start = end = 0 if pipe.kind == "position_embeddings" else config.num_layers
        if pipe.kind == "layer":
            start, end = pipe.layer, pipe.layer + 1
        self.transformer = GLMTransformer(
            config,
            layer_start=start,
            layer_end=end,
            pre_process=pipe.kind == "position_embeddings",
            post_process=pipe.kind == "final_norm",
            init_for=lambda name: init_method_for(name, layout, seed),
            parallel_state=parallel_state,
            params_dtype=params_dtype,
            device=device,
        )

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.word_embeddings(input_ids)

    def embed_positions(self, word: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        return self.transformer.embed(word, position_ids)

    def run_layers(
        self,
        h: torch.Tensor,
        attention_mask: torch.Tensor | AttentionMask,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``position_ids [b, 2, s]``: needed by rotary models only."""
        mask = prepare_attention_mask(attention_mask, h.shape[0], h.shape[1], h.device)
        return self.transformer(h, mask, self.tracker, rotary=self.transformer.rotary_for(position_ids))

    def final_norm(self, h: torch.Tensor) -> torch.Tensor:
        return self.transformer.final_layernorm(h)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        weight = self.word_embeddings.weight if self.layout.tied_head else self.output_layer.weight
        return tied_logits(h, weight, self.parallel_state)


def check_config(config: ModelConfig, parallel_state: ParallelState) -> None:
    """One-line errors for a config the model cannot be built from."""
    ps = parallel_state
    if config.vocab_size <= 0:
        raise ValueError("config.vocab_size must be resolved (> 0) before building the model")
    if config.vocab_size % ps.tp_size:
        raise ValueError(f"vocab_size {config.vocab_size} is not divisible by the tensor-parallel size {ps.tp_size}")
    if config.hidden_size % config.num_attention_heads and not config.kv_channels:
        raise ValueError(f"hidden_size {config.hidden_size} is not divisible by {config.num_attention_heads} heads")
    found = family_problems(config, ps.tp_size)
    if found:
        raise ValueError("; ".join(found))
