"""A transformer layer assembled from builders, one per slot; the layout of a layer is collected from them.

A :class:`LayerBuilder` declares the tensors of its part (:meth:`~LayerBuilder.tensors`: names relative to its
module, shapes, packing, tensor-parallel split, init, as :class:`~megatron_glm.model.tensor_spec.TensorSpec`) and
builds the module holding them (:meth:`~LayerBuilder.build`, from the same declarations). A layer is the enabled
:data:`LAYER_SLOTS` in order: each slot names the layer's submodule (``attention``, ``mlp``, the norms) and is
enabled by the architecture (GLM-4-0414's sandwich post-norms by ``sandwich_norm``); a slot may build another part
on some layers (``LayerSlot.alternative``: GLM-4.5's MoE MLP from layer ``first_k_dense_replace`` on).
:func:`layer_tensors` (given the layer index) is what :class:`~megatron_glm.model.layout.ModelLayout` lists for each
layer, so a new part is a builder and a slot, and resharding, pipeline conversion, ZeRO consolidation and the
exports see its tensors.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from megatron_glm.config import ModelConfig
from megatron_glm.model.attention import AttentionBuilder
from megatron_glm.model.mlp import MLPBuilder
from megatron_glm.model.moe import MoEBuilder, is_moe_layer
from megatron_glm.model.norms import NormBuilder
from megatron_glm.model.tensor_spec import TensorSpec, relative
from megatron_glm.parallel.random import InitMethod
from megatron_glm.parallel.state import ParallelState


@dataclass(frozen=True)
class BuildContext:
    """What a builder builds a layer part with: the architecture, the 1-based ``layer_number``, ``init(name)`` (the
    init of the part's tensor ``name``, named as the builder declares it), the hidden dropout of the part's output
    (``branch_dropout``: 0 when the layer applies it after a post-norm), and where the parameters live."""

    config: ModelConfig
    layer_number: int
    init: Callable[[str], InitMethod]
    parallel_state: ParallelState
    params_dtype: torch.dtype
    device: torch.device | str | None
    branch_dropout: float


class LayerBuilder(Protocol):
    """One part of a transformer layer."""

    def tensors(self, config: ModelConfig) -> list[TensorSpec]:
        """The part's tensors, named relative to its module (``query_key_value.weight``), in module order."""
        ...

    def build(self, ctx: BuildContext) -> nn.Module:
        """The module holding exactly :meth:`tensors` (names, shapes, split), initialised as they say."""
        ...


def prefixed(init: Callable[[str], InitMethod], prefix: str) -> Callable[[str], InitMethod]:
    """``init`` for names relative to ``prefix`` (a layer's, a slot's)."""
    return lambda name: init(prefix + name)


def _always(config: ModelConfig) -> bool:
    return True


def _sandwich(config: ModelConfig) -> bool:
    return config.sandwich_norm


def _never(config: ModelConfig, layer: int) -> bool:
    return False


@dataclass(frozen=True)
class LayerSlot:
    """A submodule of the layer: its ``name``, its ``builder`` and whether the architecture has it; on the
    (0-based) layers where ``use_alternative(config, layer)`` holds, ``alternative`` builds it instead."""

    name: str
    builder: LayerBuilder
    enabled: Callable[[ModelConfig], bool] = _always
    alternative: LayerBuilder | None = None
    use_alternative: Callable[[ModelConfig, int], bool] = _never

    def builder_at(self, config: ModelConfig, layer: int) -> LayerBuilder:
        """The builder of this slot on 0-based layer ``layer``."""
        if self.alternative is not None and self.use_alternative(config, layer):
            return self.alternative
        return self.builder


#: The GLM layer's slots, in module (and state-dict) order: ``input_layernorm``, ``attention``,
#: [``post_self_attn_layernorm``], ``post_attention_layernorm``, ``mlp``, [``post_mlp_layernorm``] (bracketed:
#: GLM-4-0414's sandwich norms, enabled by ``sandwich_norm``); ``mlp`` is the MoE MLP on GLM-4.5's MoE layers. A
#: new part is one more slot (and its builder); a test replaces the tuple to add one without touching anything else.
LAYER_SLOTS: tuple[LayerSlot, ...] = (
    LayerSlot("input_layernorm", NormBuilder()),
    LayerSlot("attention", AttentionBuilder()),
    LayerSlot("post_self_attn_layernorm", NormBuilder(), _sandwich),
    LayerSlot("post_attention_layernorm", NormBuilder()),
    LayerSlot("mlp", MLPBuilder(), alternative=MoEBuilder(), use_alternative=is_moe_layer),
    LayerSlot("post_mlp_layernorm", NormBuilder(), _sandwich),
)


def layer_slots(config: ModelConfig) -> list[LayerSlot]:
    """The slots ``config``'s layers have, in order."""
    return [s for s in LAYER_SLOTS if s.enabled(config)]


def all_slot_names() -> tuple[str, ...]:
    """Every slot name a layer may have (enabled or not)."""
    return tuple(s.name for s in LAYER_SLOTS)


def layer_tensors(config: ModelConfig, layer: int = 0) -> list[TensorSpec]:
    """Transformer layer ``layer``'s (0-based) tensors, named relative to ``transformer.layers.{i}.``, in module
    order: the enabled slots' declarations (the builder each has on that layer), each under its slot's name."""
    return [
        spec
        for slot in layer_slots(config)
        for spec in relative(slot.builder_at(config, layer).tensors(config), slot.name + ".")
    ]
