"""The GLM MLP and its builder (the tensors it declares: ``dense_h_to_4h``, ``dense_4h_to_h``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from megatron_glm.config import ModelConfig
from megatron_glm.model import sequence_parallel as sp
from megatron_glm.model.spec_linear import by_name, column_parallel, row_parallel
from megatron_glm.model.tensor_spec import TensorSpec, matrix_init

if TYPE_CHECKING:
    from megatron_glm.model.builders import BuildContext
    from megatron_glm.model.context import ForwardContext


def mlp_tensors(config: ModelConfig) -> list[TensorSpec]:
    """``dense_h_to_4h`` (column-parallel; with a GLU activation ``[W1; W2]``, two blocks: rank ``r`` holds
    ``[W1_r; W2_r]``) and ``dense_4h_to_h`` (row-parallel), biases with ``add_bias_linear``."""
    h, f = config.hidden_size, config.ffn_size
    blocks = 2 if config.glu else 1
    init = matrix_init(config, False, blocks)
    out = [TensorSpec("dense_h_to_4h.weight", (blocks * f, h), "weight", 0, blocks, **init)]
    if config.add_bias_linear:
        out.append(TensorSpec("dense_h_to_4h.bias", (blocks * f,), "bias", 0, blocks))
    out.append(TensorSpec("dense_4h_to_h.weight", (h, f), "weight", 1, **matrix_init(config, True)))
    if config.add_bias_linear:
        out.append(TensorSpec("dense_4h_to_h.bias", (h,), "bias"))
    return out


class MLPBuilder:
    """The ``mlp`` slot: :func:`mlp_tensors`, built as :class:`ParallelMLP`."""

    def tensors(self, config: ModelConfig) -> list[TensorSpec]:
        return mlp_tensors(config)

    def build(self, ctx: BuildContext) -> nn.Module:
        return ParallelMLP(ctx, by_name(self.tensors(ctx.config)))


class ParallelMLP(nn.Module):
    """``H -> ffn`` (column-parallel) -> activation -> ``ffn -> H`` (row-parallel) -> dropout.

    ``gelu``: tanh GeLU. GLU activations (``dense_h_to_4h`` is ``[W1; W2]``, ``2 x ffn`` rows, each rank holding
    ``[W1_r; W2_r]``): ``swiglu`` = ``silu(x W1) * x W2`` (ChatGLM2), ``geglu`` = ``x W1 * gelu(x W2)`` with the
    exact GeLU (GLM-130B's GEGLU).
    """

    def __init__(self, ctx: BuildContext, tensors: Mapping[str, TensorSpec]) -> None:
        super().__init__()
        self.activation = ctx.config.activation
        self.dense_h_to_4h = column_parallel(ctx, tensors, "dense_h_to_4h")
        # this rank's packed blocks of dense_h_to_4h as declared ([W1_r; W2_r] with a GLU, one block otherwise)
        self.blocks = tensors["dense_h_to_4h.weight"].rank_block_sizes(ctx.parallel_state.tp_size)
        self.dense_4h_to_h = row_parallel(ctx, tensors, "dense_4h_to_h")
        self.dropout = nn.Dropout(ctx.branch_dropout)

    def _act(self, y: torch.Tensor) -> torch.Tensor:
        if self.activation == "gelu":
            return F.gelu(y, approximate="tanh")
        y1, y2 = y.split(self.blocks, dim=-1)
        if self.activation == "swiglu":
            return F.silu(y1) * y2
        return y1 * F.gelu(y2)

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """``x [b, s, H]``, or this rank's sequence shard ``[b, s/tp, H]`` with ``ctx.sequence_parallel``, or the
        rows ``[n, H]`` of a ``[b, s, H]`` input (``ctx.rows``: the dropout mask is drawn over ``[b, s, H]``)."""
        sequence_parallel = ctx.sequence_parallel
        y = self.dense_4h_to_h(self._act(self.dense_h_to_4h(x, sequence_parallel)), sequence_parallel)
        if ctx.rows is not None:
            return ctx.rows.dropout(self.dropout, y)
        return sp.dropout(self.dropout, y, ctx.tracker, sequence_parallel)
