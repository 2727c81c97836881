"""GLM transformer: the layers (pre-LN or the post-LN alpha/DeepNorm residual), the MLP, and the layer stack with
activation checkpointing.

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
from megatron_glm.model.attention import LayerKVCache, ParallelSelfAttention, QueryRows
from megatron_glm.model.layout import LAYER_PREFIX
from megatron_glm.model.masks import AttentionMask
from megatron_glm.model.norms import make_norm
from megatron_glm.model.recompute import checkpointed
from megatron_glm.model.rotary import RotaryPositions
from megatron_glm.parallel import ColumnParallelLinear, ParallelState, RNGStatesTracker, RowParallelLinear
from megatron_glm.parallel.random import InitMethod


class KVCacheLike(Protocol):
    """A key/value cache for the whole stack: ``layer(i)`` is global layer ``i``'s cache; ``length`` is the
    number of positions cached before the current forward."""

    @property
    def length(self) -> int: ...

    def layer(self, index: int) -> LayerKVCache: ...


class ParallelMLP(nn.Module):
    """``H -> ffn`` (column-parallel) -> activation -> ``ffn -> H`` (row-parallel) -> dropout.

    ``gelu``: tanh GeLU. GLU activations (``dense_h_to_4h`` is ``[W1; W2]``, ``2 x ffn`` rows, each rank holding
    ``[W1_r; W2_r]``): ``swiglu`` = ``silu(x W1) * x W2`` (ChatGLM2), ``geglu`` = ``x W1 * gelu(x W2)`` with the
    exact GeLU (GLM-130B's GEGLU).
    """

    def __init__(
        self,
        config: ModelConfig,
        *,
        in_init: InitMethod,
        out_init: InitMethod,
        parallel_state: ParallelState,
        params_dtype: torch.dtype,
        device: torch.device | str | None,
        hidden_dropout: float | None = None,
    ) -> None:
        super().__init__()
        hidden, ffn, self.activation = config.hidden_size, config.ffn_size, config.activation
        glu = config.glu
        self.dense_h_to_4h = ColumnParallelLinear(
            hidden,
            2 * ffn if glu else ffn,
            bias=config.add_bias_linear,
            stride=2 if glu else 1,
            init_method=in_init,
            parallel_state=parallel_state,
            params_dtype=params_dtype,
            device=device,
        )
        self.dense_4h_to_h = RowParallelLinear(
            ffn,
            hidden,
            bias=config.add_bias_linear,
            input_is_parallel=True,
            init_method=out_init,
            parallel_state=parallel_state,
            params_dtype=params_dtype,
            device=device,
        )
        self.dropout = nn.Dropout(config.hidden_dropout if hidden_dropout is None else hidden_dropout)

    def _act(self, y: torch.Tensor) -> torch.Tensor:
        if self.activation == "gelu":
            return F.gelu(y, approximate="tanh")
        y1, y2 = y.chunk(2, dim=-1)
        if self.activation == "swiglu":
            return F.silu(y1) * y2
        return y1 * F.gelu(y2)

    def forward(
        self,
        x: torch.Tensor,
        tracker: RNGStatesTracker | None = None,
        sequence_parallel: bool = False,
        rows: QueryRows | None = None,
    ) -> torch.Tensor:
        """``x [b, s, H]``, or this rank's sequence shard ``[b, s/tp, H]`` with ``sequence_parallel``, or the
        rows ``[n, H]`` of a ``[b, s, H]`` input (``rows``: the dropout mask is drawn over ``[b, s, H]``)."""
        y = self.dense_4h_to_h(self._act(self.dense_h_to_4h(x, sequence_parallel)), sequence_parallel)
        if rows is not None:
            return rows.dropout(self.dropout, y)
        return sp.dropout(self.dropout, y, tracker, sequence_parallel)


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
        init: dict[str, InitMethod],
        parallel_state: ParallelState,
        params_dtype: torch.dtype,
        device: torch.device | str | None,
    ) -> None:
        super().__init__()
        self.tp_group = parallel_state.tp_group
        self.alpha = None if config.residual_style == "pre_ln" else (2.0 * config.num_layers) ** 0.5
        sandwich = config.sandwich_norm
        inner_dropout = 0.0 if sandwich else None  # sandwich: the dropout comes after the post-norm
        self.input_layernorm = make_norm(config, params_dtype, device)
        self.attention = ParallelSelfAttention(
            config,
            layer_number,
            qkv_init=init["attention.query_key_value"],
            dense_init=init["attention.dense"],
            parallel_state=parallel_state,
            params_dtype=params_dtype,
            device=device,
            hidden_dropout=inner_dropout,
        )
        self.post_self_attn_layernorm = make_norm(config, params_dtype, device) if sandwich else None
        self.post_attention_layernorm = make_norm(config, params_dtype, device)
        self.mlp = ParallelMLP(
            config,
            in_init=init["mlp.dense_h_to_4h"],
            out_init=init["mlp.dense_4h_to_h"],
            parallel_state=parallel_state,
            params_dtype=params_dtype,
            device=device,
            hidden_dropout=inner_dropout,
        )
        self.post_mlp_layernorm = make_norm(config, params_dtype, device) if sandwich else None
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

    def forward(
        self,
        h: torch.Tensor,
        mask: AttentionMask,
        tracker: RNGStatesTracker | None = None,
        kv_cache: LayerKVCache | None = None,
        sequence_parallel: bool = False,
        rotary: RotaryPositions | None = None,
        rows: QueryRows | None = None,
    ) -> torch.Tensor:
        """``sequence_parallel``: ``h`` is this rank's sequence shard ``[b, s/tp, H]`` (no ``kv_cache``).

        ``rows``: only those rows' outputs are computed (``[n, H]``); keys and values still cover every row.
        """
        x = sp.layer_norm(self.input_layernorm, h, self.tp_group, sequence_parallel)
        if kv_cache is None:
            a = self.attention(x, mask, tracker, sequence_parallel=sequence_parallel, rotary=rotary, rows=rows)
        else:
            a = self.attention(x, mask, tracker, kv_cache, rotary=rotary)
        if rows is not None:
            h, x = rows.select(h), rows.select(x)
        a = self._post_norm(self.post_self_attn_layernorm, a, tracker, sequence_parallel, rows)
        h = h + a if self.alpha is None else self.alpha * x + a
        x = sp.layer_norm(self.post_attention_layernorm, h, self.tp_group, sequence_parallel)
        m = self.mlp(x, tracker, sequence_parallel, rows=rows)
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
            prefix = LAYER_PREFIX.format(i)
            names = ("attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")
            init = {n: init_for(prefix + n + ".weight") for n in names}
            self.layers[str(i)] = GLMLayer(
                config,
                i + 1,
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
            self.final_layernorm = make_norm(config, params_dtype, device)

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

    def forward(
        self,
        h: torch.Tensor,
        mask: AttentionMask,
        tracker: RNGStatesTracker | None = None,
        kv_cache: KVCacheLike | None = None,
        sequence_parallel: bool = False,
        rotary: RotaryPositions | None = None,
        rows: QueryRows | None = None,
    ) -> torch.Tensor:
        """``kv_cache`` (generation): ``kv_cache.layer(i)`` is global layer ``i``'s :class:`LayerKVCache`.

        ``rows`` (no ``kv_cache``, no sequence parallelism): only those rows of the result are needed; the last
        layer computes its queries, output projection and MLP on them only and the result is ``[n, H]``.

        ``sequence_parallel``: ``h`` (and the result) is this rank's sequence shard ``[b, s/tp, H]``.
        ``rotary``: the rotation of the positions (rotary models, :meth:`rotary_for`).
        """
        sp_kw: dict[str, object] = {"sequence_parallel": True} if sequence_parallel else {}
        if rotary is not None:
            sp_kw["rotary"] = rotary
        layers = list(self.layers.values())
        last = None
        if rows is not None:
            if kv_cache is not None or sequence_parallel:
                raise ValueError("rows needs a forward without a KV cache or sequence parallelism")
            layers, last = layers[:-1], layers[-1] if layers else None
        if kv_cache is not None:
            for key, layer in self.layers.items():
                h = layer(h, mask, tracker, kv_cache=kv_cache.layer(int(key)), rotary=rotary)
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
        if rows is not None:
            h = rows.select(h) if last is None else last(h, mask, tracker, rotary=rotary, rows=rows)
        if not self.post_process:
            return h
        return sp.layer_norm(self.final_layernorm, h, self.tp_group, sequence_parallel)


def _embedding(
    rows: int, dim: int, init: InitMethod, dtype: torch.dtype, device: torch.device | str | None
) -> nn.Embedding:
    weight = torch.empty(rows, dim, dtype=dtype, device=device)
    init(weight)  # passing _weight skips nn.Embedding's own init (which would draw from the global RNG)
    return nn.Embedding(rows, dim, _weight=weight)
