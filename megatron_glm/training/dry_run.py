"""What ``--dry-run`` prints after validating a configuration (``pretrain_glm.py`` and ``finetune_glm.py``): the
parameter count and the memory per rank (weights, grads, optimizer states; :mod:`megatron_glm.model.memory`) and
the activation memory per rank (:mod:`megatron_glm.model.activation_memory`).

ZeRO partitions over DeepSpeed's data-parallel group, the ``dp x cp`` ranks that reduce gradients together
(:class:`~megatron_glm.parallel.state.ParallelState`'s ``dp_cp_group``), so the estimate shards over ``dp x cp``.
"""

from __future__ import annotations

from megatron_glm.config import GLMConfig, batch_sizes, derived_data_parallel_size
from megatron_glm.model.activation_memory import StepShape, cp_comm, estimate_activation_memory
from megatron_glm.model.memory import estimate_memory
from megatron_glm.training.deepspeed_config import build_deepspeed_config


def dry_run_memory(cfg: GLMConfig, world_size: int) -> str:
    """The parameter count and the memory per rank (weights, grads, optimizer states) of this run."""
    p, t = cfg.parallel, cfg.training
    tp, pp, cp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size, p.context_parallel_size
    dp = derived_data_parallel_size(cfg, world_size)
    if cfg.model.vocab_size <= 0:
        return "parameters: unknown until the tokenizer gives the vocabulary (set model.vocab_size to count them)"
    stage = build_deepspeed_config(cfg, dp)["zero_optimization"]["stage"]  # a --deepspeed_config may name it
    ep = p.expert_parallel_size
    est = estimate_memory(
        cfg.model, tp=tp, pp=pp, dp=dp * cp, zero_stage=stage, precision=t.precision, lora=cfg.lora, ep=ep
    )
    lora = cfg.lora
    trainable = (
        f"trainable per rank (LoRA rank {lora.rank} on {', '.join(lora.target_names())}, base frozen): "
        f"{est.trainable:,} of {est.stage_parameters:,}\n"
        if lora.rank
        else ""
    )
    grid = f"TP {tp} x PP {pp} x DP {dp}" + (f" x CP {cp}" if cp > 1 else "") + (f" (EP {ep})" if ep > 1 else "")
    shards = f", sharded over DP x CP = {dp * cp}" if cp > 1 and stage > 0 else ""
    return (
        f"parameters: {est.parameters:,}\n{trainable}"
        f"memory per rank ({grid}, ZeRO {stage}{shards}, {t.precision}; "
        f"{est.stage_parameters:,} parameters on the largest rank): {est.describe()}"
    )


def dry_run_activations(cfg: GLMConfig, world_size: int) -> str:
    """The activation memory per rank of one step (CUDA kernels: 1-byte dropout masks) on the busiest stage."""
    p, m = cfg.parallel, cfg.model
    _, accumulation, _ = batch_sizes(cfg, derived_data_parallel_size(cfg, world_size))
    shape = StepShape(
        seq_length=cfg.data.seq_length,
        micro_batch_size=cfg.training.micro_batch_size,
        tp=p.tensor_model_parallel_size,
        cp=p.context_parallel_size,
        pp=p.pipeline_model_parallel_size,
        precision=cfg.training.precision,
        micro_batches=accumulation,
    )
    est = estimate_activation_memory(m, shape)
    sp = ", sequence parallel" if m.sequence_parallel and shape.tp > 1 else ""
    comm = f" ({cp_comm(m, shape)} attention)" if shape.cp > 1 else ""
    head = "" if m.vocab_size > 0 else " (the head's loss not counted: set model.vocab_size)"
    return (
        f"activation memory per rank{head} (seq {shape.seq_length}, CP {shape.cp}{comm}: "
        f"{shape.seq_length // shape.cp} tokens per rank, micro-batch {shape.micro_batch_size}, TP {shape.tp}{sp}, "
        f"{m.attention_impl}): {est.describe()}"
    )


def dry_run_report(cfg: GLMConfig, world_size: int) -> str:
    """Both: the memory (parameters, weights, grads, optimizer states) and the activations per rank."""
    return f"{dry_run_memory(cfg, world_size)}\n{dry_run_activations(cfg, world_size)}"
