"""GLM transformer: the layers (pre-LN or the post-LN alpha/DeepNorm residual, GLM-4-0414's sandwich norms), each
assembled from the builders of ``megatron_glm.model.builders``, and the layer stack with activation checkpointing.

A stack holds layers ``[layer_start, layer_end)`` of the model (all of them, or a pipeline part) and keeps their
*global* indices: ``layers`` is a ``ModuleDict`` keyed by ``str(i)``, so state-dict names
(``transformer.layers.{i}.…``) and initialisation seeds do not depend on the pipeline split.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import nn

from megatron_glm.config import ModelConfig
from megatron_glm.model import sequence_parallel as sp
from megatron_glm.model.attention import QueryRows
from megatron_glm.model.builders import FINAL_NORM, BuildContext, all_slot_names, layer_slots, prefixed
from megatron_glm.model.context import ForwardContext, KVCacheLike
from megatron_glm.model.layout import LAYER_PREFIX
from megatron_glm.model.mtp import MTP_PREFIX, MTPLayer, run_mtp
from megatron_glm.model.norms import make_norm
from megatron_glm.model.recompute import checkpointed
from megatron_glm.model.rotary import RotaryPositions
from megatron_glm.parallel import ParallelState, RNGStatesTracker
from megatron_glm.parallel.context_parallel import ContextParallel
from megatron_glm.parallel.random import InitMethod

__all__ = ["GLMLayer", "GLMTransformer", "KVCacheLike", "make_norm"]


class GLMLayer(nn.Module):
    """One transformer layer on batch-first hidden states ``[b, s, H]``.

    ``pre_ln`` (GLM): ``h = h + Attn(N1(h)); h = h + MLP(N2(h))``.
    ``post_ln_alpha`` / ``deepnorm`` (ChatGLM-6B, GLM-130B): ``x = N1(h); h = alpha x + Attn(x);
    x = N2(h); h = alpha x + MLP(x)`` with ``alpha = sqrt(2 L)``: chained over layers this is DeepNorm's post-LN
    ``x = LN(alpha x + f(x))`` (the first norm normalises the embeddings, the final norm closes the last
    sub-layer), the form and tensors of the released code. The two differ in their initialisation only (layout).
    ``sandwich_norm`` (GLM-4-0414, pre_ln): ``h = h + D(N_pa(Attn(N1(h)))); h = h + D(N_pm(MLP(N2(h))))``, the
    hidden dropout ``D`` after the post-norms ``post_self_attn_layernorm`` / ``post_mlp_layernorm``.
    """

    def __init__(
        self,
        config: ModelConfig,
        layer_number: int,
        *,
        init: Callable[[str], InitMethod],
        parallel_state: ParallelState,
        params_dtype: torch.dtype,
        device: torch.device | str | None,
    ) -> None:
        """``init(name)``: the init of the layer's tensor ``name`` (relative to the layer). The parts are the
        enabled slots of :data:`~megatron_glm.model.builders.LAYER_SLOTS`, each built by its builder; a slot the
        architecture does not have is ``None``."""
        super().__init__()
        self.tp_group = parallel_state.tp_group
        self.alpha = None if config.residual_style == "pre_ln" else (2.0 * config.num_layers) ** 0.5
        sandwich = config.sandwich_norm
        for name in all_slot_names():
            setattr(self, name, None)
        for slot in layer_slots(config):
            ctx = BuildContext(
                config=config,
                layer_number=layer_number,
                init=prefixed(init, slot.name + "."),
                parallel_state=parallel_state,
                params_dtype=params_dtype,
                device=device,
                branch_dropout=0.0 if sandwich else config.hidden_dropout,  # sandwich: after the post-norm
            )
            setattr(self, slot.name, slot.builder_at(config, layer_number - 1).build(ctx))
        self.post_dropout = nn.Dropout(config.hidden_dropout) if sandwich else None

    def _post_norm(
        self,
        norm: nn.Module | None,
        y: torch.Tensor,
        tracker: RNGStatesTracker | None,
        sequence_parallel: bool,
        rows: QueryRows | None,
    ) -> torch.Tensor:
        """A sub-layer's output through its sandwich post-norm and the hidden dropout (``y`` as is without one)."""
        if norm is None:
            return y
        y = sp.layer_norm(norm, y, self.tp_group, sequence_parallel)
        if rows is not None:
            return rows.dropout(self.post_dropout, y)
        return sp.dropout(self.post_dropout, y, tracker, sequence_parallel)

    def forward(self, h: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """``ctx.sequence_parallel``: ``h`` is this rank's sequence shard ``[b, s/tp, H]`` (no ``kv_cache``).

        ``ctx.rows``: only those rows' outputs are computed (``[n, H]``); keys and values still cover every row.
        """
        sequence_parallel, rows, tracker = ctx.sequence_parallel, ctx.rows, ctx.tracker
        x = sp.layer_norm(self.input_layernorm, h, self.tp_group, sequence_parallel)
        a = self.attention(x, ctx)
        if rows is not None:
            h, x = rows.select(h), rows.select(x)
        a = self._post_norm(self.post_self_attn_layernorm, a, tracker, sequence_parallel, rows)
        h = h + a if self.alpha is None else self.alpha * x + a
        x = sp.layer_norm(self.post_attention_layernorm, h, self.tp_group, sequence_parallel)
        m = self.mlp(x, ctx)
        m = self._post_norm(self.post_mlp_layernorm, m, tracker, sequence_parallel, rows)
        return h + m if self.alpha is None else self.alpha * x + m


class GLMTransformer(nn.Module):
    """Position embeddings (first stage), layers ``[layer_start, layer_end)``, final norm (last stage).

    Submodule names are the original GLM ones: ``position_embeddings``, ``block_position_embeddings``,
    ``layers.{i}``, ``final_layernorm``.
    """

    def __init__(
        self,
        config: ModelConfig,
        *,
        layer_start: int,
        layer_end: int,
        pre_process: bool,
        post_process: bool,
        init_for: Callable[[str], InitMethod],
        parallel_state: ParallelState,
        params_dtype: torch.dtype,
        device: torch.device | str | None,
    ) -> None:
        super().__init__()
        hidden_size, max_sequence_length = config.hidden_size, config.max_sequence_length
        self.config = config
        self.pre_process, self.post_process = pre_process, post_process
        self.tp_group = parallel_state.tp_group
        # the hidden states: this rank's positions
        self.context_parallel = ContextParallel.of(parallel_state, config.context_parallel_comm)
        self.checkpoint_activations = config.checkpoint_activations
        self.checkpoint_num_layers = config.checkpoint_num_layers
        self.layer_start, self.layer_end = layer_start, layer_end
        self.embedding_dropout = nn.Dropout(config.hidden_dropout)
        self.block_position_encoding = config.block_position_encoding and not config.rotary
        self.embedding_grad_shrink = config.embedding_grad_shrink
        if pre_process and not config.rotary:
            self.position_embeddings = _embedding(
                max_sequence_length + 1,
                hidden_size,
                init_for("transformer.position_embeddings.weight"),
                params_dtype,
                device,
            )
            if self.block_position_encoding:
                self.block_position_embeddings = _embedding(
                    max_sequence_length + 1,
                    hidden_size,
                    init_for("transformer.block_position_embeddings.weight"),
                    params_dtype,
                    device,
                )
        self.layers = nn.ModuleDict()
        for i in range(layer_start, layer_end):
            self.layers[str(i)] = GLMLayer(
                config,
                i + 1,
                init=prefixed(init_for, LAYER_PREFIX.format(i)),
                parallel_state=parallel_state,
                params_dtype=params_dtype,
                device=device,
            )
        if config.recompute_granularity == "full":
            self.checkpoint_activations = True
        for layer in self.layers.values():
            layer.attention.recompute_core = config.recompute_granularity == "selective"
        if post_process:  # built by its builder from its declaration (``layout.final_tensors``)
            final = BuildContext(
                config=config,
                layer_number=config.num_layers,
                init=prefixed(init_for, f"transformer.{FINAL_NORM.name}."),
                parallel_state=parallel_state,
                params_dtype=params_dtype,
                device=device,
                branch_dropout=0.0,
            )
            self.final_layernorm = FINAL_NORM.builder.build(final)
        self.mtp: nn.ModuleList | None = None  # GLM-4.5's MTP layers, after the final norm (megatron_glm.model.mtp)
        if post_process and config.num_nextn_predict_layers:
            self.mtp = nn.ModuleList(
                _mtp_layer(config, k, init_for, parallel_state, params_dtype, device)
                for k in range(config.num_nextn_predict_layers)
            )

    def embed(self, word: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """Word embeddings (gradient shrunk by ``embedding_grad_shrink``) plus position (row 0) and block
        position (row 1) embeddings (none for rotary models), then dropout."""
        if position_ids.dim() != 3 or position_ids.shape[1] != 2:
            raise ValueError(f"position_ids must be [b, 2, s], got {list(position_ids.shape)}")
        alpha = self.embedding_grad_shrink
        if alpha != 1.0:
            word = alpha * word + (1.0 - alpha) * word.detach()
        if self.config.rotary:
            return self.embedding_dropout(word)
        h = word + self.position_embeddings(position_ids[:, 0])
        if self.block_position_encoding:
            h = h + self.block_position_embeddings(position_ids[:, 1])
        return self.embedding_dropout(h)

    def rotary_for(self, position_ids: torch.Tensor | None) -> RotaryPositions | None:
        """The rotation of ``position_ids [b, 2, s]`` for a rotary model (``None`` otherwise)."""
        if not self.config.rotary:
            return None
        if position_ids is None:
            raise ValueError("a rotary model's layers need position_ids [b, 2, s]")
        return RotaryPositions(self.config, position_ids)

    def forward(self, h: torch.Tensor, ctx: ForwardContext, *, final_norm: bool = True) -> torch.Tensor:
        """Layers ``[layer_start, layer_end)`` then the final norm (``post_process`` and ``final_norm``) on ``h``.

        ``ctx.kv_cache`` (generation): ``kv_cache.layer(i)`` is global layer ``i``'s cache.
        ``ctx.rows`` (no cache, no sequence parallelism): only those rows of the result are needed; the last
        layer computes its queries, output projection and MLP on them only and the result is ``[n, H]``.
        ``ctx.sequence_parallel``: ``h`` (and the result) is this rank's sequence shard ``[b, s/tp, H]``.
        """
        layers = list(self.layers.values())
        last, full = None, ctx.without_rows()
        if ctx.rows is not None:
            layers, last = layers[:-1], layers[-1] if layers else None
        if self.checkpoint_activations and ctx.kv_cache is None and self.training and torch.is_grad_enabled():
            k = self.checkpoint_num_layers
            for start in range(0, len(layers), k):
                chunk = layers[start : start + k]

                def run(x: torch.Tensor, chunk: list[GLMLayer] = chunk) -> torch.Tensor:
                    for layer in chunk:
                        x = layer(x, full)
                    return x

                h = checkpointed(run, ctx.tracker, h)
        else:
            for layer in layers:
                h = layer(h, full)
        if ctx.rows is not None:
            h = ctx.rows.select(h) if last is None else last(h, ctx)
        if not self.post_process or not final_norm:
            return h
        return self.final_norm(h, ctx)

    def final_norm(self, h: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """The final norm of the stack's output ``h`` (a sequence shard with ``ctx.sequence_parallel``)."""
        return sp.layer_norm(self.final_layernorm, h, self.tp_group, ctx.sequence_parallel)

    def mtp_outputs(self, h: torch.Tensor, word: torch.Tensor, ctx: ForwardContext) -> tuple[torch.Tensor, ...]:
        """The MTP layers' normed outputs (``megatron_glm.model.mtp``) from the stack's output ``h`` before the
        final norm and the word embeddings ``word`` of the input tokens, both the whole sequence ``[b, s, H]``;
        empty without MTP layers."""
        if self.mtp is None:
            return ()
        whole = dataclasses.replace(ctx, sequence_parallel=False, rows=None, kv_cache=None)
        return run_mtp(self.mtp, h, word, whole)


def _mtp_layer(
    config: ModelConfig,
    k: int,
    init_for: Callable[[str], InitMethod],
    parallel_state: ParallelState,
    params_dtype: torch.dtype,
    device: torch.device | str | None,
) -> MTPLayer:
    """MTP layer ``k`` with its decoder layer numbered ``num_layers + k + 1`` (the slots of the layer after the
    stack)."""
    init = prefixed(init_for, MTP_PREFIX.format(k))
    layer = GLMLayer(
        config,
        config.num_layers + k + 1,
        init=prefixed(init, "layer."),
        parallel_state=parallel_state,
        params_dtype=params_dtype,
        device=device,
    )
    layer.attention.recompute_core = config.recompute_granularity == "selective"
    return MTPLayer(config, layer, init=init, params_dtype=params_dtype, device=device)


def _embedding(
    rows: int, dim: int, init: InitMethod, dtype: torch.dtype, device: torch.device | str | None
) -> nn.Embedding:
    weight = torch.empty(rows, dim, dtype=dtype, device=device)
    init(weight)  # passing _weight skips nn.Embedding's own init (which would draw from the global RNG)
    return nn.Embedding(rows, dim, _weight=weight)
