"""The MoE routers' per-expert load as the trainer logs it (``moe_load_*``:
:func:`~megatron_glm.model.router.load_metrics`), covering every MoE layer of the model.

After each step :meth:`ExpertLoad.update` applies the aux-loss-free bias update (its one all-reduce over the
data-parallel group) and keeps each router's load fractions on the device, keyed by the router's place among the
model's MoE layers (:func:`~megatron_glm.model.moe.moe_layer_position`). Under pipeline parallelism a stage holds
only some routers: at a log step :meth:`ExpertLoad.values` lays this rank's fractions out at their layers' places,
with a count per layer, and these ride on the trainer's one world sum of the logged values (no collective of
their own, none on a step that is not logged); :meth:`ExpertLoad.metrics` divides the summed fractions by the
counts (the ranks holding a layer agree on its fractions, so the mean is theirs exactly).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from megatron_glm.config import ModelConfig
from megatron_glm.model.moe import moe_layer_count
from megatron_glm.model.router import load_metrics, routers, update_expert_bias


@dataclass
class ExpertLoad:
    """The last step's per-expert load fractions of this rank's routers (``[experts]`` fp32 each, by place)."""

    layers: int = 0
    experts: int = 0
    fractions: dict[int, torch.Tensor] = field(default_factory=dict)

    @classmethod
    def of(cls, config: ModelConfig) -> ExpertLoad:
        return cls(moe_layer_count(config), config.num_experts)

    def update(self, module: nn.Module, dp_group: Any = None) -> None:
        """After an optimizer step: the routers' bias update; their loads kept for the next log step."""
        rs = routers(module)
        fractions = update_expert_bias(module, dp_group)
        self.fractions = {
            (j if r.position is None else r.position): f for j, (r, f) in enumerate(zip(rs, fractions, strict=True))
        }

    def values(self) -> list[float]:
        """What is summed over ranks: ``layers x experts`` fractions (zeros for layers not on this rank), then
        ``layers`` counts (1 for a layer on this rank). Empty for a model without MoE layers."""
        if not self.layers:
            return []
        table = torch.zeros(self.layers, self.experts + 1, dtype=torch.float64)
        for j, f in self.fractions.items():
            table[j, :-1] = f.detach().to("cpu", torch.float64)
            table[j, -1] = 1.0
        return [*table[:, :-1].flatten().tolist(), *table[:, -1].tolist()]

    def metrics(self, summed: list[float]) -> dict[str, float]:
        """The logged ``moe_load_*`` of :meth:`values` summed over ranks (the layers no rank had left out)."""
        if not self.layers:
            return {}
        split = self.layers * self.experts
        sums = torch.tensor(summed[:split], dtype=torch.float64).view(self.layers, self.experts)
        counts = summed[split:]
        return load_metrics((sums[j] / counts[j]).float() for j in range(self.layers) if counts[j])
