"""GLM-4.5's Mixture-of-Experts MLP and its builder (the ``mlp`` slot of the layers from ``first_k_dense_replace``).

Tensors (relative to ``transformer.layers.{i}.mlp.``): ``router.weight [E, H]`` (TP-replicated, computed in fp32),
``router.expert_bias [E]`` (fp32, no gradient; with ``moe_router_bias``), ``experts.dense_h_to_4h.weight
[E, 2 F, H]`` (``[W_gate; W_up]`` per expert, two blocks split over TP along dim 1) and ``experts.dense_4h_to_h.weight
[E, H, F]`` (split along dim 2), both with the expert axis 0 (split over expert-parallel ranks), and
``shared_experts.dense_{h_to_4h,4h_to_h}.weight`` (a dense SwiGLU MLP of ``num_shared_experts x F``); ``F`` is
``moe_intermediate_size``.

Forward (``model/router.py`` for the routing equations): every token is routed on each tensor-parallel rank alike,
the (token, expert) pairs are grouped by expert by the dispatcher (``model/moe_dispatch.py``: the seam for expert
parallelism) and computed in two grouped matmuls (``torch.nn.functional.grouped_mm``; a loop over the experts'
row segments where it is missing), each row weighed by its routing weight between the two (on the experts' inner
``[m, F]`` rows, not their ``[m, H]`` outputs), the rows added up by token, summed over tensor-parallel ranks (each
holds a slice of every expert's ``F``, as the dense MLP), plus the shared experts' output. No token is dropped unless
``moe_capacity_factor`` is set.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from megatron_glm.config import ModelConfig
from megatron_glm.model import sequence_parallel as sp
from megatron_glm.model.mlp import ParallelMLP
from megatron_glm.model.moe_dispatch import LocalDispatcher, TokenDispatcher
from megatron_glm.model.router import Router, sequence_balance_loss
from megatron_glm.model.spec_linear import by_name
from megatron_glm.model.tensor_spec import TensorSpec, matrix_init, relative
from megatron_glm.parallel import (
    copy_to_tensor_parallel_region,
    gather_from_sequence_parallel_region,
    reduce_from_tensor_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
)
from megatron_glm.parallel.expert_dispatch import ExpertDispatcher
from megatron_glm.parallel.layers import _sharded_parameter
from megatron_glm.parallel.random import InitMethod
from megatron_glm.parallel.state import ParallelState

if TYPE_CHECKING:
    from megatron_glm.model.builders import BuildContext
    from megatron_glm.model.context import ForwardContext

AUX_LOSS_NAME = "moe_aux"


def moe_ffn(config: ModelConfig) -> int:
    """An expert's inner size (``moe_intermediate_size``, or ``ffn_hidden_size`` when 0)."""
    return config.moe_intermediate_size or config.ffn_size


def is_moe_layer(config: ModelConfig, layer: int) -> bool:
    """Whether 0-based layer ``layer`` has the MoE MLP (``num_experts`` > 0, not one of the first k dense)."""
    return config.num_experts > 0 and layer >= config.first_k_dense_replace


def moe_layer_position(config: ModelConfig, layer: int) -> int:
    """How many MoE layers come before 0-based layer ``layer`` (the MTP layers numbered after the stack): the
    position of that layer's router among the model's, the same under any pipeline split."""
    return sum(is_moe_layer(config, i) for i in range(layer))


def moe_layer_count(config: ModelConfig) -> int:
    """The model's MoE layers, its MTP layers included."""
    return moe_layer_position(config, config.num_layers + config.num_nextn_predict_layers)


def shared_expert_tensors(config: ModelConfig) -> list[TensorSpec]:
    """The shared experts as one dense SwiGLU MLP (names relative to ``shared_experts.``)."""
    h, f = config.hidden_size, moe_ffn(config) * config.num_shared_experts
    return [
        TensorSpec("dense_h_to_4h.weight", (2 * f, h), "weight", 0, 2, **matrix_init(config, False)),
        TensorSpec("dense_4h_to_h.weight", (h, f), "weight", 1, **matrix_init(config, True)),
    ]


def moe_tensors(config: ModelConfig) -> list[TensorSpec]:
    """The MoE MLP's tensors (module docstring), in module order."""
    h, e, f = config.hidden_size, config.num_experts, moe_ffn(config)
    out = [TensorSpec("router.weight", (e, h), "weight", **matrix_init(config, False))]
    if config.moe_router_bias:
        out.append(TensorSpec("router.expert_bias", (e,), "bias", dtype="fp32"))
    out += [
        TensorSpec(
            "experts.dense_h_to_4h.weight", (e, 2 * f, h), "weight", 1, 2, expert_dim=0, experts=e, init="normal"
        ),
        TensorSpec(
            "experts.dense_4h_to_h.weight", (e, h, f), "weight", 2, expert_dim=0, experts=e, init="scaled_normal"
        ),
    ]
    if config.num_shared_experts:
        out += relative(shared_expert_tensors(config), "shared_experts.")
    return out


