"""GLM transformer: pre-LayerNorm layers, the MLP, and the layer stack with activation checkpointing.

A stack holds layers ``[layer_start, layer_end)`` of the model (all of them, or a pipeline part) and keeps their
*global* indices: ``layers`` is a ``ModuleDict`` keyed by ``str(i)``, so state-dict names
(``transformer.layers.{i}.…``) and initialisation seeds do not depend on the pipeline split.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from megatron_glm.config import ModelConfig
from megatron_glm.model import sequence_parallel as sp
from megatron_glm.model.attention import LayerKVCache, ParallelSelfAttention
from megatron_glm.model.layout import LAYER_PREFIX
from megatron_glm.model.masks import AttentionMask
from megatron_glm.model.recompute import checkpointed
from megatron_glm.parallel import ColumnParallelLinear, ParallelState, RNGStatesTracker, RowParallelLinear
from megatron_glm.parallel.random import InitMethod


class KVCacheLike(Protocol):
    """A key/value cache for the whole stack: ``layer(i)`` is global layer ``i``'s cache; ``length`` is the
    number of positions cached before the current forward."""

    @property
    def length(self) -> int: ...

    def layer(self, index: int) -> LayerKVCache: ...


class ParallelMLP(nn.Module):
    """``H -> 4H`` (column-parallel) -> tanh-GeLU -> ``4H -> H`` (row-parallel) -> dropout."""

    def __init__(
        self,
        hidden_size: int,
        *,
        hidden_dropout: float,
        in_init: InitMethod,
        out_init: InitMethod,
        parallel_state: ParallelState,
        params_dtype: torch.dtype,
        device: torch.device | str | None,
    ) -> None:
        super().__init__()
        self.dense_h_to_4h = ColumnParallelLinear(
            hidden_size,
            4 * hidden_size,
            init_method=in_init,
            parallel_state=parallel_state,
            params_dtype=params_dtype,
            device=device,
        )
        self.dense_4h_to_h = RowParallelLinear(
            4 * hidden_size,
            hidden_size,
            input_is_parallel=True,
            init_method=out_init,
            parallel_state=parallel_state,
            params_dtype=params_dtype,
            device=device,
        )
        self.dropout = nn.Dropout(hidden_dropout)

    def forward(
        self, x: torch.Tensor, tracker: RNGStatesTracker | None = None, sequence_parallel: bool = False
    ) -> torch.Tensor:
        """``x [b, s, H]``, or this rank's sequence shard ``[b, s/tp, H]`` with ``sequence_parallel``."""
        y = F.gelu(self.dense_h_to_4h(x, sequence_parallel), approximate="tanh")
        return sp.dropout(self.dropout, self.dense_4h_to_h(y, sequence_parallel), tracker, sequence_parallel)


class GLMLayer(nn.Module):
    """``h = h + Attn(LN1(h)); h = h + MLP(LN2(h))`` on batch-first hidden states ``[b, s, H]``."""

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        *,
        layernorm_epsilon: float,
        attention_dropout: float,
        hidden_dropout: float,
        attention_impl: str,
        init: dict[str, InitMethod],
        parallel_state: ParallelState,
        params_dtype: torch.dtype,
        device: torch.device | str | None,
    ) -> None:
        super().__init__()
        self.tp_group = parallel_state.tp_group
        ln = dict(eps=layernorm_epsilon, dtype=params_dtype, device=device)
        self.input_layernorm = nn.LayerNorm(hidden_size, **ln)
        self.attention = ParallelSelfAttention(
            hidden_size,
            num_heads,
            attention_dropout=attention_dropout,
            hidden_dropout=hidden_dropout,
            impl=attention_impl,
            qkv_init=init["attention.query_key_value"],
            dense_init=init["attention.dense"],
            parallel_state=parallel_state,
            params_dtype=params_dtype,
            device=device,
        )
        self.post_attention_layernorm = nn.LayerNorm(hidden_size, **ln)
        self.mlp = ParallelMLP(
            hidden_size,
            hidden_dropout=hidden_dropout,
            in_init=init["mlp.dense_h_to_4h"],
            out_init=init["mlp.dense_4h_to_h"],
            parallel_state=parallel_state,
            params_dtype=params_dtype,
            device=device,
        )

    def forward(
        self,
        h: torch.Tensor,
        mask: AttentionMask,
        tracker: RNGStatesTracker | None = None,
        kv_cache: LayerKVCache | None = None,
        sequence_parallel: bool = False,
    ) -> torch.Tensor:
        """``sequence_parallel``: ``h`` is this rank's sequence shard ``[b, s/tp, H]`` (no ``kv_cache``)."""
        x = sp.layer_norm(self.input_layernorm, h, self.tp_group, sequence_parallel)
        if kv_cache is None:
            h = h + self.attention(x, mask, tracker, sequence_parallel=sequence_parallel)
        else:
            h = h + self.attention(x, mask, tracker, kv_cache)
        x = sp.layer_norm(self.post_attention_layernorm, h, self.tp_group, sequence_parallel)
        return h + self.mlp(x, tracker, sequence_parallel)


