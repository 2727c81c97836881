"""Fine-tune a GLM checkpoint on a seq2seq, cloze or chat task read from JSON lines.

    python finetune_glm.py --task cloze --train-data train.jsonl --valid-data valid.jsonl --load CKPT --save DIR
    python finetune_glm.py --task chat --train-data chat.jsonl --load GLM4_FOLDER --save DIR --lora-rank 16
    torchrun --nproc_per_node 2 finetune_glm.py --task seq2seq ... --tensor-model-parallel-size 2
    deepspeed --num_gpus 8 finetune_glm.py ... --deepspeed_config ds_configs/zero1_bf16.json --bf16

The architecture and tokenizer come from ``--load`` (any checkpoint we read); the task options below sit next
to every pretraining option that applies (batch sizes, lr schedule, parallelism, precision, ZeRO, logging,
``--save`` / ``--save-interval``; re-running with the same ``--save`` resumes exactly). Evaluation results
(``valid_loss`` and ``accuracy`` / ``rouge1`` / ``rouge2`` / ``rougeL`` / ``bleu`` / chat ``reply_N``) go to
``DIR/metrics.jsonl``. ``--dry-run`` validates the configuration and prints, as ``pretrain_glm.py --dry-run`` does,
the parameter count, the memory and the activation memory per rank; ``--help`` lists every option.
"""

from __future__ import annotations

import os
import sys

import yaml

from megatron_glm.config import config_to_dict, help_text, load_config, validate
from megatron_glm.config.validate import local_device_type
from megatron_glm.errors import GLMError, run_cli
from megatron_glm.finetune import config as task_options


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        print(__doc__)
        print(task_options.help_text())
        print(help_text())
        return 0
    dry_run = "--dry-run" in argv
    argv = [a for a in argv if a != "--dry-run"]
    task, rest = task_options.split_arguments(argv)
    task.check(need_train=True)
    cfg = load_config(rest)
    if dry_run:
        from megatron_glm.finetune.run import task_config

        cfg = task_config(cfg, task)
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        validate(cfg, world_size, local_device_type())
        print(yaml.safe_dump({**config_to_dict(cfg), "finetune": vars(task)}, sort_keys=False), end="")
        print(f"configuration is valid for world size {world_size}")
        from megatron_glm.training.dry_run import dry_run_report  # parameters (LoRA: trainable), memory per rank

        print(dry_run_report(cfg, world_size))
        return 0
    from megatron_glm.finetune.run import finetune  # heavy imports (torch, deepspeed) only when training
    from megatron_glm.training.failures import lost_peer_message

    try:
        finetune(cfg, task)
    except (RuntimeError, ConnectionError) as exc:  # a peer rank died: one line, not a gloo traceback
        message = lost_peer_message(exc)
        if message is None:
            raise
        raise GLMError(message) from None
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