class MoEBuilder:
    """The ``mlp`` slot of an MoE layer: :func:`moe_tensors`, built as :class:`MoEMLP`."""

    def tensors(self, config: ModelConfig) -> list[TensorSpec]:
        return moe_tensors(config)

    def build(self, ctx: BuildContext) -> nn.Module:
        return MoEMLP(ctx, by_name(self.tensors(ctx.config)))


def _expert_parameter(ctx: BuildContext, spec: TensorSpec, name: str) -> nn.Parameter:
    return expert_parameter(spec, ctx.init(name), ctx.parallel_state, ctx.params_dtype, ctx.device)


def expert_parameter(
    spec: TensorSpec, init: InitMethod | None, ps: ParallelState, dtype: torch.dtype, device: Any
) -> nn.Parameter:
    """The full expert tensor drawn (as every parameter: same seed, same model for any layout), this rank's
    tensor-parallel slice along ``split_dim`` (packed blocks kept; ``None``: replicated, e.g. a LoRA adapter's) and
    its experts along ``expert_dim`` (0)."""
    split = spec.split_dim is not None
    tp_ps = ps if split else ParallelState()
    param = _sharded_parameter(spec.shape, spec.split_dim or 0, spec.blocks, init, tp_ps, dtype, device)
    if ps.ep_size > 1:
        local = spec.experts // ps.ep_size
        param = nn.Parameter(param.data.narrow(0, ps.ep_rank * local, local).clone())
        param.tensor_model_parallel, param.partition_dim = split and ps.tp_size > 1, spec.split_dim
    param.expert = True  # reduced over the expert-data-parallel group, not the data-parallel one
    return param


class _Weight(nn.Module):
    def __init__(self, weight: nn.Parameter) -> None:
        super().__init__()
        self.weight = weight
        self.register_module("lora", None)  # LoRA: per-expert adapters (model/expert_lora.py), added in forward


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """``x [m, in]`` rows grouped by expert (``counts [E]`` rows each) times each expert's ``weight [E, out, in]``
    transposed: one grouped matmul (``F.grouped_mm``), or a loop over the experts' row segments without it."""
    if hasattr(F, "grouped_mm"):
        offs = torch.cumsum(counts, 0, dtype=torch.int32)
        return _ContiguousGrad.apply(F.grouped_mm(x, weight.transpose(1, 2), offs=offs))
    return looped_linear(x, weight, counts)


