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

from megatron_glm.config import config_to_dict, help_text, load_config, validate
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
        from megatron_glm.training.dry_run import dry_run_report  # torch imported only now

        print(dry_run_report(cfg, world_size))
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


if __name__ == "__main__":
    sys.exit(run_cli(main))
