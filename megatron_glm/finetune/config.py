"""The fine-tuning options (``finetune_glm.py`` / ``tools/evaluate.py``), next to the pretraining config."""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

from megatron_glm.config.sections import opt
from megatron_glm.errors import ConfigError

TASKS = ("seq2seq", "cloze", "chat")
PACKING = ("pack", "none")
TRUNCATION = ("error", "left", "right")
SCORING = ("sum", "mean")


@dataclass
class FinetuneConfig:
    """What task to fine-tune or evaluate on, and how its examples are laid out and scored."""

    task: str = opt(
        "",
        "Task: seq2seq ({source, target} lines), cloze ({text, choices, label} lines) or chat ({messages, tools} "
        "lines, loss on the assistant's tokens; see docs/finetuning.md).",
        choices=TASKS,
    )
    train_data: str = opt("", "Training examples (JSON lines).")
    valid_data: str = opt("", "Held-out examples (JSON lines), evaluated every --eval-interval steps and at the end.")
    source_length: int = opt(
        96, "Most tokens of a source / cloze text (Part A without [CLS] and the appended [gMASK])."
    )
    target_length: int = opt(
        32, "Most tokens of a target (seq2seq) or of a choice (cloze); also the longest generated answer."
    )
    source_truncation: str = opt(
        "error",
        "A source longer than source_length: error (name the line), left (drop "
        "its first tokens) or right (drop its last tokens). Blanks are kept. "
        "Targets are always cut to target_length (the [eop] is kept).",
        choices=TRUNCATION,
    )
    label_smoothing: float = opt(0.0, "Label smoothing of the seq2seq training loss (validation loss is plain).")
    cloze_scoring: str = opt(
        "sum", "A choice's score: sum of its tokens' log-probabilities or their mean.", choices=SCORING
    )
    num_beams: int = opt(4, "Beam width for seq2seq evaluation (1: greedy).")
    length_penalty: float = opt(1.0, "Beam search: final score = log p / length ** length_penalty.")
    no_repeat_ngram_size: int = opt(0, "Generation never repeats an n-gram of this size within an answer (0: off).")
    eval_generate: int = opt(0, "Seq2seq: generate for the first N held-out examples only (0: all).")
    chat_length: int = opt(512, "Chat: positions per training row (longer conversations are truncated).")
    chat_packing: str = opt(
        "pack",
        "Chat: pack several conversations into a row (isolated from each other) or none (one per row).",
        choices=PACKING,
    )
    chat_replies: int = opt(2, "Chat: greedy replies generated for the first N held-out conversations at evaluation.")

    @property
    def seq_length(self) -> int:
        """Row length: [CLS] + source + [gMASK] + [sop]/target (+ [eop] label); chat: ``chat_length``."""
        if self.task == "chat":
            return self.chat_length
        return self.source_length + self.target_length + 3

    def check(self, *, need_train: bool) -> None:
        problems = []
        if self.task not in TASKS:
            problems.append(f"--task must be one of {', '.join(TASKS)}, got {self.task!r}")
        if need_train and not self.train_data:
            problems.append("--train-data is required")
        if self.source_length < 1 or self.target_length < 1:
            problems.append("--source-length and --target-length must be >= 1")
        if not 0.0 <= self.label_smoothing < 1.0:
            problems.append(f"--label-smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.num_beams < 1:
            problems.append(f"--num-beams must be >= 1, got {self.num_beams}")
        if self.chat_length < 2 or self.chat_replies < 0:
            problems.append("--chat-length must be >= 2 and --chat-replies >= 0")
        if self.no_repeat_ngram_size < 0 or self.eval_generate < 0:
            problems.append("--no-repeat-ngram-size and --eval-generate must be >= 0")
        if problems:
            raise ConfigError("; ".join(problems))


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_arguments(parser: argparse.ArgumentParser, skip: Sequence[str] = ()) -> None:
    """One ``--dashed-name`` option per :class:`FinetuneConfig` field (help and choices from the field)."""
    for f in dataclasses.fields(FinetuneConfig):
        if f.name in skip:
            continue
        kwargs = {"default": f.default, "type": type(f.default), "help": f.metadata.get("help", "")}
        if f.metadata.get("choices"):
            kwargs["choices"] = f.metadata["choices"]
        parser.add_argument(_flag(f.name), dest=f.name, **kwargs)


def split_arguments(argv: Sequence[str]) -> tuple[FinetuneConfig, list[str]]:
    """``(task options, the remaining arguments)``: the rest go to the pretraining config loader."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    add_arguments(parser)
    try:
        known, rest = parser.parse_known_args(list(argv))
    except SystemExit:
        raise ConfigError("bad fine-tuning option (see --help)") from None
    return FinetuneConfig(**vars(known)), rest


def help_text() -> str:
    parser = argparse.ArgumentParser(prog="task options", add_help=False)
    add_arguments(parser)
    return parser.format_help()
