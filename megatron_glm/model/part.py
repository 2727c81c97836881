"""One layer of the model's pipeline order (``ModelLayout.pipe_layers``) and the activations between layers.

A :class:`GLMPart` holds exactly the tensors the layout puts in its pipe layer, under their original names,
built and initialised by the constructors of :class:`~megatron_glm.model.glm.GLMModel`, and runs the same forward
steps as the whole model (:func:`~megatron_glm.model.glm.forward_context`, ``enter_sequence`` / ``leave_sequence``,
the transformer stack over its layer range with its ``pre_process`` / ``post_process`` parts), so a chain of every
part computes what the whole model computes (``megatron_glm.training.pipeline`` hands the parts to DeepSpeed).

Activations between parts (:meth:`GLMPart.forward`) are one tuple for every architecture:
``(ids, position_ids, mask[, rows])`` into the word embedding, then ``(hidden, aux, position_ids, mask[, rows])``,
and a :class:`~megatron_glm.model.objective.ModelOutput` out of the head. With GLM-4.5's MTP layers (on the final
norm's part) the word embeddings of the input tokens travel as the fifth tensor instead of ``rows`` up to the final
norm, and the MTP layers' outputs (one tensor each) after the four from the final norm to the head. ``mask`` is the
``[b]`` sep or a
``[b, 1, s, s]`` boolean mask; ``hidden`` is this rank's sequence shard between the position embeddings and the
final norm under sequence parallelism; ``aux`` is the ``[max(1, len(aux_names))]`` fp32 accumulator of the
auxiliary loss terms (one slot per name), each stage adding its layers' terms. ``rows`` (training, optional): the
``[b, s]`` boolean loss rows; a last layer with :attr:`GLMPart.last_layer_rows` (``last_layer_loss_rows`` on the
stage of the head) computes those rows only, and hands on ``hidden [n, H]`` with ``rows`` their flat positions
``[n]`` (the head then runs on them as on the whole model's).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from megatron_glm.config import ModelConfig
from megatron_glm.model.attention import QueryRows
from megatron_glm.model.context import ForwardContext
from megatron_glm.model.cp_attention import use_context_parallel_dropout
from megatron_glm.model.glm import (
    HeadMixin,
    enter_sequence,
    forward_context,
    init_method_for,
    leave_sequence,
    new_rng_tracker,
    output_layer,
    rows_pay_off,
    word_embedding,
)
from megatron_glm.model.layout import ModelLayout, PipeLayer
from megatron_glm.model.loss import loss_positions
from megatron_glm.model.masks import AttentionMask
from megatron_glm.model.objective import ModelOutput
from megatron_glm.model.transformer import GLMTransformer
from megatron_glm.parallel import ParallelState, RNGStatesTracker

Activations = tuple[torch.Tensor, ...]


class GLMPart(HeadMixin, nn.Module):
    """Pipe layer ``pipe`` of the model (see :class:`~megatron_glm.model.layout.ModelLayout`).
    ``tracker``: the tensor-parallel dropout stream, shared by the parts of one pipeline stage. ``aux_names``: the
    auxiliary loss terms the model's layers may add (the slots of the activations' accumulator; same on every
    part).

    - ``word_embedding`` / ``head``: ``word_embeddings`` (the tied weight); :meth:`embed_tokens` and
      :meth:`logits`. A head built on another stage than the word embedding starts from the same weights;
      the pipeline keeps the two identical (broadcast, gradients summed). An untied head holds
      ``output_layer`` instead. :meth:`head_output` is the pipeline's head (its loss computes the logits).
    - ``position_embeddings``: :meth:`embed_positions` adds the position tables (none in rotary models), then
      embedding dropout.
    - ``layer``: :meth:`run_layers` on ``[b, s, H]`` hidden states.
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
        aux_names: tuple[str, ...] = (),
    ) -> None:
        super().__init__()
        parallel_state = parallel_state or ParallelState()  # config checked once per model by its builder
        self.pipe, self.parallel_state, self.config, self.aux_names = pipe, parallel_state, config, aux_names
        self.tracker = tracker or new_rng_tracker(seed, parallel_state, device)  # shared by a stage's layers
        self.layout = layout = ModelLayout(config)
        self.sequence_parallel = config.sequence_parallel and parallel_state.tp_size > 1
        self.head_grad_scale = 1.0  # as GLMModel's (the trainer sets it under fp16)
        # The model's last layer computes the loss rows only (set by the pipeline when the head is on its stage).
        self.last_layer_rows = False
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
        if self.transformer.context_parallel is not None:  # dropout masks drawn as with one rank (as GLMModel)
            use_context_parallel_dropout(self, self.transformer.context_parallel, self.sequence_parallel)

    # ------------------------------------------------------------ the steps, on plain tensors
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
        ctx = forward_context(self.transformer, self.tracker, attention_mask, position_ids, h.shape[:2], h.device)
        return self.transformer(h, ctx)

    def final_norm(self, h: torch.Tensor) -> torch.Tensor:
        return self.transformer.final_layernorm(h)

    # ------------------------------------------------------------ the activations protocol
    def forward(self, inputs: Activations) -> Activations | ModelOutput:
        """This part's step on the pipeline's activations (see the module docstring)."""
        kind = self.pipe.kind
        if kind == "word_embedding":
            ids, position_ids, mask, *rows = inputs
            slots = max(1, len(self.aux_names))
            aux = torch.zeros(slots, dtype=torch.float32, device=ids.device, requires_grad=torch.is_grad_enabled())
            word = self.embed_tokens(ids)
            if self.config.num_nextn_predict_layers:  # the MTP layers read every row: no loss rows
                return word, aux, position_ids, mask, word
            return word, aux, position_ids, mask, *rows
        if kind == "head":
            return self.head_output(inputs)
        h, aux, position_ids, mask, *carried = inputs
        sequence_parallel = self.sequence_parallel
        if kind == "position_embeddings":
            h = enter_sequence(self.embed_positions(h, position_ids), sequence_parallel, self.parallel_state)
            return h, aux, position_ids, mask, *carried
        if kind == "final_norm" and h.dim() == 2:  # the last layer's loss rows [n, H]: the final norm on them
            return self.final_norm(h), aux, position_ids, mask, *carried
        seq = h.shape[1] * (self.parallel_state.tp_size if sequence_parallel else 1)
        ctx = forward_context(
            self.transformer, self.tracker, mask, position_ids, (h.shape[0], seq), h.device, sequence_parallel
        )
        if self.last_layer_rows and carried:  # carried: the loss rows (never set with MTP layers)
            ctx, carried = self._on_loss_rows(ctx, carried, h.shape[0], seq)
        if kind != "final_norm":
            return self.transformer(h, ctx), self.add_aux(aux, ctx), position_ids, mask, *carried
        if self.config.num_nextn_predict_layers:  # the stack's output before the final norm, the word embeddings
            whole = leave_sequence(h, sequence_parallel, self.parallel_state)
            carried = list(self.transformer.mtp_outputs(whole, carried[0], ctx))
        h = leave_sequence(self.transformer(h, ctx), sequence_parallel, self.parallel_state)
        return h, self.add_aux(aux, ctx), position_ids, mask, *carried

    def _on_loss_rows(
        self, ctx: ForwardContext, rows: list[torch.Tensor], b: int, s: int
    ) -> tuple[ForwardContext, list[torch.Tensor]]:
        """``ctx`` on the loss rows ``rows[0]`` (``[b, s]`` boolean) and what to hand on: their flat positions; as
        the whole model does, unless the rows do not pay off (:func:`~megatron_glm.model.glm.rows_pay_off`)."""
        found = QueryRows.from_flat(loss_positions(rows[0]), b, s)
        if not rows_pay_off(ctx, found, b, s):
            return ctx, rows
        return dataclasses.replace(ctx, rows=found), [found.flat]

    def add_aux(self, aux: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """The accumulator ``aux`` plus the terms ``ctx`` collected (each in its name's slot)."""
        unknown = sorted(set(ctx.aux) - set(self.aux_names))
        if unknown:
            raise ValueError(f"auxiliary loss term(s) {unknown} not among the model's {list(self.aux_names)}")
        if not ctx.aux:
            return aux
        zero = aux.new_zeros(())
        return aux + torch.stack([ctx.aux.get(n, zero).to(aux).reshape(()) for n in self.aux_names])

    def head_output(self, inputs: Activations) -> ModelOutput:
        """The head's output: the final hidden states for the loss, with the auxiliary terms by name."""
        h, aux, _, _, *carried = inputs
        terms = {n: aux[i] for i, n in enumerate(self.aux_names)}
        if self.config.num_nextn_predict_layers:  # carried: the MTP layers' outputs
            mtp, weight = tuple(carried), self.config.mtp_loss_weight
            return ModelOutput(h, self, aux=terms, carrier=aux, mtp=mtp, mtp_weight=weight)
        positions = carried[0] if h.dim() == 2 else None  # the last layer ran on the loss rows at these positions
        return ModelOutput(h, self, positions, aux=terms, carrier=aux)
