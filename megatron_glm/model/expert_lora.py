"""LoRA on the routed experts of a Mixture-of-Experts layer: one adapter per expert, in the grouped computation.

An expert weight ``[E, out, in]`` (``experts.dense_h_to_4h`` ``[E, 2F, H]``, ``experts.dense_4h_to_h`` ``[E, H, F]``)
takes ``A [E, r, in]`` and ``B [E, out, r]`` (``<weight's module>.lora.A`` / ``.B``), expert ``e`` computing
``y_e = x W_e^T + (alpha / r) dropout(x) A_e^T B_e^T`` on its rows, so merging is ``W_e + (alpha / r) B_e A_e``
(:func:`~megatron_glm.model.lora.merge_lora`, batched over ``E``). Both are split over expert-parallel ranks along
the expert axis like the weight, and over tensor-parallel ranks as the dense adapters
(:mod:`megatron_glm.parallel.lora`):

- ``dense_h_to_4h`` (split along ``2F`` with its two GLU blocks): ``A`` replicated, entering through
  ``copy_to_tensor_parallel_region`` (each rank's gradient is partial, summed in backward); ``B`` split like ``W``.
- ``dense_4h_to_h`` (split along ``F``): ``A`` split along ``F``; each rank's ``x_r A_r^T B^T`` is partial, like
  its ``x_r W_r^T``, and summed by the MoE layer's own tensor-parallel reduction (so ``B`` enters through
  ``copy_to_tensor_parallel_region``: its gradient is summed over the group).

The products run through the experts' own grouped matmul (``GroupedExperts.linear``) on the rows grouped by expert
(``r`` padded with zeros to a 16-byte stride, which ``grouped_mm`` requires: e.g. ``r = 4`` in bf16).
Adapter dropout draws its mask for the rows this rank computes (the same for any TP size; under expert parallelism
the rows are another rank's, so EP = 1 and EP = 2 only agree without it).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from megatron_glm.model.moe import expert_parameter
from megatron_glm.model.tensor_spec import TensorSpec
from megatron_glm.parallel.lora import replicated_dropout, uniform_init
from megatron_glm.parallel.mappings import copy_to_tensor_parallel_region
from megatron_glm.parallel.state import ParallelState

GroupedLinear = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def expert_adapter_specs(name: str, weight: TensorSpec, rank: int) -> tuple[TensorSpec, TensorSpec]:
    """The full ``A [E, r, in]`` and ``B [E, out, r]`` of the adapter on expert weight ``weight`` (``[E, out, in]``,
    split along ``out`` or ``in``) and their tensor-parallel splits; ``name``: the adapter's prefix
    (``<linear>.lora``)."""
    experts, out_f, in_f = weight.shape
    column = weight.split_dim == 1
    common = {"expert_dim": 0, "experts": weight.experts}
    a = TensorSpec(f"{name}.A", (experts, rank, in_f), "weight", None if column else 2, **common)
    b = TensorSpec(
        f"{name}.B", (experts, out_f, rank), "weight", 1 if column else None, weight.blocks if column else 1, **common
    )
    return a, b


class ExpertLoRAAdapter(nn.Module):
    """Per-expert adapters of one grouped expert weight; ``forward`` returns this rank's part of the update of
    the rows grouped by expert (module docstring)."""

    def __init__(
        self,
        weight: TensorSpec,
        *,
        rank: int,
        alpha: float,
        dropout: float,
        seed: int,
        parallel_state: ParallelState,
        dtype: torch.dtype,
        device: Any,
    ) -> None:
        super().__init__()
        self.ps, self.rank, self.alpha, self.dropout = parallel_state, rank, alpha, dropout
        self.scaling = alpha / rank
        self.column = weight.split_dim == 1
        self.in_features = weight.shape[2]
        a_spec, b_spec = expert_adapter_specs("lora", weight, rank)
        ps = parallel_state
        self.A = expert_parameter(a_spec, uniform_init(self.in_features**-0.5, seed), ps, dtype, device)
        self.B = expert_parameter(b_spec, None, ps, dtype, device)
        for p, spec in ((self.A, a_spec), (self.B, b_spec)):
            p.lora_partition = None if spec.split_dim is None else (spec.split_dim, spec.blocks)
            p.lora_expert_dim = 0

    def forward(self, x: torch.Tensor, counts: torch.Tensor, linear: GroupedLinear) -> torch.Tensor:
        """``x [m, in]``: the rows grouped by expert as the weight sees them (row-parallel: this rank's slice of
        ``in``); ``counts [E_local]``; ``linear``: the experts' grouped matmul. Returns ``[m, out]`` (this rank's
        rows of ``out`` for ``dense_h_to_4h``, a partial sum for ``dense_4h_to_h``)."""
        ps = self.ps
        full_in = self.in_features
        x = replicated_dropout(x, self.dropout, self.training, full_in, 0 if self.column else ps.tp_rank)
        a, b = self.A, self.B
        if self.column:
            a = copy_to_tensor_parallel_region(a, ps.tp_group)
        else:
            b = copy_to_tensor_parallel_region(b, ps.tp_group)
        pad = -self.rank % (16 // a.element_size())  # grouped_mm wants 16-byte strides: r padded with zeros (exact)
        if pad:
            a, b = F.pad(a, (0, 0, 0, pad)), F.pad(b, (0, pad))
        return linear(linear(x, a, counts), b, counts) * self.scaling

    def extra_repr(self) -> str:
        kind = "column" if self.column else "row"
        return f"experts {kind}, r={self.rank}, alpha={self.alpha}, dropout={self.dropout}, tp={self.ps.tp_size}"
