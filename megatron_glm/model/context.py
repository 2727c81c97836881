"""What one forward pass of the transformer needs besides the hidden states, in one value.

:class:`ForwardContext` carries the attention mask, the rotary rotation, the tensor-parallel dropout stream, whether
the hidden states are sequence shards, the rows whose outputs are needed, the generation cache and the auxiliary
loss terms layers add (e.g. an MoE load-balancing term). ``GLMTransformer``, ``GLMLayer``, ``ParallelSelfAttention``
and ``ParallelMLP`` take it as their second argument; the whole model and each pipeline stage build it the same
way (:func:`megatron_glm.model.glm.forward_context`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Protocol

import torch

from megatron_glm.config import ModelConfig
from megatron_glm.model.attention import LayerKVCache, QueryRows
from megatron_glm.model.masks import AttentionMask
from megatron_glm.model.rotary import RotaryPositions
from megatron_glm.parallel import RNGStatesTracker


class KVCacheLike(Protocol):
    """A key/value cache for the whole stack: ``layer(i)`` is global layer ``i``'s cache; ``length`` is the
    number of positions cached before the current forward."""

    @property
    def length(self) -> int: ...

    def layer(self, index: int) -> LayerKVCache: ...


@dataclass
class ForwardContext:
    """Per-forward settings of the transformer stack.

    ``mask``: the prepared attention mask. ``tracker``: the tensor-parallel dropout stream (``None``: the default
    generator only). ``rotary``: the rotation of this forward's positions (rotary models). ``sequence_parallel``:
    the hidden states are this rank's sequence shard ``[b, s/tp, H]``. ``rows`` (no cache, no sequence
    parallelism): only these rows' outputs are needed; the stack's last layer computes them only. ``kv_cache``
    (generation): the whole stack's cache. ``aux``: named scalar loss terms added by layers (:meth:`add_aux`),
    carried to the loss (:class:`~megatron_glm.model.loss.GLMLoss` ``aux``).
    """

    mask: AttentionMask
    tracker: RNGStatesTracker | None = None
    rotary: RotaryPositions | None = None
    sequence_parallel: bool = False
    rows: QueryRows | None = None
    kv_cache: KVCacheLike | None = None
    aux: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.rows is not None and (self.kv_cache is not None or self.sequence_parallel):
            raise ValueError("rows needs a forward without a KV cache or sequence parallelism")
        if self.kv_cache is not None and self.sequence_parallel:
            raise ValueError("a forward with a KV cache runs without sequence parallelism")

    def layer_cache(self, index: int) -> LayerKVCache | None:
        """Global layer ``index``'s cache (``None`` without a cache)."""
        return None if self.kv_cache is None else self.kv_cache.layer(index)

    def without_rows(self) -> ForwardContext:
        """The same context for layers whose every row is needed (the ``aux`` terms stay shared)."""
        return self if self.rows is None else dataclasses.replace(self, rows=None)

    def add_aux(self, name: str, value: torch.Tensor) -> None:
        """Add the scalar ``value`` to the auxiliary loss term ``name``."""
        self.aux[name] = self.aux[name] + value if name in self.aux else value


def aux_loss_names(config: ModelConfig) -> tuple[str, ...]:
    """The auxiliary loss terms the layers of ``config``'s architecture may add (:meth:`ForwardContext.add_aux`),
    in the order of the pipeline's accumulator slots: the MoE layers' sequence-level balance loss (``moe_aux``) when
    ``moe_aux_loss_coeff`` > 0."""
    return ("moe_aux",) if config.num_experts and config.moe_aux_loss_coeff > 0 else ()
