"""The GLM model: embeddings, transformer stack, tied vocab-parallel head; and the steps of its forward.

:class:`GLMModel` is the whole model (training without pipeline parallelism, evaluation, generation). Its forward
is :func:`forward_context`, the embeddings, :func:`enter_sequence`, the transformer stack, :func:`leave_sequence`
and the loss of a :class:`~megatron_glm.model.objective.ModelOutput`; a pipeline part
(:class:`~megatron_glm.model.part.GLMPart`) runs the same steps on its share of the modules.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megatron_glm.config import ModelConfig
from megatron_glm.config.validate import family_problems
from megatron_glm.errors import ConfigError
from megatron_glm.model.attention import QueryRows
from megatron_glm.model.builders import known_options
from megatron_glm.model.context import ForwardContext, KVCacheLike
from megatron_glm.model.cp_attention import local_mask, use_context_parallel_dropout
from megatron_glm.model.layout import OUTPUT_TENSOR, VOCAB_TENSOR, ModelLayout
from megatron_glm.model.loss import GLMLoss, loss_positions
from megatron_glm.model.masks import AttentionMask, prepare_attention_mask
from megatron_glm.model.objective import LanguageModelLoss, LossBatch, LossFunction, ModelOutput
from megatron_glm.model.transformer import GLMTransformer
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


class OutputLayer(ColumnParallelLinear):
    """The untied head's layer. Called without input it returns its weight: the losses apply the head themselves
    (the fused head in chunks), and a weight read through the module's forward is what ZeRO-3 gathers and keeps
    for the backward (its hooks see the parameter leave the module), as the tied word embedding's is; a bare
    ``output_layer.weight`` read in the forward is released after it and its gradient meets an empty tensor."""

    def forward(self, x: torch.Tensor | None = None, sequence_parallel: bool = False) -> torch.Tensor:
        """``weight`` without ``x``; else the layer's ``x @ W.T`` (:class:`ColumnParallelLinear`)."""
        return self.weight if x is None else super().forward(x, sequence_parallel)


