"""Pretrain a GLM model.

    python pretrain_glm.py --config examples/configs/glm-tiny.yaml [--dotted.key VALUE | --megatron-flag VALUE ...]
    deepspeed --num_gpus 2 pretrain_glm.py --config ... --tensor-model-parallel-size 2
    torchrun --nproc_per_node 2 pretrain_glm.py --config ...

``--dry-run`` validates the configuration (for the launcher's world size, else TP x PP x DP of the config) and
prints it, the parameter count and the memory per rank (weights, grads, optimizer states; and the set-up peak, while
the model is built) and the activation memory per rank for the run's sequence length, context-parallel size and
recompute setting (``megatron_glm.model.activation_memory``), without training.
``--help`` lists every option.
"""

from __future__ import annotations

import os
import sys

import yaml

from megatron_glm.config import GLMConfig, config_to_dict, help_text, load_config, validate
from megatron_glm.config.validate import local_device_type
from megatron_glm.errors import GLMError, run_cli


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        print(__doc__)
        print(help_text())
        return 0
    dry_run = "--dry-run" in argv
    argv = [a for a in argv if a != "--dry-run"]
    cfg = load_config(argv)
    if dry_run:
        if cfg.checkpoint.load or (cfg.lora.rank > 0 and cfg.lora.base):  # its architecture (torch only then)
            from megatron_glm.checkpoint.architecture import adopt_checkpoint_architecture

            cfg = adopt_checkpoint_architecture(cfg, lambda message: print(message, file=sys.stderr))
        p = cfg.parallel
        planned = p.tensor_model_parallel_size * p.pipeline_model_parallel_size * p.context_parallel_size
        planned *= max(1, p.data_parallel_size)
        world_size = int(os.environ.get("WORLD_SIZE", str(planned)))
        validate(cfg, world_size, local_device_type())  # fp16 on a CPU is refused here, before DeepSpeed
        print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), end="")
        print(f"configuration is valid for world size {world_size}")
        print(dry_run_memory(cfg, world_size))
        print(dry_run_activations(cfg, world_size))
        return 0
    from megatron_glm.training.failures import lost_peer_message
    from megatron_glm.training.run import pretrain  # heavy imports (torch, deepspeed) only when training

    try:
        pretrain(cfg)
    except (RuntimeError, ConnectionError) as exc:  # a peer rank died: one line, not a gloo traceback
        message = lost_peer_message(exc)
        if message is None:
            raise
        raise GLMError(message) from None
    return 0


def dry_run_memory(cfg: GLMConfig, world_size: int) -> str:
    """The parameter count and the memory per rank (weights, grads, optimizer states) of this run."""
    from megatron_glm.config import derived_data_parallel_size
    from megatron_glm.model.memory import estimate_memory
    from megatron_glm.training.deepspeed_config import build_deepspeed_config

    p, t = cfg.parallel, cfg.training
    tp, pp, dp = (
        p.tensor_model_parallel_size,
        p.pipeline_model_parallel_size,
        derived_data_parallel_size(cfg, world_size),
    )
    if cfg.model.vocab_size <= 0:
        return "parameters: unknown until the tokenizer gives the vocabulary (set model.vocab_size to count them)"
    stage = build_deepspeed_config(cfg, dp)["zero_optimization"]["stage"]  # a --deepspeed_config may name it
    ep = getattr(p, "expert_parallel_size", 1)
    est = estimate_memory(cfg.model, tp=tp, pp=pp, dp=dp, zero_stage=stage, precision=t.precision, lora=cfg.lora, ep=ep)
    lora = cfg.lora
    trainable = (
        f"trainable per rank (LoRA rank {lora.rank} on {', '.join(lora.target_names())}, base frozen): "
        f"{est.trainable:,} of {est.stage_parameters:,}\n"
        if lora.rank
        else ""
    )
    return (
        f"parameters: {est.parameters:,}\n{trainable}"
        f"memory per rank (TP {tp} x PP {pp} x DP {dp}{f' (EP {ep})' if ep > 1 else ''}, ZeRO {stage}, {t.precision}; "
        f"{est.stage_parameters:,} parameters on the largest rank): {est.describe()}"
    )


def dry_run_activations(cfg: GLMConfig, world_size: int) -> str:
    """The activation memory per rank of one step (CUDA kernels: 1-byte dropout masks) on the busiest stage."""
    from megatron_glm.config import derived_data_parallel_size
    from megatron_glm.config.validate import batch_sizes
    from megatron_glm.model.activation_memory import StepShape, estimate_activation_memory

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
    head = "" if m.vocab_size > 0 else " (the head's loss not counted: set model.vocab_size)"
    return (
        f"activation memory per rank{head} (seq {shape.seq_length}, CP {shape.cp}: "
        f"{shape.seq_length // shape.cp} tokens per rank, micro-batch {shape.micro_batch_size}, TP {shape.tp}{sp}, "
        f"{m.attention_impl}): {est.describe()}"
    )


if __name__ == "__main__":
    sys.exit(run_cli(main))
