"""``tools/evaluate.py``'s typed options: the checkpoint, the held-out loss and cloze settings, and the task
section (the fine-tuning options, :class:`FinetuneConfig`, read the same way as ``finetune_glm.py``)."""

from __future__ import annotations

import dataclasses

from megatron_glm.config.sections import opt
from megatron_glm.data.loader import SPLITS
from megatron_glm.errors import ConfigError
from megatron_glm.finetune.config import TASKS, FinetuneConfig

EVAL_TASKS = (*(t for t in TASKS if t != "chat"), "ppl")


@dataclasses.dataclass(kw_only=True)
class EvaluateRun:
    """What to evaluate: the held-out loss / cloze accuracy (default) or a task file (``task``)."""

    load: str = opt("", "Checkpoint directory (training save dir or global_stepN).", required=True)
    tokenizer_model: str = opt(
        "", "Tokenizer (sentencepiece, tokenizer.json or folder, tiktoken; empty: the checkpoint's)."
    )
    data_path: list[str] = opt([], "Dataset prefixes of the loss evaluation (empty: the checkpoint's).")
    split: str = opt("", "train/valid/test weights (empty: the checkpoint's).")
    split_name: str = opt("valid", "Split to evaluate the loss on.", choices=SPLITS)
    seq_length: int = opt(0, "Sample length (0: the checkpoint's).")
    eval_iters: int = opt(20, "Micro-batches of the loss evaluation.")
    micro_batch_size: int = opt(0, "Samples per batch (0: training's for the loss, 8 for a task).")
    loss: bool = opt(True, "Evaluate the held-out loss (the tool's --no-loss turns it off).")
    cloze: str = opt("", "JSON lines of {context, target}: the share of targets predicted exactly (greedy).")
    cloze_blank: str = opt("[MASK]", "Blank token put before the cloze target.")
    json: bool = opt(False, "Also print the results as one JSON line.")
    task: str = opt(
        "",
        "Evaluate a task file (cloze, seq2seq; the format and metric names of finetune_glm.py) or a raw text's "
        "perplexity over overlapping windows (ppl) instead; the file is finetune.valid_data (--valid-data).",
        choices=("", *EVAL_TASKS),
    )
    output: str = opt("", "With a task: write the results to this JSON file.")
    window: int = opt(0, "ppl: window length (0: the model's positions).")
    overlap: int = opt(32, "ppl: context tokens carried into each window.")
    finetune: FinetuneConfig = dataclasses.field(default_factory=FinetuneConfig)

    def check(self) -> None:
        """One-line :class:`ConfigError` for options that do not fit together."""
        if self.finetune.task:
            raise ConfigError("name the task with --task (task), not finetune.task")
        if self.task and not self.finetune.valid_data:
            raise ConfigError("--task needs --valid-data FILE")
        if not self.task and not self.loss and not self.cloze:
            raise ConfigError("nothing to do: --no-loss without --cloze")

    def task_config(self) -> FinetuneConfig:
        """The task section with ``task`` filled in (cloze / seq2seq), checked as for evaluation."""
        cfg = dataclasses.replace(self.finetune, task=self.task)
        cfg.check(need_train=False)
        return cfg


#: ``tools/evaluate.py``'s flag spellings: its own, then every fine-tuning option as ``finetune_glm.py`` spells it.
EVALUATE_FLAGS: dict[str, tuple[str, object]] = {
    **{
        f"--{f.name.replace('_', '-')}": (f.name, None)
        for f in dataclasses.fields(EvaluateRun)
        if f.name not in ("loss", "json", "finetune")
    },
    "--no-loss": ("loss", False),
    "--json": ("json", True),
    **{
        f"--{f.name.replace('_', '-')}": (f"finetune.{f.name}", None)
        for f in dataclasses.fields(FinetuneConfig)
        if f.name not in ("task", "train_data")
    },
}
