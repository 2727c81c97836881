"""Parameter count and per-rank memory of a model under TP x PP x DP and a ZeRO stage, from the layout alone.

Counted per rank: the weights (in the training dtype), their gradients (same dtype) and AdamW's state (fp32
``exp_avg`` and ``exp_avg_sq``, plus fp32 master weights under bf16/fp16). ZeRO partitions the optimizer state
over data-parallel ranks (stage >= 1), then the gradients (>= 2), then the weights (3; an untied head's
``output_layer.weight`` ``[V/tp, H]`` is then also held whole on the last stage, gathered from its use in the forward
to the end of the step: ``OutputLayer`` in ``model/glm.py``). Pipeline stages hold
uniform runs of transformer layers (as ``partition_method: uniform``); the first stage also holds the
embeddings, the last the final norm and the head (the tied word embedding is on both). The figure is the most
loaded stage. With LoRA the base is frozen: held, but only the adapters have gradients and AdamW state. Not
counted: activations, communication buffers, allocator overhead, DeepSpeed's flat-buffer padding.

The set-up peak is what building the model holds before the engine exists: every parameter is drawn whole (fp32,
the full tensor-parallel tensor, plus the fp32 draw it is copied from) before its shard is kept. Without ZeRO-3
the rank's whole model is built in fp32 (DeepSpeed casts it later); under ZeRO-3 it is built partitioned
(``deepspeed.zero.Init``): this rank's share in the training dtype plus the largest tensor being drawn.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from megatron_glm.config import LoraConfig, ModelConfig
from megatron_glm.model.layout import OUTPUT_TENSOR, VOCAB_TENSOR, ModelLayout, PipeLayer, TensorSpec

BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per rank on the most loaded pipeline stage."""

    parameters: int  # the whole model (tied head counted once)
    stage_parameters: int  # parameters of one tensor-parallel rank of the largest stage (before ZeRO)
    weights: float
    grads: float
    optimizer: float
    setup: float = 0.0  # the peak while building the model (see module doc)
    trainable: int = 0  # LoRA: adapter parameters of one rank of the largest stage (0: every parameter trains)

    @property
    def total(self) -> float:
        return self.weights + self.grads + self.optimizer

    def describe(self) -> str:
        gib = 1024.0**3
        return (
            f"weights {self.weights / gib:.2f} GiB, grads {self.grads / gib:.2f} GiB, optimizer states "
            f"{self.optimizer / gib:.2f} GiB, total {self.total / gib:.2f} GiB (activations not counted); set-up "
            f"peak {self.setup / gib:.2f} GiB (building the model)"
        )


def stage_of(pipe: PipeLayer, config: ModelConfig, pp: int) -> int:
    """The pipeline stage holding pipe layer ``pipe`` (uniform layers; embeddings first, final norm and head last)."""
    if pipe.layer is not None:
        return min(pp - 1, pipe.layer * pp // config.num_layers)
    return 0 if pipe.kind in ("word_embedding", "position_embeddings") else pp - 1


def lora_numel(spec: TensorSpec, rank: int, tp: int) -> int:
    """One tensor-parallel rank's adapter parameters (``A`` and ``B``) of rank ``rank`` on weight ``spec``:
    column-parallel ``A`` whole and ``B`` split, row-parallel the reverse (an expert weight: one adapter per
    expert, all ``E`` of them; the caller divides by the expert-parallel size)."""
    out_f, in_f = spec.shape[-2:]
    experts = spec.shape[0] if len(spec.shape) == 3 else 1
    if spec.split_dim == len(spec.shape) - 2:
        return experts * (rank * in_f + out_f // tp * rank)
    return experts * (rank * in_f // tp + out_f * rank)


def estimate_memory(
    config: ModelConfig,
    *,
    tp: int,
    pp: int,
    dp: int,
    zero_stage: int,
    precision: str,
    lora: LoraConfig | None = None,
    ep: int = 1,
) -> MemoryEstimate:
    """Parameter count and per-rank memory (see module doc). With ``lora`` (rank > 0) the base is frozen: its
    weights are held but only the adapters have gradients and optimizer state. ``ep``: expert-parallel size (each
    rank holds ``E / ep`` experts; ZeRO partitions their gradients and optimizer state over the ``dp / ep``
    expert-data-parallel ranks). The frozen router bias counts as held only."""
    layout = ModelLayout(config)
    rank = lora.rank if lora is not None else 0
    adapters = [0] * pp
    per_stage = [0] * pp
    experts = [0] * pp  # expert parameters (sharded over expert-data-parallel ranks by ZeRO)
    frozen = [0] * pp  # held without gradient (the router correction bias)
    largest_full = largest_local = 0
    for pipe in layout.pipe_layers:
        names = pipe.names
        if pipe.kind == "head" and layout.tied_head and pp > 1:
            names = (VOCAB_TENSOR,)  # the tied copy on the last stage
        stage = stage_of(pipe, config, pp)
        for name in names:
            spec = layout[name]
            full, shard = math.prod(spec.shape), math.prod(spec.shard_shape(tp, ep))
            if rank and spec.layer is not None and name.endswith(".weight") and lora.adapts(name.split(".", 3)[3][:-7]):
                adapters[stage] += lora_numel(spec, rank, tp) // (ep if spec.expert_dim is not None else 1)
            per_stage[stage] += shard
            experts[stage] += shard if spec.expert_dim is not None else 0
            frozen[stage] += shard if name.endswith(".expert_bias") else 0
            largest_full, largest_local = max(largest_full, full), max(largest_local, shard)
    busiest = max(range(pp), key=lambda s: per_stage[s] + adapters[s])
    local = per_stage[busiest] + adapters[busiest]
    trainable = adapters[busiest] if rank else local - frozen[busiest]
    expert = 0 if rank else experts[busiest]
    width = BYTES[precision]
    per_param = 8 + (4 if width != 4 else 0)
    weights = local * width
    dp = max(1, dp)
    edp = max(1, dp // max(1, ep))
    optimizer = float((trainable - expert) * per_param)
    grads = float((trainable - expert) * width)
    optimizer /= dp if zero_stage >= 1 else 1
    grads /= dp if zero_stage >= 2 else 1
    optimizer += expert * per_param / (edp if zero_stage >= 1 else 1)
    grads += expert * width / (edp if zero_stage >= 2 else 1)
    drawing = 8 * largest_full  # the full fp32 tensor and the fp32 values drawn for it
    setup = local * 4 + drawing
    if zero_stage >= 3:
        weights /= dp
        setup = weights + largest_local * width + drawing
        if not layout.tied_head and busiest == pp - 1:  # the untied head's weight, gathered whole (module doc)
            weights += math.prod(layout[OUTPUT_TENSOR].shard_shape(tp)) * width
    return MemoryEstimate(
        layout.parameter_count(),
        local,
        float(weights),
        float(grads),
        float(optimizer),
        setup,
        adapters[busiest] if rank else 0,
    )


def parameter_counts(config: ModelConfig) -> tuple[int, int]:
    """``(total, active)`` parameters of the layout (its multi-token-prediction layers included); ``active`` counts
    ``moe_top_k`` of the ``num_experts`` of each expert tensor (the parameters one token uses)."""
    specs = list(ModelLayout(config))

    def active(spec: TensorSpec) -> int:
        n = math.prod(spec.shape)
        return n if spec.expert_dim is None else n // spec.experts * config.moe_top_k

    return sum(math.prod(s.shape) for s in specs), sum(active(s) for s in specs)