def looped_linear(x: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """:func:`grouped_linear` as a loop over the experts (one host synchronisation for the counts)."""
    parts = torch.split(x, counts.tolist())
    return torch.cat([p @ w.t() for p, w in zip(parts, weight, strict=True)])


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose incoming gradient is made contiguous (``grouped_mm``'s backward refuses expanded ones)."""

    @staticmethod
    def forward(ctx, y):
        return y.view_as(y)

    @staticmethod
    def backward(ctx, g):
        return g.contiguous()


class _SwiGLU(torch.autograd.Function):
    """``silu(gate) * up`` of ``h = [gate | up]``, times each row's routing weight ``w [m]`` when given (an expert's
    output is linear in it: weighing its ``[m, F]`` inner rows instead of its ``[m, H]`` output rows spares the
    combine an ``[m, H]`` product, which its backward also needed, and the ``[m, H]`` output kept for the weights'
    gradient). The backward keeps only ``h`` and ``w`` (not ``silu(gate)``) and writes both halves' gradients into
    one ``[m, 2F]`` tensor (no concatenation): into ``h`` itself with ``reuse`` (``h`` an intermediate that nothing
    else keeps; the backward then runs once). Without ``w`` and ``reuse``, the same operations as autograd's."""

    @staticmethod
    def forward(ctx, h, w=None, reuse=False):
        gate, up = h.chunk(2, dim=-1)
        ctx.save_for_backward(h, w)
        ctx.reuse, ctx.backward_done = reuse, False
        out = F.silu(gate).mul_(up)
        return out if w is None else out.mul_(w.to(h.dtype).unsqueeze(-1))  # h's dtype: mixed ones run ~25x slower

    @staticmethod
    def backward(ctx, grad):
        if ctx.backward_done and ctx.reuse:
            raise RuntimeError("grouped SwiGLU: backward runs once (retain_graph is not supported)")
        ctx.backward_done = True
        h, w = ctx.saved_tensors
        gate, up = h.chunk(2, dim=-1)
        act, d_w = F.silu(gate), None
        if w is not None:
            if ctx.needs_input_grad[1]:  # d w_i = <grad_i, silu(gate_i) up_i>, summed in fp32
                d_w = (act * up).mul_(grad).sum(-1, dtype=torch.float32).to(w.dtype)
            grad = grad * w.to(grad.dtype).unsqueeze(-1)
        gu = grad * up
        out = h if ctx.reuse else torch.empty_like(h)
        d_gate, d_up = out.chunk(2, dim=-1)
        torch.mul(grad, act, out=d_up)
        torch.ops.aten.silu_backward.grad_input(gu, gate, grad_input=d_gate)
        return out, d_w, None


class GroupedExperts(nn.Module):
    """This rank's experts (its slice of each one's ``F`` under TP): SwiGLU on rows grouped by expert."""

    def __init__(self, ctx: BuildContext, tensors: dict[str, TensorSpec]) -> None:
        super().__init__()
        for part in ("dense_h_to_4h", "dense_4h_to_h"):
            name = f"experts.{part}.weight"
            setattr(self, part, _Weight(_expert_parameter(ctx, tensors[name], name)))
        self.linear, self.ps = grouped_linear, ctx.parallel_state

    def forward(self, x: torch.Tensor, counts: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        """``x [m, H]`` grouped by expert (``counts [E_local]``), each row's output times ``weights [m]`` if given
        (the weight scales the inner rows: the down projection and its adapter are linear)."""
        h = self._project(self.dense_h_to_4h, x, counts)
        return self._project(self.dense_4h_to_h, _SwiGLU.apply(h, weights, True), counts)

    def _project(self, part: _Weight, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        y = self.linear(x, part.weight, counts)
        return y if part.lora is None else y + part.lora(x, counts, self.linear)


class MoEMLP(nn.Module):
    """Router, routed experts behind a :class:`~megatron_glm.model.moe_dispatch.TokenDispatcher`, shared experts
    (module docstring). ``dispatcher`` may be replaced (expert parallelism's all-to-all)."""

    def __init__(self, ctx: BuildContext, tensors: dict[str, TensorSpec]) -> None:
        super().__init__()
        config, ps = ctx.config, ctx.parallel_state
        self.tp_group, self.top_k, self.aux_coeff = ps.tp_group, config.moe_top_k, config.moe_aux_loss_coeff
        weight = torch.empty(tensors["router.weight"].shape, dtype=torch.float32)
        ctx.init("router.weight")(weight)
        bias = torch.zeros(config.num_experts, dtype=torch.float32) if config.moe_router_bias else None
        device = ctx.device if ctx.device is not None else "cpu"
        self.router = Router(
            config, weight.to(device=device, dtype=ctx.params_dtype), None if bias is None else bias.to(device)
        )
        self.router.position = moe_layer_position(config, ctx.layer_number - 1)
        self.experts = GroupedExperts(ctx, tensors)
        self.dispatcher: TokenDispatcher = (
            ExpertDispatcher(config.num_experts, ps)  # all-to-all over the expert-parallel group
            if ps.ep_size > 1
            else LocalDispatcher(config.num_experts, config.moe_capacity_factor)
        )
        self.shared_experts = None
        if config.num_shared_experts:
            shared = by_name(shared_expert_tensors(config))
            sctx = dataclasses.replace(ctx, init=lambda n: ctx.init("shared_experts." + n), branch_dropout=0.0)
            self.shared_experts = ParallelMLP(sctx, shared)
        self.dropout = nn.Dropout(ctx.branch_dropout)

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """``x [b, s, H]``, this rank's sequence shard ``[b, s/tp, H]`` (``ctx.sequence_parallel``), or rows
        ``[n, H]`` (``ctx.rows``: evaluation and generation only; training routes every row)."""
        group, seq_par = self.tp_group, ctx.sequence_parallel
        batch = x.shape[0] if x.dim() == 3 else 1
        tokens = x.reshape(-1, x.shape[-1])
        weight = copy_to_tensor_parallel_region(self.router.weight, group) if seq_par else None
        routing = self.router(tokens, weight)
        ids, w = routing.expert_ids, routing.weights
        if seq_par:  # route the local shard, compute every token of the sequence (the experts' F is split)
            k = self.top_k
            tokens = gather_from_sequence_parallel_region(x, group).reshape(-1, x.shape[-1])
            ids = gather_from_sequence_parallel_region(ids.view(batch, -1, k), group).reshape(-1, k)
            w = gather_from_sequence_parallel_region(w.view(batch, -1, k), group).reshape(-1, k)
        else:
            tokens, w = copy_to_tensor_parallel_region(tokens, group), copy_to_tensor_parallel_region(w, group)
        self.router.count(ids)
        if self.aux_coeff > 0 and self.training:
            shards = 1 if not seq_par or group is None else torch.distributed.get_world_size(group)
            routing = routing._replace(expert_ids=ids)
            balance = sequence_balance_loss(routing, batch, self.top_k, group, shards)
            ctx.add_aux(AUX_LOSS_NAME, self.aux_coeff * balance)
        grouped, counts, handle = self.dispatcher.dispatch(tokens, ids)
        rows = self.experts(grouped, counts, self.dispatcher.row_weights(w, handle))  # weighted by the experts
        y = self.dispatcher.combine(rows, handle, None)
        if seq_par:
            y = reduce_scatter_to_sequence_parallel_region(y.view(batch, -1, y.shape[-1]), group)
        else:
            y = reduce_from_tensor_parallel_region(y, group)
        y = y.view(x.shape)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x, ctx)
        if ctx.rows is not None:
            return ctx.rows.dropout(self.dropout, y)
        return sp.dropout(self.dropout, y, ctx.tracker, seq_par)
