"""Config checks of context parallelism (``parallel.context_parallel_size``, ``--context-parallel-size``).

Served: GLM's blank-infilling mask, document isolation, the causal objective, learned and rotary positions, tensor
and sequence parallelism, pipeline parallelism (each micro-batch split per rank, the last stage's loss reduced over
the group, DeepSpeed's pipeline data-parallel axis spanning dp x cp), data parallelism, ZeRO 0-3, recomputation,
dropout, the fused head. Refused (one line each): LoRA dropout, Mixture-of-Experts and MTP layers, sequence lengths
not divisible by ``2 x cp`` (the zigzag split's ``2 cp`` chunks) or, under sequence parallelism, by ``cp x tp``.
Generation (its KV cache) and fine-tuning run without context parallelism.

How attention meets the other ranks' keys and values (``model.context_parallel_comm``, ``--context-parallel-comm``,
:class:`ContextParallelOptions`, a mixin of :class:`~megatron_glm.config.sections.ModelConfig`): ``ring`` (the
default) passes each rank's keys and values around the group with the log-sum-exp merge
(:mod:`megatron_glm.model.ring_attention`), keeping only the local ones for backward; ``gather`` all-gathers them.
Attention dropout always gathers (its exact ``C = 1`` masks are drawn over ``[b, h, S, S]``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from megatron_glm.config.fields import opt

if TYPE_CHECKING:
    from megatron_glm.config.sections import GLMConfig

CP_COMMS = ("ring", "gather")


@dataclass(kw_only=True)
class ContextParallelOptions:
    """Execution options of context parallelism (``parallel.context_parallel_size > 1``)."""

    context_parallel_comm: str = opt(
        "ring",
        "Context parallelism's attention: ring (keys and values travel around the group point-to-point, the "
        "log-sum-exp merge; only the local ones kept for backward) or gather (all-gathered keys and values). "
        "Attention dropout always gathers (its exact masks are drawn over the whole sequence).",
        choices=CP_COMMS,
        execution=True,
    )


def context_parallel_problems(cfg: GLMConfig, world_size: int = 0) -> list[str]:
    """What ``parallel.context_parallel_size`` cannot serve in ``cfg`` (empty when it is 1 or everything fits)."""
    p, m, seq = cfg.parallel, cfg.model, cfg.data.seq_length
    cp, tp = p.context_parallel_size, p.tensor_model_parallel_size
    if cp <= 0:
        return [f"parallel.context_parallel_size must be positive, got {cp}"]
    if cp == 1:
        return []
    out: list[str] = []
    if seq % (2 * cp):
        out.append(
            f"data.seq_length ({seq}) must be divisible by 2 x parallel.context_parallel_size ({2 * cp})"
            ": each context-parallel rank holds two chunks"
        )
    elif m.sequence_parallel and tp > 1 and (seq // cp) % tp:
        out.append(
            f"model.sequence_parallel with context parallelism needs data.seq_length ({seq}) divisible by "
            f"parallel.context_parallel_size x tensor_model_parallel_size ({cp * tp})"
        )
    unsupported = {
        "lora.dropout > 0": cfg.lora.rank > 0 and cfg.lora.dropout > 0,
        # the router's balance terms and the MTP shift would see this rank's chunks only
        "model.num_experts > 0 (Mixture-of-Experts)": m.num_experts > 0,
        "model.num_nextn_predict_layers > 0 (MTP)": m.num_nextn_predict_layers > 0,
    }
    refused = [name for name, bad in unsupported.items() if bad]
    out += [f"parallel.context_parallel_size {cp} cannot be combined with {name}" for name in refused]
    return out