def output_layer(
    config: ModelConfig,
    layout: ModelLayout,
    parallel_state: ParallelState,
    seed: int,
    params_dtype: torch.dtype,
    device: torch.device | str | None,
) -> OutputLayer:
    """The untied head ``output_layer.weight [V, H]``, vocab-parallel (``h @ W.T`` for this rank's slice)."""
    return OutputLayer(
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


def rows_pay_off(ctx: ForwardContext, rows: QueryRows, b: int, s: int) -> bool:
    """Whether the last layer of a forward of ``ctx`` on ``b x s`` positions should run on ``rows`` only: not for a
    causal batch with loss on most rows, where the whole last layer (its attention skips the masked half) is
    faster than the rows' queries against a gathered boolean mask."""
    return not (ctx.mask.causal and 2 * rows.flat.numel() > b * s)


def forward_context(
    transformer: GLMTransformer,
    tracker: RNGStatesTracker,
    attention_mask: torch.Tensor | AttentionMask,
    position_ids: torch.Tensor | None,
    shape: tuple[int, int] | torch.Size,
    device: torch.device,
    sequence_parallel: bool = False,
    kv_cache: KVCacheLike | None = None,
    rows: QueryRows | None = None,
) -> ForwardContext:
    """The context of a forward of ``transformer`` on ``shape = (b, s)`` new positions (the whole sequence, also
    under sequence parallelism; this rank's positions under context parallelism): the prepared mask (over the cached
    positions too), the rotation of ``position_ids`` (rotary models), the dropout stream."""
    b, s = shape
    kv_seq = None if kv_cache is None else kv_cache.length + s
    cp = transformer.context_parallel
    if cp is not None:  # this rank's rows of the global mask (cp_attention)
        mask = local_mask(attention_mask, cp, b, s, torch.device(device))
    else:
        mask = prepare_attention_mask(attention_mask, b, s, device, kv_seq=kv_seq)
    return ForwardContext(
        mask=mask,
        tracker=tracker,
        rotary=transformer.rotary_for(position_ids),
        sequence_parallel=sequence_parallel,
        rows=rows,
        kv_cache=kv_cache,
        cp=cp,
    )


def enter_sequence(h: torch.Tensor, sequence_parallel: bool, parallel_state: ParallelState) -> torch.Tensor:
    """The embeddings ``[b, s, H]`` as the layers take them: this rank's sequence shard under sequence
    parallelism."""
    return scatter_to_sequence_parallel_region(h, parallel_state.tp_group) if sequence_parallel else h


def leave_sequence(h: torch.Tensor, sequence_parallel: bool, parallel_state: ParallelState) -> torch.Tensor:
    """The stack's output as the head takes it: the whole sequence again under sequence parallelism."""
    if not sequence_parallel:
        return h
    return gather_from_sequence_parallel_region(h, parallel_state.tp_group, reduce_grad=False)


def new_rng_tracker(seed: int, parallel_state: ParallelState, device: torch.device | str | None) -> RNGStatesTracker:
    """The tensor-parallel dropout stream (``model_parallel_seed(seed, tp_rank)``) on ``device`` (the host's for a
    model built on the meta device, whose weights are about to be loaded: seeding it has no side effect)."""
    on = torch.device(device) if device is not None else torch.device("cpu")
    tracker = RNGStatesTracker("cpu" if on.type == "meta" else on)
    tracker.add(MODEL_PARALLEL_RNG, model_parallel_seed(seed, parallel_state.tp_rank))
    return tracker


class HeadMixin:
    """The vocab-parallel head of a module holding ``config``, ``layout``, ``parallel_state`` and ``word_embeddings``
    (tied) or ``output_layer`` (untied): what a loss needs of it (:class:`~megatron_glm.model.objective.Head`)."""

    config: ModelConfig
    layout: ModelLayout
    parallel_state: ParallelState

    @property
    def head_chunk_size(self) -> int:
        """Rows per chunk of the head fused with the loss (0: the unfused head)."""
        return self.config.head_chunk_size

    @property
    def head_weight(self) -> torch.Tensor:
        """This rank's ``[V/tp, H]`` head: the word embedding (tied) or ``output_layer.weight`` (read through the
        layer's forward: :class:`OutputLayer`)."""
        return self.word_embeddings.weight if self.layout.tied_head else self.output_layer()

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """The head: ``h @ W.T`` for this rank's vocabulary slice (``W`` tied to the word embedding or not)."""
        return tied_logits(h, self.head_weight, self.parallel_state)


def _check_forward_inputs(
    labels: torch.Tensor | None,
    loss_mask: torch.Tensor | None,
    attention_mask: torch.Tensor | AttentionMask | None,
    position_ids: torch.Tensor | None,
) -> None:
    """``ValueError`` naming the missing argument of :meth:`GLMModel.forward`."""
    if (labels is None) != (loss_mask is None):
        raise ValueError("labels and loss_mask must be given together")
    if attention_mask is None:
        raise ValueError("attention_mask is required ([b] sep values or a [b, 1, s, s] boolean mask)")
    if position_ids is None:
        raise ValueError("position_ids [b, 2, s] is required")


class GLMModel(HeadMixin, nn.Module):
    """GLM (Du et al. 2022) with tensor parallelism.

    Args:
        config: the architecture; ``vocab_size`` must already be resolved (> 0, divisible by the TP size).
        parallel_state: groups and ranks (``None``: single process).
        seed: initialisation seed (weights identical for every TP size and pipeline split) and the seed of
            the tensor-parallel dropout stream (``model_parallel_seed(seed, tp_rank)``).
        params_dtype, device: parameter dtype and device (``None``: CPU).
        loss: what ``forward`` computes with labels (default: :class:`~megatron_glm.model.objective.LanguageModelLoss`).
    """

    def __init__(
        self,
        config: ModelConfig,
        parallel_state: ParallelState | None = None,
        *,
        seed: int = 1234,
        params_dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        loss: LossFunction | None = None,
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
        if self.transformer.context_parallel is not None:  # dropout masks drawn as with one rank
            use_context_parallel_dropout(self, self.transformer.context_parallel, self.sequence_parallel)
        self.loss: LossFunction = loss or LanguageModelLoss()
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
        objective: torch.Tensor | None = None,
        loss: LossFunction | None = None,
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
        :class:`~megatron_glm.model.loss.GLMLoss` of ``loss`` (default: the model's ``loss``, see
        :mod:`megatron_glm.model.objective`) instead of logits: ``loss(ModelOutput, LossBatch)``. The pretraining
        loss runs the head on the loss rows only, with ``config.head_chunk_size > 0`` fused into the cross entropy
        in chunks of that many rows (no ``[n, V]`` logits stored). ``loss_rows`` (optional, with ``labels``):
        :func:`loss_rows` of ``loss_mask``, computed on the host beforehand (no device sync). ``objective``
        (optional, ``[b]``): the samples' objective or row kind, for the loss.
        """
        _check_forward_inputs(labels, loss_mask, attention_mask, position_ids)
        word = self.word_embeddings(input_ids)
        h = self.transformer.embed(word, position_ids)
        if h.device.type != self.rng_tracker.device.type:  # moved with .to(); reseed on the new device
            self.rng_tracker = new_rng_tracker(self.seed, self.parallel_state, h.device)
        b, s = input_ids.shape
        batch = None if labels is None else LossBatch(labels, loss_mask, objective, loss_rows)
        seq_parallel = self.sequence_parallel and kv_cache is None
        mtp = batch is not None and self.config.num_nextn_predict_layers > 0  # the MTP layers read every row
        rows = None if kv_cache is not None or seq_parallel or mtp else self._loss_rows(batch, logit_positions, b, s)
        ctx = forward_context(
            self.transformer,
            self.rng_tracker,
            attention_mask,
            position_ids,
            (b, s),
            h.device,
            seq_parallel,
            kv_cache,
            rows,
        )
        positions = None if rows is None else rows.flat
        if rows is not None and not rows_pay_off(ctx, rows, b, s):
            # ... and the head on every row (the other rows weigh 0) than on an odd row count, which CPU bf16
            # matmuls run ~9% slower. Both exact.
            ctx, rows, positions = ctx.without_rows(), None, torch.arange(b * s, device=h.device)
        h, mtp_hidden = self._layers(h, word, ctx, seq_parallel, mtp)
        if batch is not None:
            if rows is None and positions is not None:  # the head on every row
                h = h.reshape(b * s, h.shape[-1])
            output = ModelOutput(h, self, positions, ctx.aux, mtp=mtp_hidden, mtp_weight=self.config.mtp_loss_weight)
            return (loss or self.loss)(output, batch)
        if rows is None and logit_positions is not None:
            h = h.reshape(b * s, h.shape[-1]).index_select(0, logit_positions)
        return self.logits(h)

    def _layers(
        self, h: torch.Tensor, word: torch.Tensor, ctx: ForwardContext, seq_parallel: bool, mtp: bool
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """The transformer stack on the embeddings ``h`` (whole sequence out, also under sequence parallelism) and,
        with ``mtp``, the MTP layers' hidden states (the final norm applied after they read the stack's output)."""
        h = self.transformer(enter_sequence(h, seq_parallel, self.parallel_state), ctx, final_norm=not mtp)
        mtp_hidden: tuple[torch.Tensor, ...] = ()
        if mtp:
            whole = leave_sequence(h, seq_parallel, self.parallel_state)
            mtp_hidden, h = self.transformer.mtp_outputs(whole, word, ctx), self.transformer.final_norm(h, ctx)
        return leave_sequence(h, seq_parallel, self.parallel_state), mtp_hidden

    def _loss_rows(
        self, batch: LossBatch | None, logit_positions: torch.Tensor | None, b: int, s: int
    ) -> QueryRows | None:
        """The rows the last layer computes with ``last_layer_loss_rows``: the loss rows (or the logit positions);
        ``None``: every row (the option off, or MoE training: the routers count and balance every token)."""
        if not self.config.last_layer_loss_rows or (self.config.num_experts > 0 and self.training):
            return None
        if batch is not None and batch.rows is not None:
            return batch.rows
        needed = logit_positions if batch is None else batch.positions()
        return None if needed is None else QueryRows.from_flat(needed, b, s)

    def compile_layers(self, **kwargs: object) -> None:
        """``torch.compile`` every transformer layer in place (names and state dict unchanged).

        On CPU (inductor + gcc) the first step pays ~20 s of compilation per distinct layer shape.
        """
        for layer in self.transformer.layers.values():
            layer.compile(**kwargs)


def check_config(config: ModelConfig, parallel_state: ParallelState) -> None:
    """One-line errors for a config the model cannot be built from."""
    ps = parallel_state
    if config.vocab_size <= 0:
        raise ValueError("config.vocab_size must be resolved (> 0) before building the model")
    if config.vocab_size % ps.tp_size:
        raise ValueError(f"vocab_size {config.vocab_size} is not divisible by the tensor-parallel size {ps.tp_size}")
    if config.hidden_size % config.num_attention_heads and not config.kv_channels:
        raise ValueError(f"hidden_size {config.hidden_size} is not divisible by {config.num_attention_heads} heads")
    unknown = sorted(set(config.extra_options) - known_options())
    if unknown:
        raise ConfigError(f"model.extra_options {unknown}: no builder reads them (known: {sorted(known_options())})")
    found = family_problems(config, ps.tp_size)
    if found:
        raise ValueError("; ".join(found))
