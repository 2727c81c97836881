"""A fake architecture option added by touching a builder and the config only: ``extra_options: [extra_norm]``
(``ModelConfig.extra_options``, recorded in every checkpoint and checked like any architecture field) makes the MLP
slot's builder declare one more tensor, a TP-replicated per-layer norm ``mlp.extra_norm`` over the hidden size, and
build an MLP that applies it to its output. Nothing else in the package is edited: the layout, resharding, pipeline
conversion, ZeRO consolidation and the exports must pick it up from the declaration, and the architecture seal
(resume, weights-only loads, formats) from the config field."""

from __future__ import annotations

import dataclasses

from torch import nn

from megatron_glm.config import ModelConfig
from megatron_glm.model import builders
from megatron_glm.model.mlp import MLPBuilder, ParallelMLP
from megatron_glm.model.norms import make_norm
from megatron_glm.model.spec_linear import by_name
from megatron_glm.model.tensor_spec import norm_tensors

OPTION = "extra_norm"
EXTRA = "mlp.extra_norm"


class NormedMLP(ParallelMLP):
    def __init__(self, ctx: builders.BuildContext, tensors: dict) -> None:
        super().__init__(ctx, tensors)
        self.extra_norm = make_norm(
            ctx.config, ctx.params_dtype, ctx.device, size=tensors["extra_norm.weight"].shape[0]
        )

    def forward(self, *args: object, **kwargs: object):
        return self.extra_norm(super().forward(*args, **kwargs))


class ExtraNormMLPBuilder(MLPBuilder):
    options = (OPTION,)  # the config option it reads (known_options: any other name is refused)

    def tensors(self, config: ModelConfig):
        extra = norm_tensors(config, name="extra_norm") if OPTION in config.extra_options else []
        return [*super().tensors(config), *extra]

    def build(self, ctx: builders.BuildContext) -> nn.Module:
        if OPTION not in ctx.config.extra_options:
            return super().build(ctx)
        return NormedMLP(ctx, by_name(self.tensors(ctx.config)))


def fake_slots() -> tuple[builders.LayerSlot, ...]:
    """The default slots with the MLP's builder replaced (it knows the option; the config turns it on)."""
    return tuple(
        dataclasses.replace(s, builder=ExtraNormMLPBuilder()) if s.name == "mlp" else s for s in builders.LAYER_SLOTS
    )


def install() -> None:
    """For a process that runs nothing else (a spawned rank, a launched training run): swap the slots for good."""
    builders.LAYER_SLOTS = fake_slots()