class GLMTransformer(nn.Module):
    """Position embeddings (first stage), layers ``[layer_start, layer_end)``, final LayerNorm (last stage).

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
        layernorm_epsilon, hidden_dropout = config.layernorm_epsilon, config.hidden_dropout
        block_position_encoding = config.block_position_encoding
        self.pre_process, self.post_process = pre_process, post_process
        self.tp_group = parallel_state.tp_group
        self.checkpoint_activations = config.checkpoint_activations
        self.checkpoint_num_layers = config.checkpoint_num_layers
        self.layer_start, self.layer_end = layer_start, layer_end
        self.embedding_dropout = nn.Dropout(hidden_dropout)
        self.block_position_encoding = block_position_encoding
        if pre_process:
            self.position_embeddings = _embedding(
                max_sequence_length + 1,
                hidden_size,
                init_for("transformer.position_embeddings.weight"),
                params_dtype,
                device,
            )
            if block_position_encoding:
                self.block_position_embeddings = _embedding(
                    max_sequence_length + 1,
                    hidden_size,
                    init_for("transformer.block_position_embeddings.weight"),
                    params_dtype,
                    device,
                )
        self.layers = nn.ModuleDict()
        for i in range(layer_start, layer_end):
            prefix = LAYER_PREFIX.format(i)
            names = ("attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")
            init = {n: init_for(prefix + n + ".weight") for n in names}
            self.layers[str(i)] = GLMLayer(
                hidden_size,
                config.num_attention_heads,
                layernorm_epsilon=layernorm_epsilon,
                attention_dropout=config.attention_dropout,
                hidden_dropout=hidden_dropout,
                attention_impl=config.attention_impl,
                init=init,
                parallel_state=parallel_state,
                params_dtype=params_dtype,
                device=device,
            )
        if config.recompute_granularity == "full":
            self.checkpoint_activations = True
        for layer in self.layers.values():
            layer.attention.recompute_core = config.recompute_granularity == "selective"
        if post_process:
            self.final_layernorm = nn.LayerNorm(hidden_size, eps=layernorm_epsilon, dtype=params_dtype, device=device)

    def embed(self, word: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """Word embeddings plus position (row 0) and block position (row 1) embeddings, then dropout."""
        if position_ids.dim() != 3 or position_ids.shape[1] != 2:
            raise ValueError(f"position_ids must be [b, 2, s], got {list(position_ids.shape)}")
        h = word + self.position_embeddings(position_ids[:, 0])
        if self.block_position_encoding:
            h = h + self.block_position_embeddings(position_ids[:, 1])
        return self.embedding_dropout(h)

    def forward(
        self,
        h: torch.Tensor,
        mask: AttentionMask,
        tracker: RNGStatesTracker | None = None,
        kv_cache: KVCacheLike | None = None,
        sequence_parallel: bool = False,
    ) -> torch.Tensor:
        """``kv_cache`` (generation): ``kv_cache.layer(i)`` is global layer ``i``'s :class:`LayerKVCache`.

        ``sequence_parallel``: ``h`` (and the result) is this rank's sequence shard ``[b, s/tp, H]``.
        """
        sp_kw = {"sequence_parallel": True} if sequence_parallel else {}
        layers = list(self.layers.values())
        if kv_cache is not None:
            for key, layer in self.layers.items():
                h = layer(h, mask, tracker, kv_cache=kv_cache.layer(int(key)))
        elif self.checkpoint_activations and self.training and torch.is_grad_enabled():
            k = self.checkpoint_num_layers
            for start in range(0, len(layers), k):
                chunk = layers[start : start + k]

                def run(x: torch.Tensor, chunk: list[GLMLayer] = chunk) -> torch.Tensor:
                    for layer in chunk:
                        x = layer(x, mask, tracker, **sp_kw)
                    return x

                h = checkpointed(run, tracker, h)
        else:
            for layer in layers:
                h = layer(h, mask, tracker, **sp_kw)
        if not self.post_process:
            return h
        return sp.layer_norm(self.final_layernorm, h, self.tp_group, sequence_parallel)


def _embedding(
    rows: int, dim: int, init: InitMethod, dtype: torch.dtype, device: torch.device | str | None
) -> nn.Embedding:
    weight = torch.empty(rows, dim, dtype=dtype, device=device)
    init(weight)  # passing _weight skips nn.Embedding's own init (which would draw from the global RNG)
    return nn.Embedding(rows, dim, _weight=weight)
